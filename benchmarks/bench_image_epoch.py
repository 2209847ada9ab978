"""Image-model training epochs as the study runs them, augmentation on the CPU or on the GPU.

    .venv/bin/python benchmarks/bench_image_epoch.py [--preset cpu-small] [--crop-voxels 64]
        [--backbone swin3d] [--crops 272] [--batch 8] [--epochs 2] [--device auto] [--seed 0]

``fedmets.client.training.train_image_model`` on random crops (n, 2, S, S, S) float32 in a
``fedmets.client.crops.CropDataset`` (the study's flips + affine augmentation), one row per
placement of the crops: ``cpu`` (augmented on the CPU, batches copied to the device) and, on a GPU,
``cuda`` (held and augmented there); then the same without augmentation, the model's own
ceiling. Figures: training samples/s over ``--epochs`` after one untimed warm-up epoch, and
milliseconds per augmented item alone. On a GPU it also prints the largest difference between
the items augmented on the CPU and on the GPU from the same seed (same random stream; float
rounding only). Defaults: the ``paper`` study preset's image stage (cpu-small networks at 64^3,
batch 8, the 272 fitting crops of a demo fold).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedmets.client.crops import CropDataset
from fedmets.client.training import resolve_device, train_image_model
from fedmets.shared.image_models import build_image_model
from fedmets.shared.image_presets import BACKBONES, IMAGE_PRESETS, at_crop_size
from fedmets.shared.reproducibility import set_seed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_rate(
    images: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
    device: torch.device,
    placement: torch.device,
    augment: bool,
) -> float:
    """Training samples/s of ``--epochs`` epochs on ``device``, crops on ``placement``."""
    cfg = at_crop_size(IMAGE_PRESETS[args.preset], args.crop_voxels)[args.backbone]
    set_seed(args.seed)
    model = build_image_model(cfg)
    data = CropDataset(images, labels, augment=augment, seed=args.seed, device=placement)
    common = {"lr": 1e-4, "pos_weight": 1.0, "seed": args.seed, "device": device}
    train_image_model(model, data, epochs=1, batch_size=args.batch, **common)  # warm-up
    _sync(device)
    tic = time.perf_counter()
    train_image_model(model, data, epochs=args.epochs, batch_size=args.batch, **common)
    _sync(device)
    return len(images) * args.epochs / (time.perf_counter() - tic)


def item_ms(images: np.ndarray, placement: torch.device, seed: int) -> tuple[float, torch.Tensor]:
    """Milliseconds per augmented item on ``placement``, and the items (on the CPU)."""
    CropDataset(images, augment=True, seed=seed, device=placement)[0]  # warm-up: kernels, grids
    data = CropDataset(images, augment=True, seed=seed, device=placement)  # stream from its start
    _sync(placement)
    tic = time.perf_counter()
    items = [data[i][0] for i in range(len(data))]
    _sync(placement)
    seconds = time.perf_counter() - tic
    return 1000 * seconds / len(items), torch.stack([x.cpu() for x in items])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(IMAGE_PRESETS), default="cpu-small")
    parser.add_argument("--crop-voxels", type=int, default=64)
    parser.add_argument("--backbone", choices=BACKBONES, default="swin3d")
    parser.add_argument("--crops", type=int, default=272)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = resolve_device(args.device)
    rng = np.random.default_rng(args.seed)
    side = args.crop_voxels
    images = rng.random((args.crops, 2, side, side, side), dtype=np.float32)
    labels = (np.arange(args.crops) % 4 == 0).astype(np.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
        f"{args.backbone} ({args.preset} at {side}^3), {args.crops} crops, batch {args.batch}, "
        f"{args.epochs} timed epochs on {device}"
    )
    placements = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    augmented = {}
    for placement in placements:
        ms, augmented[placement.type] = item_ms(images[:32], placement, args.seed)
        rate = epoch_rate(images, labels, args, device, placement, augment=True)
        print(f"augmented on {placement.type:4s}: {rate:8.1f} samples/s, {ms:6.2f} ms per item")
    rate = epoch_rate(images, labels, args, device, device, augment=False)
    print(f"no augmentation  : {rate:8.1f} samples/s")
    if len(augmented) == 2:
        gap = (augmented["cpu"] - augmented[device.type]).abs().max().item()
        print(f"largest |cpu - {device.type}| over 32 augmented items: {gap:.2e}")


if __name__ == "__main__":
    main()
