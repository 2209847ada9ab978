"""Image backbones on CPU: parameters, training and feature-extraction speed at a preset.

    .venv/bin/python benchmarks/bench_backbones.py [--preset cpu-small] [--crop-voxels S]
        [--threads N] [--train-batch 4] [--extract-batch 8] [--min-time 3] [--seed 0]

Per backbone (swin3d, resnet3d, densenet3d) of ``fedmets.shared.models.IMAGE_PRESETS[preset]``, on
random float32 crops (C = 2, the preset's crop side or ``--crop-voxels``, e.g. 64 for the
``paper`` study preset, which runs the cpu-small networks at 64^3): training samples/s of forward +
backward + AdamW steps at ``--train-batch``, and extraction volumes/s of ``deep_features`` in
eval mode under ``no_grad`` at ``--extract-batch``. Each figure is the median over blocks of
steps filling ``--min-time`` seconds (torch.utils.benchmark's ``blocked_autorange``: robust to
a busy machine), after two untimed warm-up steps (oneDNN and cuDNN pick their kernels on the
first call of every shape).
``benchmarks/gpu_backbones.py`` runs the same measurement on CUDA with mixed precision.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from fedmets.shared.image_models import build_image_model
from fedmets.shared.image_presets import BACKBONES, IMAGE_PRESETS, ImageModelConfig, at_crop_size
from fedmets.shared.models import count_parameters
from fedmets.shared.reproducibility import set_seed

WARMUP_STEPS = 2


def measure(
    cfg: ImageModelConfig,
    device: torch.device,
    train_batch: int,
    extract_batch: int,
    min_time: float,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """``params``, ``train_per_s`` (samples/s), ``extract_per_s`` (volumes/s) of ``cfg`` on
    ``device``; on CUDA also ``train_peak_gib`` / ``extract_peak_gib`` (peak allocated GiB).
    ``amp_dtype``: autocast dtype (float16 adds a GradScaler), None for float32."""
    model = build_image_model(cfg).to(device)
    side = cfg.crop_voxels
    x = torch.randn(train_batch, cfg.in_channels, side, side, side, device=device)
    y = (torch.arange(train_batch, device=device) % 2).float()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def train_step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with autocast:
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()

    volumes = torch.randn(extract_batch, cfg.in_channels, side, side, side, device=device)

    def extract_step() -> None:
        with torch.no_grad(), autocast:
            model.deep_features(volumes)

    result: dict[str, float] = {"params": count_parameters(model)}
    for name, step, batch, mode in (
        ("train", train_step, train_batch, model.train),
        ("extract", extract_step, extract_batch, model.eval),
    ):
        mode()
        for _ in range(WARMUP_STEPS):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
        seconds = timer.blocked_autorange(min_run_time=min_time).median  # syncs CUDA
        result[f"{name}_per_s"] = batch / seconds
        if device.type == "cuda":
            result[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def print_table(rows: dict[str, dict[str, float]], train_batch: int, extract_batch: int) -> None:
    """One line per backbone; peak-memory columns when the rows have them."""
    memory = all("train_peak_gib" in r for r in rows.values())
    header = (
        f"{'backbone':12s} {'params':>10s} {f'train/s (b{train_batch})':>15s}"
        f" {f'extract/s (b{extract_batch})':>17s}"
    )
    print(header + (f" {'train GiB':>10s} {'extract GiB':>12s}" if memory else ""))
    for backbone, r in rows.items():
        line = (
            f"{backbone:12s} {r['params']:>10,d} {r['train_per_s']:>15.2f}"
            f" {r['extract_per_s']:>17.2f}"
        )
        if memory:
            line += f" {r['train_peak_gib']:>10.2f} {r['extract_peak_gib']:>12.2f}"
        print(line)


def preset_configs(preset: str, crop_voxels: int | None) -> dict[str, ImageModelConfig]:
    """Backbone -> config of ``IMAGE_PRESETS[preset]``, at ``crop_voxels`` when given."""
    configs = IMAGE_PRESETS[preset]
    return dict(configs) if crop_voxels is None else at_crop_size(configs, crop_voxels)


def parser(preset: str, min_time: float) -> argparse.ArgumentParser:
    """The options both backbone benchmarks take."""
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--preset", choices=sorted(IMAGE_PRESETS), default=preset)
    args.add_argument("--crop-voxels", type=int, help="crop side S (default: the preset's)")
    args.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    args.add_argument("--train-batch", type=int, default=4)
    args.add_argument("--extract-batch", type=int, default=8)
    args.add_argument("--min-time", type=float, default=min_time, help="seconds timed per figure")
    args.add_argument("--seed", type=int, default=0)
    return args


def main() -> None:
    args = parser("cpu-small", min_time=3.0)
    args.add_argument("--threads", type=int, default=torch.get_num_threads())
    opts = args.parse_args()
    torch.set_num_threads(opts.threads)
    set_seed(opts.seed)
    configs = preset_configs(opts.preset, opts.crop_voxels)
    side = configs["swin3d"].crop_voxels
    print(
        f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{opts.threads} threads; preset {opts.preset} ({side}^3 crops, 2 channels), float32"
    )
    rows = {}
    for backbone in opts.backbones:
        rows[backbone] = measure(
            configs[backbone],
            torch.device("cpu"),
            opts.train_batch,
            opts.extract_batch,
            opts.min_time,
        )
    print_table(rows, opts.train_batch, opts.extract_batch)


if __name__ == "__main__":
    main()
