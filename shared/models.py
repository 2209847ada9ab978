"""The fusion network of the study (stage 3) and how its networks' scores make each model's.

:class:`FusionNet`, a fully connected network on the concatenation of the feature groups it was
built for, in the order of ``FUSION_GROUPS``; the models' and networks' names are in
``fedmets.shared.model_names``, the image classifiers in ``fedmets.shared.image_models``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from fedmets.shared.model_names import (
    FUSION_GROUPS,
    FusionMode,
    base_model,
    model_groups,
    single_group_models,
)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
