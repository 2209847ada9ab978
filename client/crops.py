"""Model inputs from a site's cached crops, with MONAI transforms.

Crops are the ``crop.npz`` files of ``fedmets.client.extract`` (arrays (z, y, x): ``ct`` int16 HU,
``tumour`` and ``ring`` uint8 0/1). :func:`load_crops` turns them into model inputs
(n, C, S, S, S) float32: channel 0 the CT clipped to ``hu_window`` and scaled to [0, 1];
channel 1 (unless ``mask_channel="none"``) the ring or tumour mask; the cube resized
(``fit="resize"``: the whole crop, trilinear, masks become partial-volume fractions) or
centre-cropped (``fit="crop"``: native voxels, zero-padded if smaller) to S = ``crop_voxels``.
:class:`CropDataset` serves them to ``fedmets.client.training``, with light, seeded augmentation
(flips, small affine) on training data, on the training device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    ConcatItemsd,
    RandAffine,
    RandFlip,
    Resized,
    ScaleIntensityRanged,
    SpatialPadd,
)
from torch.utils.data import Dataset

MaskChannel = Literal["ring", "tumour", "none"]
Fit = Literal["resize", "crop"]

HU_WINDOW: tuple[float, float] = (-200.0, 300.0)
"""Default CT window (HU) mapped to [0, 1]: fat (~ -100 HU) through enhancing tumour and vessels
(~ 50-250 HU); air and bone saturate at 0 and 1."""


def _read_crop(path: str | Path, mask_channel: MaskChannel) -> dict[str, np.ndarray]:
    """One crop.npz -> {"ct": (1, z, y, x) float32 HU[, "mask": (1, z, y, x) float32 0/1]}."""
    with np.load(path) as crop:
        item = {"ct": crop["ct"][None].astype(np.float32)}
        if mask_channel != "none":
            item["mask"] = crop[mask_channel][None].astype(np.float32)
    return item


def crop_transform(
    crop_voxels: int,
    mask_channel: MaskChannel = "ring",
    hu_window: tuple[float, float] = HU_WINDOW,
    fit: Fit = "resize",
) -> Compose:
    """The deterministic MONAI pipeline: a crop.npz path -> float32 (C, S, S, S), C = 1 or 2."""
    keys = ["ct"] if mask_channel == "none" else ["ct", "mask"]
    size = (crop_voxels,) * 3
    if fit == "resize":
        shape = [Resized(keys, size, mode="trilinear", anti_aliasing=False)]
    else:
        shape = [CenterSpatialCropd(keys, size), SpatialPadd(keys, size, value=0.0)]
    return Compose(
        [
            lambda path: _read_crop(path, mask_channel),
            ScaleIntensityRanged("ct", *hu_window, 0.0, 1.0, clip=True),
            *shape,
            ConcatItemsd(keys, "image", dim=0),
            lambda item: np.asarray(item["image"], dtype=np.float32),
        ]
    )


def load_crops(
    paths: Sequence[str | Path],
    crop_voxels: int,
    mask_channel: MaskChannel = "ring",
    hu_window: tuple[float, float] = HU_WINDOW,
    fit: Fit = "resize",
) -> np.ndarray:
    """Model inputs of every crop in ``paths``: float32 (n, C, S, S, S), S = ``crop_voxels``,
    C = 1 (CT) or 2 (CT + ``mask_channel``); see :func:`crop_transform`. ValueError for a crop
    with fewer than S voxels along an axis under ``fit="resize"``: upsampling adds no context,
    so a model that reads S^3 needs crops extracted at S^3 (``[preprocess] crop_voxels``)."""
    transform = crop_transform(crop_voxels, mask_channel, hu_window, fit)
    channels = 1 if mask_channel == "none" else 2
    images = np.empty((len(paths), channels, *(crop_voxels,) * 3), dtype=np.float32)
    for i, path in enumerate(paths):
        if fit == "resize":
            with np.load(path) as crop:
                shape = crop["ct"].shape
            if min(shape) < crop_voxels:
                raise ValueError(
                    f"{path}: the crop is {'x'.join(map(str, shape[::-1]))} voxels, smaller than"
                    f" the {crop_voxels}^3 the image model reads; extract the site with"
                    f" [preprocess] crop_voxels = [{crop_voxels}, {crop_voxels}, {crop_voxels}]"
                    " (upsampling a crop adds no context)"
                )
        images[i] = transform(path)
    return images


class CropDataset(Dataset):
    """Crops (n, C, S, S, S) float32 with labels (n,) 0/1 (or None for unlabelled extraction).

    With ``augment``, each item is flipped along each axis with probability 0.5 and, with
    probability 0.5, rotated (up to 15 degrees about each axis), scaled (up to 10%) and shifted
    (up to 2 voxels) by MONAI's ``RandFlip``/``RandAffine`` (border padding), from a stream
    seeded by ``seed``: read in the same order (``num_workers=0``), the same items come out.
    The crops are held, and augmented, on ``device``: give the training device (``cuda``) so a
    GPU is not left waiting on the CPU's resampling; the random stream is the same on any
    device. Items are (C, S, S, S) float32 on ``device`` and a CPU label."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        augment: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.images = torch.as_tensor(images, device=device)  # on the CPU: no copy
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        self.augment = None
        if augment:
            self.augment = Compose(
                [
                    *(RandFlip(prob=0.5, spatial_axis=axis) for axis in range(3)),
                    RandAffine(
                        prob=0.5,
                        rotate_range=(np.pi / 12,) * 3,
                        scale_range=(0.1,) * 3,
                        translate_range=(2,) * 3,
                        padding_mode="border",
                        device=torch.device(device),
                    ),
                ]
            ).set_random_state(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.augment is not None:
            x = torch.as_tensor(self.augment(x), dtype=torch.float32)
        y = torch.tensor(np.nan if self.labels is None else self.labels[i])
        return x, y
