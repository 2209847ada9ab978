"""Site-side training building blocks: image-model training, deep-feature extraction and
fusion-network training.

Everything here takes and returns plain torch modules, numpy arrays and state dicts: the site
loads the global weights with :func:`set_state`, trains a round with :func:`train_image_model` or
:func:`train_fusion` and sends :func:`get_state` back.

Image models train on ``fedmets.client.crops.CropDataset`` (the site's crops as model inputs); this
module itself never imports MONAI, so fusion-only work stays light.

Training is seeded (``fedmets.shared.reproducibility.set_seed``, a seeded DataLoader generator and a
seeded augmentation stream), uses AdamW and ``BCEWithLogitsLoss(pos_weight)``, runs under
``torch.autocast`` on CUDA only (bfloat16 where supported, else float16 with a GradScaler). A
round trains its epochs; which round is kept is the protocol's choice, on the pooled
inner-validation rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.special import expit
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    TensorDataset,
)

from fedmets.shared.reproducibility import set_seed

if TYPE_CHECKING:
    from fedmets.client.memory import MemoryPlan

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


# ---- training ----------------------------------------------------------------------------------


def _fit(
    model: nn.Module,
    train: Dataset,
    epochs: int,
    lr: float,
    pos_weight: float,
    seed: int,
    device: torch.device,
    batch_size: int,
    weight_decay: float,
    proximal_mu: float = 0.0,
    micro_batch: int | None = None,
) -> dict:
    """Shared loop: AdamW + weighted BCE (plus FedProx's ``proximal_mu / 2 * ||w - w_start||^2``
    when ``proximal_mu`` > 0) for ``epochs``. Returns the history: ``train_loss`` per epoch
    (mean weighted BCE per sample), ``last_scores`` and ``last_labels`` (n,) the DM
    probabilities the model gave its samples during the last epoch and their labels (every
    sample is seen once per epoch, in :class:`WholeBatches`), ``epochs_run`` and ``seconds``.
    Which round's weights are kept is the protocol's choice, on the pooled inner-validation
    rows.

    ``micro_batch`` < ``batch_size``: gradient accumulation. Each batch of ``batch_size``
    samples (the same batches as without) goes through the model in chunks of at most
    ``micro_batch``, each chunk's loss weighted by its share of the batch, and the optimiser
    steps once per batch: the same update up to floating-point rounding (the networks have no
    BatchNorm, so no layer mixes the samples of a batch)."""
    started = time.perf_counter()
    set_seed(seed)
    model.to(device)
    generator = torch.Generator().manual_seed(seed)  # the loader's worker seed, then the order
    loader = DataLoader(
        train, batch_sampler=WholeBatches(len(train), batch_size, generator), generator=generator
    )
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight), device=device))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    autocast, scaler = _autocast(device)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    history: dict = {"train_loss": []}
    for _ in range(epochs):
        model.train()
        total, count, scores, labels = 0.0, 0, [], []
        for x_batch, y_batch in loader:
            optimiser.zero_grad(set_to_none=True)
            summed, probs = _backward(
                model, x_batch, y_batch, loss_fn, autocast, scaler, micro_batch, anchor, proximal_mu
            )
            total += summed
            count += len(y_batch)
            scores.append(probs)
            labels.append(y_batch.numpy())
            scaler.step(optimiser)
            scaler.update()
        history["train_loss"].append(total / max(count, 1))
    history["last_scores"] = np.concatenate(scores) if epochs else np.zeros(0)
    history["last_labels"] = np.concatenate(labels) if epochs else np.zeros(0)
    history["epochs_run"] = len(history["train_loss"])
    history["seconds"] = time.perf_counter() - started
    return history


class WholeBatches(Sampler[list[int]]):
    """Each epoch, the indices ``0..n-1`` shuffled by ``generator`` (as ``DataLoader(shuffle=True,
    generator=...)`` draws them) in batches of ``batch_size``, with a lone last index put into
    the batch before it (a one-sample step is noise). Every sample is trained on: a reply is
    computed on exactly the rows the site's policy admitted it on (dropping one would let a
    centre difference two replies, one batch size apart, down to that patient)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.batches = BatchSampler(
            RandomSampler(range(n), generator=generator), batch_size, drop_last=False
        )

    def __iter__(self) -> Iterator[list[int]]:  # a generator: drawn on the first batch asked
        batches = list(self.batches)
        if len(batches) > 1 and len(batches[-1]) == 1:
            lone = batches.pop()
            batches[-1] = batches[-1] + lone
        yield from batches

    def __len__(self) -> int:
        n, size = len(self.batches.sampler), self.batches.batch_size
        return max(1, n // size) if n % size == 1 else -(-n // size)


def _backward(
    model: nn.Module,
    x_batch: torch.Tensor,
    y_batch: torch.Tensor,
    loss_fn: nn.Module,
    autocast: torch.autocast,
    scaler: torch.amp.GradScaler,
    micro_batch: int | None = None,
    anchor: list[torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> tuple[float, np.ndarray]:
    """Accumulate into the parameters' ``.grad`` the gradient of one batch's mean loss (plus
    the proximal term against ``anchor``), passing the batch (B, ...) through the model in
    chunks of at most ``micro_batch`` samples, each chunk's loss weighted by its share of the
    batch. Returns the batch's summed loss (without the proximal term) and its DM
    probabilities (B,)."""
    device = next(model.parameters()).device
    summed, probs = 0.0, []
    chunk = micro_batch or len(y_batch)
    for x, y in zip(x_batch.split(chunk), y_batch.split(chunk), strict=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        summed += loss.item() * len(y)
        probs.append(torch.sigmoid(logits.detach().float()).cpu().numpy().reshape(-1))
        if anchor:
            pairs = zip(model.parameters(), anchor, strict=True)
            drift = sum(((p - a) ** 2).sum() for p, a in pairs)
            loss = loss + proximal_mu / 2 * drift
        scaler.scale(loss * len(y) / len(y_batch)).backward()
    return summed, np.concatenate(probs)


def train_image_model(
    model: nn.Module,
    dataset: Dataset,
    epochs: int,
    lr: float,
    pos_weight: float,
    seed: int,
    device: torch.device | str = "auto",
    batch_size: int = 8,
    weight_decay: float = 1e-4,
    proximal_mu: float = 0.0,
    memory: MemoryPlan | None = None,
) -> dict:
    """Train an image classifier ((B, C, S, S, S) -> (B,) logits) in place on ``dataset``
    (augmenting or not, as built) for ``epochs``. ``proximal_mu`` > 0 adds FedProx's pull
    towards the starting (global) weights. ``memory``
    (``fedmets.client.memory.plan_image_training``): micro-batches with gradient accumulation
    and activation checkpointing that fit a memory budget, with the same effective batch
    ``batch_size``. Returns the history (``_fit``)."""
    device = resolve_device(device) if isinstance(device, str) else device
    if memory is not None:  # an ImageClassifier (fedmets.shared.image_models)
        model.checkpoint_activations(memory.checkpointing)
    try:
        return _fit(
            model,
            dataset,
            epochs,
            lr,
            pos_weight,
            seed,
            device,
            batch_size,
            weight_decay,
            proximal_mu=proximal_mu,
            micro_batch=None if memory is None else memory.micro_batch,
        )
    finally:
        if memory is not None:
            model.checkpoint_activations(False)


@torch.no_grad()
def extract_deep_features(
    model: nn.Module,
    dataset: Dataset,
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
    batch_size: int = 32,
    weight_decay: float = 1e-4,
    device: torch.device | str = "cpu",
    proximal_mu: float = 0.0,
) -> dict:
    """Train a fusion network ((B, F) -> (B,) logits) in place on ``X`` (n, F) float32 (already
    scaled) and 0/1 ``y`` (n,) for ``epochs``, on one CPU thread. ``proximal_mu`` > 0 adds
    FedProx's pull towards the starting weights. Returns the history (``_fit``)."""
    device = resolve_device(device) if isinstance(device, str) else device
    data = TensorDataset(
        torch.from_numpy(np.asarray(X, dtype=np.float32)),
        torch.from_numpy(np.asarray(y, dtype=np.float32)),
    )
    with _one_cpu_thread(device):
        return _fit(
            model, data, epochs, lr, pos_weight, seed, device, batch_size, weight_decay, proximal_mu
        )


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
    return expit(logits.astype(np.float64))
