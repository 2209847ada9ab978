"""The fusion network of the study (stage 3) and the names of its models.

:class:`FusionNet`, a fully connected network on the concatenation of the feature groups it was
built for, in the order of :data:`FUSION_GROUPS`; a model of the study is keyed by its image
backbone and its groups (:func:`model_key`). The image classifiers are in
``fedmets.shared.image_models``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


FUSION_GROUPS: tuple[str, ...] = ("deep", "radiomics", "clinical")
"""Feature groups the fusion network can take, in the order they are concatenated."""


NO_IMAGE = "none"
"""Backbone part of the key of a model without deep features (``"none/radiomics"``)."""


def model_key(backbone: str | None, groups: Sequence[str]) -> str:
    """``"<backbone>/<group>+<group>"``, e.g. ``"swin3d/deep+radiomics+clinical"``,
    ``"none/clinical"``."""
    return f"{backbone or NO_IMAGE}/{'+'.join(groups)}"


def group_subsets() -> list[tuple[str, ...]]:
    """Every non-empty subset of :data:`FUSION_GROUPS` (singles, pairs, all): the ablations."""
    return [c for k in range(1, 4) for c in combinations(FUSION_GROUPS, k)]


FusionMode = Literal["joint", "late"]
"""How a model of several feature groups is built: ``"joint"``, one fusion network on the
concatenated groups (feature-level fusion, the seed paper's); ``"late"``, the mean of the
logits of its single-group models (decision-level fusion, nothing more trained)."""

MEMBER_MARK = "~"
"""Separates a model key from an ensemble member's number: ``"none/radiomics~2"``."""

VARIANT_MARK = "#"
"""Separates a model key from a variant of its network (a candidate the protocol chooses
among on inner validation, :func:`variant_name`): ``"none/radiomics+clinical#r12#h16-8"``."""


@dataclass(frozen=True)
class Variant:
    """A network's own architecture, where it differs from the run's: ``radiomics``, how many
    of the top-ranked selected radiomics columns it reads (0: no radiomics group; None: all);
    ``hidden``, its hidden widths (``()``: none, a logistic model; None: the run's)."""

    radiomics: int | None = None
    hidden: tuple[int, ...] | None = None


def variant_name(model: str, radiomics: int, hidden: Sequence[int]) -> str:
    """The network name of ``model`` reading its top ``radiomics`` selected columns through
    hidden layers ``hidden``: ``"<model>#r<k>#h<w1>-<w2>"`` (``#h`` alone: no hidden layer)."""
    widths = "-".join(str(int(w)) for w in hidden)
    return f"{model}{VARIANT_MARK}r{int(radiomics)}{VARIANT_MARK}h{widths}"


def network_variant(name: str) -> Variant:
    """The :class:`Variant` a network name declares (ValueError for a malformed one)."""
    radiomics, hidden = None, None
    for part in name.split(MEMBER_MARK, 1)[0].split(VARIANT_MARK)[1:]:
        widths = part[1:].split("-") if part[1:] else []
        if part[:1] == "r" and part[1:].isdigit():
            radiomics = int(part[1:])
        elif part[:1] == "h" and all(w.isdigit() for w in widths):
            hidden = tuple(int(w) for w in widths)
        else:
            raise ValueError(f"network {name!r}: {part!r} is not a variant (r<k> or h<widths>)")
    return Variant(radiomics, hidden)


def network_hidden(name: str, hidden: Sequence[int]) -> list[int]:
    """The hidden widths of network ``name``: its variant's own, else the run's ``hidden``."""
    own = network_variant(name).hidden
    return [int(w) for w in (hidden if own is None else own)]


def base_model(name: str) -> str:
    """The model key a network name belongs to (without member number or variant)."""
    return name.split(MEMBER_MARK, 1)[0].split(VARIANT_MARK, 1)[0]


def model_groups(key: str) -> tuple[str, ...]:
    """The feature groups of a model key or of a network name (a member, a variant: ``#r0``
    reads no radiomics)."""
    groups = tuple(base_model(key).split("/", 1)[1].split("+"))
    if network_variant(key).radiomics == 0:
        groups = tuple(g for g in groups if g != "radiomics")
    return groups


def network_dims(name: str, dims: Mapping[str, int]) -> dict[str, int]:
    """The input width of each group network ``name`` reads, in :data:`FUSION_GROUPS` order,
    from the run's widths ``dims`` (its variant's radiomics width where it declares one)."""
    used = model_groups(name)
    radiomics = network_variant(name).radiomics
    return {
        g: (radiomics if g == "radiomics" and radiomics is not None else int(dims[g]))
        for g in FUSION_GROUPS
        if g in used
    }


def single_group_models(key: str) -> list[str]:
    """The single-group models of a model key (the deep one of its backbone):
    ``"swin3d/deep+clinical"`` -> ``["swin3d/deep", "none/clinical"]``."""
    backbone = key.split("/", 1)[0]
    return [model_key(backbone if g == "deep" else None, (g,)) for g in model_groups(key)]


def fusion_networks(models: Sequence[str], fusion: FusionMode, members: int) -> list[str]:
    """The networks that train for ``models``: each model that is trained (every one when
    ``fusion`` is ``"joint"``; with ``"late"``, the single-group models the others need),
    ``members`` times, member 0 under the model key and member m as ``key~m``; all member 0s
    first, so that one member trains exactly what a run without ensembles trains."""
    trained = list(models)
    if fusion == "late":
        needed = [s for m in models for s in single_group_models(m)]
        trained = list(dict.fromkeys(m for m in [*models, *needed] if len(model_groups(m)) == 1))
    return [k if m == 0 else f"{k}{MEMBER_MARK}{m}" for m in range(members) for k in trained]


def combine_scores(
    network_scores: Mapping[str, np.ndarray], models: Sequence[str], fusion: FusionMode
) -> dict[str, np.ndarray]:
    """Each model's DM probabilities (n,) from its networks' (``fusion_networks`` names ->
    (n,)): the mean probability of a model's members (a variant network counts for its
    model, :func:`base_model`); with ``fusion="late"`` a model of several
    groups is the sigmoid of the mean logit of its single-group models (probabilities clipped to
    [1e-7, 1 - 1e-7] first, so that a saturated member stays finite)."""
    ensembles: dict[str, list[np.ndarray]] = {}
    for name, scores in network_scores.items():
        ensembles.setdefault(base_model(name), []).append(np.asarray(scores))
    means = {k: np.mean(v, axis=0) for k, v in ensembles.items()}
    out = {}
    for key in models:
        if fusion == "late" and len(model_groups(key)) > 1:
            logits = [
                np.log(p / (1 - p))
                for p in (np.clip(means[s], 1e-7, 1 - 1e-7) for s in single_group_models(key))
            ]
            out[key] = 1 / (1 + np.exp(-np.mean(logits, axis=0)))
        else:
            out[key] = means[key]
    return out


class FusionNet(nn.Module):
    """Fully connected network: (B, F) -> (B,) DM logits, F = the summed widths of
    ``input_groups``. Each hidden layer is Linear -> LayerNorm (``norm="layer"``) or nothing
    (``norm="none"``) -> ReLU -> Dropout.

    ``group_dropout`` guards against one group swamping the others on a small cohort: in
    training mode only, each group of each sample is replaced by zeros (the training mean of
    standardised inputs: "this group is missing") with this probability, so the network cannot
    lean on one group alone (modality dropout). No effect with a single group or in eval mode.
    """

    def __init__(
        self,
        group_dims: Mapping[str, int],
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.2,
        norm: Literal["layer", "none"] = "layer",
        group_dropout: float = 0.0,
    ) -> None:
        """``group_dims``: the width of each group used (a subset of :data:`FUSION_GROUPS`)."""
        super().__init__()
        unknown = sorted(set(group_dims) - set(FUSION_GROUPS))
        if unknown or not group_dims:
            raise ValueError(f"group_dims needs groups among {FUSION_GROUPS}, got {unknown}")
        if any(width < 1 for width in group_dims.values()):
            raise ValueError(f"every group needs a width >= 1, got {dict(group_dims)}")
        if not 0 <= group_dropout < 1:
            raise ValueError(f"group_dropout must be in [0, 1), got {group_dropout}")
        self.input_groups = tuple(g for g in FUSION_GROUPS if g in group_dims)
        self.group_dims = {g: int(group_dims[g]) for g in self.input_groups}
        self.group_dropout = float(group_dropout)
        layers: list[nn.Module] = []
        width = sum(self.group_dims.values())
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if norm == "layer":
                layers.append(nn.LayerNorm(size))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def concat(self, groups: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate this network's groups (each (B, width)) in order -> (B, F); groups it
        was not built for are ignored."""
        missing = [g for g in self.input_groups if g not in groups]
        if missing:
            raise ValueError(f"missing feature groups {missing}")
        for g in self.input_groups:
            if groups[g].shape[-1] != self.group_dims[g]:
                raise ValueError(
                    f"group {g!r} has width {groups[g].shape[-1]}, expected {self.group_dims[g]}"
                )
        return torch.cat([groups[g] for g in self.input_groups], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B,) logits."""
        if not (self.training and self.group_dropout > 0 and len(self.group_dims) > 1):
            return self.net(x).squeeze(-1)
        parts = list(torch.split(x, list(self.group_dims.values()), dim=-1))
        keep = torch.rand(x.shape[0], len(parts), device=x.device) >= self.group_dropout
        parts = [p * keep[:, i : i + 1].to(p.dtype) for i, p in enumerate(parts)]
        return self.net(torch.cat(parts, dim=-1)).squeeze(-1)


def positive_class_weight(labels: np.ndarray | Sequence[int]) -> float:
    """``pos_weight`` for ``BCEWithLogitsLoss``: negatives / positives among 0/1 ``labels``
    (the ratio of scikit-learn's "balanced" class weights); both classes must occur."""
    y = np.asarray(labels)
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    return float(weights[1] / weights[0])


def input_blocks(group_dims: Mapping[str, int], clinical_columns: Sequence[str]) -> list[tuple]:
    """The fusion input's blocks for permutation importance, as (name, column indices) in the
    concatenation order of :class:`FusionNet`: each radiomics column (``radiomics:<i>``, i its
    rank among the selected columns), each clinical variable (its encoded columns together,
    ``clinical:<variable>``), the deep features as one block (``deep``)."""
    from fedmets.shared.clinical import encoded_variable

    blocks, start = [], 0
    for group in (g for g in FUSION_GROUPS if g in group_dims):
        width = int(group_dims[group])
        if group == "radiomics":
            blocks += [(f"radiomics:{i}", [start + i]) for i in range(width)]
        elif group == "clinical":
            variables: dict[str, list[int]] = {}
            for i, column in enumerate(clinical_columns):
                variables.setdefault(encoded_variable(column), []).append(start + i)
            blocks += [(f"clinical:{v}", cols) for v, cols in variables.items()]
        else:
            blocks.append(("deep", list(range(start, start + width))))
        start += width
    return blocks
