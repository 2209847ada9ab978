"""Image backbones on one CUDA GPU with mixed precision: parameters, training and
feature-extraction speed and peak memory at the gpu preset (96^3 crops, Swin embed_dim 48).

    .venv/bin/python benchmarks/gpu_backbones.py [--preset gpu] [--crop-voxels S]
        [--amp bf16|fp16|off] [--train-batch 4] [--extract-batch 8] [--min-time 5] [--seed 0]

The measurement is ``bench_backbones.measure`` on ``cuda`` under ``torch.autocast`` (fp16 adds
a GradScaler), cuDNN autotuning on; peak memory is torch's peak allocated memory per phase.
About a minute on an H100; exits with a message when torch sees no CUDA device.
"""

from __future__ import annotations

import sys
import time

import torch
from bench_backbones import measure, parser, preset_configs, print_table

from fedmets.shared.reproducibility import set_seed

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def main() -> None:
    args = parser("gpu", min_time=5.0)
    args.add_argument("--amp", choices=sorted(AMP_DTYPES), default="bf16")
    opts = args.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            f"gpu_backbones: no CUDA device visible to torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda or 'none'}); for CPU figures run benchmarks/bench_backbones.py"
        )
    started = time.perf_counter()
    set_seed(opts.seed, deterministic=False)
    torch.backends.cudnn.benchmark = True  # fastest kernels, as a training run would use
    torch.backends.cudnn.deterministic = False
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    configs = preset_configs(opts.preset, opts.crop_voxels)
    side = configs["swin3d"].crop_voxels
    print(
        f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; preset {opts.preset} ({side}^3 crops, 2 channels), "
        f"autocast {opts.amp}"
    )
    rows = {}
    for backbone in opts.backbones:
        rows[backbone] = measure(
            configs[backbone],
            device,
            opts.train_batch,
            opts.extract_batch,
            opts.min_time,
            AMP_DTYPES[opts.amp],
        )
        torch.cuda.empty_cache()
    print_table(rows, opts.train_batch, opts.extract_batch)
    print(f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
