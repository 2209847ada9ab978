"""Sample-level differential privacy at a site: DP-SGD (Opacus) for the site's local training,
accounted in the site's persistent privacy ledger.

:func:`train_private` trains a plain torch model (the image classifier or a fusion network;
neither has BatchNorm) in place with Opacus' ``PrivacyEngine``: Poisson sampling of the rows
(each row joins each step's batch with probability ``sample_rate``), every row's gradient
clipped to ``max_grad_norm`` (L2 over all parameters), Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` added to the summed gradient, then AdamW. What it
protects: any one patient's row of the site's training data (add/remove-one adjacency).

Before any step is taken the site's :class:`fedmets.shared.privacy.PrivacyLedger` (a JSON file on
the site's disk, re-read on every call because the site's process restarts per message) is asked
what epsilon the planned steps would reach, composed with everything the site released under
DP before (every fold, every round, every model, every run that used the same ledger); above
the site's budget, :class:`PrivacyBudgetExceeded` is raised and nothing is trained. After
training the release is recorded: stage, fold, round, mechanism ``"dp-sgd"``, noise
multiplier, sample rate, steps, clipping norm, epsilon after, delta.

Which models: the fusion networks and the ``resnet3d`` and ``densenet3d`` image backbones
(GroupNorm, no in-place residual add: ``fedmets.shared.image_models``). Opacus 1.6 computes
per-sample gradients layer by layer from each layer's input and output, whose first axis must be the
batch; Swin's window attention runs its linear layers on windows folded into that axis (and
holds a buffer next to its own relative-position parameters), so ``swin3d`` cannot be trained
under DP-SGD and a federation config asking for it is refused (``fedmets.shared.config``).

The model Opacus wraps (``GradSampleModule``) names its parameters ``_module.<name>``; the
wrapper is removed after training and :func:`strip_module_prefix` cleans any state dict read
from a wrapped model, so the returned state loads into the plain model.

Training runs in float32 (no autocast): per-sample gradients under mixed precision are not
worth the risk to the clipping bound. The noise and the Poisson sampler draw from torch's
generators (mt19937) seeded with ``seed``: a seeded site's derived seed (reproducible research
runs) or a secure site's draw from the OS's CSPRNG, which sets the whole state
(:func:`seeded_generator`). Opacus' own ``secure_mode`` needs ``torchcsprng``, which has no
build for this torch; docs/privacy.md ("What is NOT covered") says what that leaves.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedmets.shared.privacy import (
    PrivacyBudgetExceeded,
    PrivacyLedger,
    plan_noise_multiplier,
    sample_rate_for,
    steps_per_epoch,
)
from fedmets.shared.reproducibility import set_seed

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

__all__ = [
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "plan_site_noise",
    "seeded_generator",
    "site_ledger",
    "strip_module_prefix",
    "train_private",
]

MECHANISM = "dp-sgd"
WRAPPED_PREFIX = "_module."
LEDGER_DIR = "privacy"


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict of an Opacus-wrapped model with the ``_module.`` prefix removed."""
    return {k.removeprefix(WRAPPED_PREFIX): v for k, v in state.items()}


def site_ledger(
    output: str | Path, site_id: str, delta: float, budget: float | None
) -> PrivacyLedger:
    """The site's ledger, kept in ``<output>/privacy/privacy-ledger.json`` (``output``: the
    site's ``paths.output``): one ledger per site across runs, since every run that trains on
    the same patients spends the same patients' privacy."""
    return PrivacyLedger(Path(output) / LEDGER_DIR, site_id, delta, budget)


def plan_site_noise(
    target_epsilon: float,
    delta: float,
    n: int,
    batch_size: int,
    epochs_per_release: int,
    releases: int,
    ledger: PrivacyLedger | None = None,
) -> float:
    """The noise multiplier for which ``releases`` trainings of ``epochs_per_release`` epochs
    each over ``n`` rows at ``batch_size`` (e.g. folds x rounds x networks), composed after
    what ``ledger`` already holds, end at ``target_epsilon``."""
    steps = releases * epochs_per_release * steps_per_epoch(n, batch_size)
    spent = ledger.history() if ledger is not None else ()
    return plan_noise_multiplier(
        target_epsilon, delta, sample_rate_for(n, batch_size), steps, spent=spent
    )


MT19937_WORDS = 624
_MT19937_OFFSET = 24
"""Where torch's CPU generator state (``Generator.get_state``: ``CPUGeneratorImplStateLegacy``,
5056 bytes) keeps mt19937's 624 state words, one uint64 each: after the initial seed (int64),
``left`` and ``seeded`` (int32 each) and ``next`` (uint64)."""
_CPU_STATE_BYTES = 5056


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` that depends on every bit of ``seed``. torch's CPU
    generator (mt19937) keeps only the low 32 bits of ``manual_seed``: a secure site's 63-bit
    draw would leave the centre 2^32 seeds to try (about 4 us each in torch) to replay DP-SGD's
    noise and Poisson sampling, then subtract the noise (docs/privacy.md). A seed under 2^32
    seeds it as ``manual_seed`` does (a seeded site's runs repeat as before); a larger one sets
    mt19937's whole state (624 words) from ``numpy.random.SeedSequence(seed)``, reproducibly.
    CUDA's generator (Philox) keeps the 64-bit seed. RuntimeError when the CPU generator's
    state is not laid out as expected: no DP-SGD on noise a centre could search."""
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type != "cpu" or 0 <= seed < 2**32:
        return generator.manual_seed(int(seed) % 2**64)
    generator.manual_seed(int(seed) % 2**32)
    state = generator.get_state().numpy().copy()
    words = slice(_MT19937_OFFSET, _MT19937_OFFSET + 8 * MT19937_WORDS)
    if state.size != _CPU_STATE_BYTES or state[words].view(np.uint64)[0] != int(seed) % 2**32:
        raise RuntimeError(
            "torch's CPU generator state is not laid out as fedmets expects: its noise "
            "cannot be seeded with more than 32 bits (see fedmets.client.privacy)"
        )
    entropy = np.random.SeedSequence(int(seed)).generate_state(MT19937_WORDS, np.uint32)
    state[words] = entropy.astype(np.uint64).view(np.uint8)
    generator.set_state(torch.from_numpy(state))
    if not np.array_equal(generator.get_state().numpy()[words], state[words]):
        raise RuntimeError("torch's CPU generator did not take the seeded state")
    return generator


def _dataset(data: Dataset | tuple[np.ndarray, np.ndarray]) -> Dataset:
    if isinstance(data, tuple):
        X, y = data
        return TensorDataset(
            torch.from_numpy(np.asarray(X, dtype=np.float32)),
            torch.from_numpy(np.asarray(y, dtype=np.float32)),
        )
    return data


def train_private(
    model: nn.Module,
    data: Dataset | tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    pos_weight: float,
    seed: int,
    noise_multiplier: float,
    max_grad_norm: float,
    device: torch.device | str = "cpu",
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    ledger: PrivacyLedger | None = None,
    stage: str = "fusion",
    fold: int | None = None,
    round: int | None = None,
    run: str | None = None,
    model_name: str | None = None,
    delta: float = 1e-5,
) -> dict[str, Any]:
    """Train ``model`` ((B, ...) -> (B,) logits) in place with DP-SGD on ``data`` (a Dataset of
    (x, y) pairs, or ``(X, y)`` arrays) for ``epochs`` epochs of ``ceil(n / batch_size)``
    Poisson-sampled steps each (sample rate ``1 / ceil(n / batch_size)``, expected batch
    ``batch_size``), weighted BCE (``pos_weight``) and AdamW (``weight_decay``).

    ``proximal_mu`` > 0 adds FedProx's gradient ``mu * (w - w_start)`` to the noisy gradient
    before each optimiser step (it does not touch the data: no privacy cost).

    With a ``ledger``: PrivacyBudgetExceeded before training when the planned steps would take
    the site over its budget; afterwards the release is recorded (``stage``, ``fold``,
    ``round``, ``run``, ``model_name``).

    Returns the history: ``train_loss`` (per epoch, mean over the rows sampled), ``steps``,
    ``sample_rate``, ``noise_multiplier``, ``max_grad_norm``, ``epsilon`` (the ledger's after
    this release, else this call's alone at ``delta``), ``delta``, ``planned_epsilon``, ``seconds``,
    ``state`` (the trained state dict as numpy arrays, ``_module.`` stripped)."""
    if noise_multiplier <= 0 or max_grad_norm <= 0:
        raise ValueError("DP-SGD needs noise_multiplier > 0 and max_grad_norm > 0")
    started = time.perf_counter()
    device = torch.device(device) if isinstance(device, str) else device
    dataset = _dataset(data)
    n = len(dataset)
    if n < 1:
        raise ValueError("no rows to train on")
    sample_rate = sample_rate_for(n, batch_size)
    planned_steps = int(epochs) * steps_per_epoch(n, batch_size)
    planned = [(float(noise_multiplier), sample_rate, planned_steps)]
    planned_eps = ledger.check(planned) if ledger is not None else None

    set_seed(seed)
    model.to(device).train()
    _no_inplace(model)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loader = DataLoader(dataset, batch_size=batch_size, generator=seeded_generator(seed))
    from opacus import PrivacyEngine  # here: a message without DP-SGD never imports Opacus

    with _quiet():
        engine = PrivacyEngine(accountant="rdp")
        private, dp_optimiser, dp_loader = engine.make_private(
            module=model,
            optimizer=optimiser,
            data_loader=loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            poisson_sampling=True,
            noise_generator=seeded_generator(seed + 1, device),
        )
    if anchor:
        _add_proximal_hook(dp_optimiser, anchor, proximal_mu)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight), device=device))
    history: dict[str, Any] = {"train_loss": []}
    try:
        with _quiet():
            for _ in range(int(epochs)):
                total, count = 0.0, 0
                for x, y in dp_loader:
                    x, y = x.to(device), y.to(device).float()
                    dp_optimiser.zero_grad(set_to_none=True)
                    logits = private(x)
                    loss = loss_fn(logits, y) if len(y) else logits.sum() * 0.0
                    if len(y):
                        total += float(loss.item()) * len(y)
                        count += len(y)
                    loss.backward()
                    _drop_failed_samples(dp_optimiser)
                    dp_optimiser.step()  # an empty batch still takes a (noise-only) step
                history["train_loss"].append(total / max(count, 1))
            steps_taken = sum(s for _, _, s in engine.accountant.history)
            state = {
                k: v.detach().cpu().numpy().copy()
                for k, v in strip_module_prefix(private.state_dict()).items()
            }
    finally:
        private._close()  # hooks and grad_sample attributes off the plain model
    if steps_taken != planned_steps:
        raise RuntimeError(f"DP-SGD took {steps_taken} steps, {planned_steps} were planned")
    history.update(
        steps=steps_taken,
        sample_rate=sample_rate,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        planned_epsilon=planned_eps,
    )
    if ledger is not None:
        entry = ledger.record(
            stage=stage,
            mechanism=MECHANISM,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps_taken,
            max_grad_norm=max_grad_norm,
            fold=fold,
            round=round,
            run=run,
            model=model_name,
        )
        history["epsilon"], history["delta"] = entry["epsilon"], entry["delta"]
    else:
        history["epsilon"] = float(engine.accountant.get_epsilon(delta=delta))
        history["delta"] = delta
    history["state"] = state
    history["seconds"] = time.perf_counter() - started
    return history


def _drop_failed_samples(optimiser: DPOptimizer) -> None:
    """Zero the per-sample gradients (Opacus' ``grad_sample``, (B, *shape) per parameter) of
    every sample whose gradient is not finite in some parameter, before they are clipped.
    Clipping bounds a finite gradient; a NaN or infinite one made the noisy sum, and so every
    weight of the reply, NaN: a network crafted to fail on the patients past a threshold read
    "is anyone past it?" exactly, whatever the noise, at no cost to the budget's accounting
    (docs/privacy.md). Each sample's contribution is now its clipped gradient or zero, decided
    by that sample alone: within the bound DP-SGD's accounting assumes."""
    samples = [g for p in optimiser.params if (g := getattr(p, "grad_sample", None)) is not None]
    if not samples or len(samples[0]) == 0:
        return
    finite = torch.stack([g.reshape(len(g), -1).isfinite().all(dim=1) for g in samples]).all(0)
    if not finite.all():
        for g in samples:
            g[~finite] = 0.0


def _no_inplace(model: nn.Module) -> None:
    """Turn off ``inplace`` of activations and dropouts (MONAI's ResNet uses in-place ReLU):
    Opacus' backward hooks forbid in-place changes of a hooked module's output."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Opacus' expected warnings off: the secure-RNG reminder (documented above) and torch's
    note that the first layer's backward hook fires without input gradients."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _add_proximal_hook(optimiser: DPOptimizer, anchor: list[torch.Tensor], mu: float) -> None:
    """After Opacus has clipped, noised and averaged the gradient (and stepped its accountant),
    add ``mu * (w - w_start)`` to it: FedProx's pull, computed from weights only."""
    accountant_hook = optimiser.step_hook
    params = list(optimiser.params)

    def hook(opt: DPOptimizer) -> None:
        if accountant_hook is not None:
            accountant_hook(opt)
        with torch.no_grad():
            for p, a in zip(params, anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - a, alpha=mu)

    optimiser.step_hook = hook


# ---- the ledger on the wire, and what is not covered ------------------------------------------

ROUTE_STAGES = {
    "query.census": "census",
    "query.folds": "folds",
    "query.moments": "selection",
    "query.combat_statistics": "harmonisation",
    "query.combat_variance": "harmonisation",
    "query.combat_apply": "harmonisation",
    "query.covariance": "selection",
    "query.importance": "selection",
    "train.image": "image",
    "query.validate": "validation",
    "query.deep_features": "deep_features",
    "train.fusion": "fusion",
    "query.train_scores": "threshold",
    "query.evaluation": "evaluation",
    "query.permutation": "importance",
    "query.bundle_evaluation": "evaluation",
}
"""The ledger's stage of each route's release (every route about patients has one)."""

WEIGHTS_PREFIX = "weights:"


def record_release(
    ledger: PrivacyLedger,
    route_name: str,
    request: Mapping[str, Any],
    reply: Mapping[str, Any],
) -> dict[str, Any] | None:
    """List a reply's releases that differential privacy does not cover in ``ledger``: every
    field of a ``query.*`` reply (counts included), and of a ``train.*`` reply every field but
    the weights (DP-SGD weights are recorded by :func:`train_private`; weights trained without
    DP are listed as not covered too, unless ``request["dp_mode"] == "sample"``). Returns the
    entry, or None when nothing was left uncovered."""
    dp = str(request.get("dp_mode", "off")) == "sample"
    fields = sorted(
        k.split(":", 1)[0] + (":*" if ":" in k else "")
        for k in reply
        if not (dp and route_name.startswith("train.") and k.startswith(WEIGHTS_PREFIX))
    )
    fields = sorted(set(fields))
    if not fields:
        return None
    fold = request.get("fold")
    return ledger.record_uncovered(
        stage=ROUTE_STAGES.get(route_name, route_name),
        release=f"{route_name}[{','.join(fields)}]",
        fold=None if fold is None or int(fold) < 0 else int(fold),
        run=None if request.get("run") is None else str(request["run"]),
        patients=int(reply["n"]) if isinstance(reply.get("n"), int) else None,
    )


def ledger_reply(ledger: PrivacyLedger, n: int) -> dict[str, Any]:
    """The ``query.ledger`` reply: ``n`` (the site's patients, COUNT), ``epsilon``, ``delta``
    and ``budget`` (0 = none) as METRIC, and per stage ``epsilon:<stage>`` (METRIC),
    ``releases:<stage>`` and ``uncovered:<stage>`` (COUNT). Epsilon is over the site's whole
    ledger (every run that used it)."""
    summary = ledger.summary()
    reply: dict[str, Any] = {
        "n": int(n),
        "epsilon": float(summary["epsilon"]),
        "delta": float(summary["delta"]),
        "budget": float(summary["budget"] or 0.0),
    }
    for stage, values in summary["stages"].items():
        reply[f"epsilon:{stage}"] = float(values["epsilon"])
        reply[f"releases:{stage}"] = int(values["releases"])
        reply[f"uncovered:{stage}"] = len(values["not_covered"])
    return reply
