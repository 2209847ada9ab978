"""Site-side training building blocks: the crop dataset, image-model training, deep-feature
extraction and fusion-network training.

Everything here takes and returns plain torch modules, numpy arrays and state dicts, so that the
centralised study (``simulation.study``) and the federated client run the same code: the client
loads the global weights with :func:`set_state`, trains a round with :func:`train_image_model`
or :func:`train_fusion` and sends :func:`get_state` back.

Crops are the ``crop.npz`` files of ``client.extract`` (arrays (z, y, x): ``ct`` int16 HU,
``tumour`` and ``ring`` uint8 0/1). :func:`load_crops` turns them into model inputs
(n, C, S, S, S) float32 with MONAI transforms: channel 0 the CT clipped to ``hu_window`` and
scaled to [0, 1]; channel 1 (unless ``mask_channel="none"``) the ring or tumour mask; the cube
resized (``fit="resize"``: the whole crop, trilinear, masks become partial-volume fractions) or
centre-cropped (``fit="crop"``: native voxels, zero-padded if smaller) to S = ``crop_voxels``.
:class:`CropDataset` adds light, seeded augmentation (flips, small affine) on training data.

Training is seeded (``shared.reproducibility.set_seed``, a seeded DataLoader generator and a
seeded augmentation stream), uses AdamW and ``BCEWithLogitsLoss(pos_weight)``, runs under
``torch.autocast`` on CUDA only (bfloat16 where supported, else float16 with a GradScaler), and
stops early on an inner validation set when one is given: the weights of the epoch with the
lowest validation loss are kept.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
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
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from shared.reproducibility import set_seed

MaskChannel = Literal["ring", "tumour", "none"]
Monitor = Literal["loss", "auc"]
Fit = Literal["resize", "crop"]

HU_WINDOW: tuple[float, float] = (-200.0, 300.0)
"""Default CT window (HU) mapped to [0, 1]: fat (~ -100 HU) through enhancing tumour and vessels
(~ 50-250 HU); air and bone saturate at 0 and 1."""


# ---- device and state --------------------------------------------------------------------------


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as torch reads it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def get_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (copied, on the CPU)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load a state dict of numpy arrays (as :func:`get_state` returns) into ``model``."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})


def _autocast(device: torch.device) -> tuple[torch.autocast, torch.amp.GradScaler]:
    """Mixed precision on CUDA only: bfloat16 if the GPU has it (no scaler needed), else
    float16 with a GradScaler; on CPU both are disabled."""
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and not bf16)
    return torch.autocast(device.type, dtype=dtype, enabled=cuda), scaler


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch on one CPU thread inside the block (CPU only): a small fully connected net
    gains nothing from more, and on a busy machine extra threads slow it down ten-fold."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- crops -------------------------------------------------------------------------------------


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
    C = 1 (CT) or 2 (CT + ``mask_channel``); see :func:`crop_transform`."""
    transform = crop_transform(crop_voxels, mask_channel, hu_window, fit)
    channels = 1 if mask_channel == "none" else 2
    images = np.empty((len(paths), channels, *(crop_voxels,) * 3), dtype=np.float32)
    for i, path in enumerate(paths):
        images[i] = transform(path)
    return images


class CropDataset(Dataset):
    """Crops (n, C, S, S, S) float32 with labels (n,) 0/1 (or None for unlabelled extraction).

    With ``augment``, each item is flipped along each axis with probability 0.5 and, with
    probability 0.5, rotated (up to 15 degrees about each axis), scaled (up to 10%) and shifted
    (up to 2 voxels) by MONAI's ``RandFlip``/``RandAffine`` (border padding), from a stream
    seeded by ``seed``: read in the same order (``num_workers=0``), the same items come out."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.images = images
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
                    ),
                ]
            ).set_random_state(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.images[i])
        if self.augment is not None:
            x = torch.as_tensor(self.augment(x), dtype=torch.float32)
        y = torch.tensor(np.nan if self.labels is None else self.labels[i])
        return x, y


# ---- training ----------------------------------------------------------------------------------


def _fit(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None,
    epochs: int,
    lr: float,
    pos_weight: float,
    seed: int,
    device: torch.device,
    batch_size: int,
    weight_decay: float,
    patience: int | None,
    monitor: Monitor = "loss",
    proximal_mu: float = 0.0,
) -> dict:
    """Shared loop: AdamW + weighted BCE (plus FedProx's ``proximal_mu / 2 * ||w - w_start||^2``
    when ``proximal_mu`` > 0) for ``epochs`` (or until ``patience`` epochs without a
    better validation score: lower loss, or with ``monitor="auc"`` higher AUC, ties going to
    the earlier epoch, the loss deciding where the AUC is undefined); restores the best
    validation epoch's weights when ``val`` is given. Returns the history (per-epoch losses,
    validation AUC, best epoch, seconds)."""
    started = time.perf_counter()
    set_seed(seed)
    model.to(device)
    loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(train) % batch_size == 1,  # no lone-sample batch: a noisy step
    )
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight), device=device))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    autocast, scaler = _autocast(device)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    history: dict = {"train_loss": [], "val_loss": [], "val_auc": [], "best_epoch": None}
    best_score, best_state, waited = np.inf, None, 0
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimiser.zero_grad(set_to_none=True)
            with autocast:
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            total += loss.item() * len(y)
            count += len(y)
            if anchor:
                pairs = zip(model.parameters(), anchor, strict=True)
                drift = sum(((p - a) ** 2).sum() for p, a in pairs)
                loss = loss + proximal_mu / 2 * drift
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        history["train_loss"].append(total / max(count, 1))
        if val is None:
            continue
        logits, labels = _logits(model, val, device, batch_size)
        val_loss = float(
            loss_fn(torch.from_numpy(logits).to(device), torch.from_numpy(labels).to(device))
        )
        history["val_loss"].append(val_loss)
        both = 0 < labels.sum() < len(labels)
        history["val_auc"].append(float(roc_auc_score(labels, logits)) if both else None)
        score = -history["val_auc"][-1] if monitor == "auc" and both else val_loss
        if score < best_score:
            best_score, best_state, waited = score, copy.deepcopy(model.state_dict()), 0
            history["best_epoch"] = epoch + 1
        else:
            waited += 1
            if patience is not None and waited >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        history["best_epoch"] = len(history["train_loss"])
    history["epochs_run"] = len(history["train_loss"])
    history["seconds"] = time.perf_counter() - started
    return history


@torch.no_grad()
def _logits(
    model: nn.Module, data: Dataset, device: torch.device, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode logits (n,) float32 and labels (n,) of ``data``, in order."""
    model.eval()
    autocast, _ = _autocast(device)
    out, labels = [], []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        with autocast:
            out.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(out).numpy(), torch.cat(labels).numpy()


def train_image_model(
    model: nn.Module,
    dataset: CropDataset,
    epochs: int,
    lr: float,
    pos_weight: float,
    seed: int,
    device: torch.device | str = "auto",
    val_dataset: CropDataset | None = None,
    batch_size: int = 8,
    weight_decay: float = 1e-4,
    patience: int | None = None,
    proximal_mu: float = 0.0,
) -> dict:
    """Train an image classifier ((B, C, S, S, S) -> (B,) logits) in place on ``dataset``
    (augmenting or not, as built). With ``val_dataset`` (unaugmented, from the training rows
    only) the best-validation-loss weights are kept and ``patience`` stops early.
    ``proximal_mu`` > 0 adds FedProx's pull towards the starting (global) weights.

    Returns ``{"train_loss": [...], "val_loss": [...], "val_auc": [...], "best_epoch",
    "epochs_run", "seconds"}`` (losses are mean weighted BCE per sample)."""
    device = resolve_device(device) if isinstance(device, str) else device
    return _fit(
        model,
        dataset,
        val_dataset,
        epochs,
        lr,
        pos_weight,
        seed,
        device,
        batch_size,
        weight_decay,
        patience,
        proximal_mu=proximal_mu,
    )


@torch.no_grad()
def extract_deep_features(
    model: nn.Module,
    dataset: CropDataset,
    device: torch.device | str = "auto",
    batch_size: int = 16,
) -> np.ndarray:
    """Pooled encoder features (``model.deep_features``) of every item, in order, in eval mode:
    float32 (n, D). Build ``dataset`` without augmentation."""
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device).eval()
    autocast, _ = _autocast(device)
    out = []
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with autocast:
            out.append(model.deep_features(x.to(device)).float().cpu())
    return torch.cat(out).numpy()


def train_fusion(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    pos_weight: float,
    seed: int,
    val_fraction: float = 0.2,
    patience: int | None = 20,
    batch_size: int = 32,
    weight_decay: float = 1e-4,
    device: torch.device | str = "cpu",
    monitor: Monitor = "loss",
    proximal_mu: float = 0.0,
) -> dict:
    """Train a fusion network ((B, F) -> (B,) logits) in place on ``X`` (n, F) float32 (already
    scaled) and 0/1 ``y`` (n,). A stratified ``val_fraction`` of the rows (drawn with ``seed``)
    is held out for early stopping (the epoch with the best validation ``monitor``, loss or
    AUC, is kept; ``patience`` epochs); 0 trains on every row for ``epochs``. Returns the
    history as :func:`train_image_model`, plus ``val_rows`` (indices into X of the held-out
    rows). ``proximal_mu`` > 0 adds FedProx's pull towards the starting weights."""
    device = resolve_device(device) if isinstance(device, str) else device
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    rows = np.arange(len(y))
    val_rows = np.array([], dtype=int)
    if val_fraction > 0:
        rows, val_rows = train_test_split(
            rows, test_size=val_fraction, stratify=y, random_state=seed
        )

    def tensors(index: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(X[index]), torch.from_numpy(y[index]))

    val = tensors(val_rows) if len(val_rows) else None
    with _one_cpu_thread(device):
        history = _fit(
            model,
            tensors(rows),
            val,
            epochs,
            lr,
            pos_weight,
            seed,
            device,
            batch_size,
            weight_decay,
            patience,
            monitor,
            proximal_mu,
        )
    history["val_rows"] = np.sort(val_rows).tolist()
    return history


@torch.no_grad()
def predict_proba(
    model: nn.Module, X: np.ndarray, device: torch.device | str = "cpu"
) -> np.ndarray:
    """DM probabilities (n,) float64 of a fusion network on ``X`` (n, F), in eval mode."""
    device = resolve_device(device) if isinstance(device, str) else device
    X = np.asarray(X, dtype=np.float32)
    data = TensorDataset(torch.from_numpy(X), torch.zeros(len(X)))
    with _one_cpu_thread(device):
        logits, _ = _logits(model.to(device), data, device, batch_size=1024)
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
