"""Memory-aware image training under a GPU memory budget: the plan ``fedmets.client.memory`` chooses
for each backbone of an image preset, and what a real epoch then reserves.

    python benchmarks/gpu_memory.py [--preset gpu] [--budget-gib 24] [--batch 16] [--crops 32]

Per backbone (the preset's networks, random crops (n, 2, S, S, S) held and augmented on the
GPU as the study holds them): every probe the planner made (micro-batch, checkpointing, peak
GiB reserved), the plan it chose, then one training epoch of ``--crops`` crops at effective
batch ``--batch`` with that plan: the peak GiB PyTorch reserved (the budget bounds it; the CUDA
context, about 0.5 GiB, comes on top) and seconds per optimiser step. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedmets.client.crops import CropDataset
from fedmets.client.memory import GIB, choose_plan, measure_step_peak
from fedmets.client.training import train_image_model
from fedmets.shared.image_models import build_image_model
from fedmets.shared.image_presets import IMAGE_PRESETS, ImageModelConfig
from fedmets.shared.reproducibility import set_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpu", choices=sorted(IMAGE_PRESETS))
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crops", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "gpu_memory.py: needs a CUDA device (torch.cuda.is_available() is False)\n")
    device = torch.device("cuda")
    budget = int(args.budget_gib * GIB)
    print(
        f"{torch.cuda.get_device_name(device)}; preset {args.preset}, budget {args.budget_gib} GiB"
    )
    for backbone, cfg in IMAGE_PRESETS[args.preset].items():
        check_backbone(backbone, cfg, args, device, budget)
        torch.cuda.empty_cache()  # the backbone's model and crops went with its call


def check_backbone(
    backbone: str,
    cfg: ImageModelConfig,
    args: argparse.Namespace,
    device: torch.device,
    budget: int,
) -> None:
    """Print the planner's probes and plan for one backbone, then train one epoch with it."""
    set_seed(args.seed)
    shape = (cfg.in_channels, *(cfg.crop_voxels,) * 3)
    rng = np.random.default_rng(args.seed)
    images = rng.random((args.crops, *shape), dtype=np.float32)
    labels = (np.arange(args.crops) % 4 == 0).astype(np.float32)
    model = build_image_model(cfg).to(device)
    data = CropDataset(images, labels, augment=True, seed=args.seed, device=device)
    probes = []

    def peak(micro: int, checkpointing: bool) -> int | None:
        used = measure_step_peak(model, shape, micro, checkpointing)
        probes.append((micro, checkpointing, used))
        return used

    plan = choose_plan(args.batch, budget, peak)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"\n{backbone} at {cfg.crop_voxels}^3, {parameters} parameters")
    for micro, checkpointing, used in probes:
        shown = "out of memory" if used is None else f"{used / GIB:6.2f} GiB"
        print(f"  probe micro-batch {micro:3d}, checkpointing {checkpointing!s:5s}: {shown}")
    print(f"  plan: {plan.describe()}")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    train_image_model(
        model,
        data,
        epochs=1,
        lr=1e-4,
        pos_weight=3.0,
        seed=args.seed,
        device=device,
        batch_size=args.batch,
        memory=plan,
    )
    torch.cuda.synchronize(device)
    steps = -(-args.crops // args.batch)
    reserved = torch.cuda.max_memory_reserved(device) / GIB
    print(
        f"  epoch of {args.crops} crops: peak {reserved:.2f} GiB reserved,"
        f" {(time.perf_counter() - tic) / steps:.2f} s per optimiser step"
    )


if __name__ == "__main__":
    main()
