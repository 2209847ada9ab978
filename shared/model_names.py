"""The names of the study's models and networks, without torch: a model is keyed by its image
backbone and its feature groups (:func:`model_key`, ``"swin3d/deep+radiomics+clinical"``); a
network name adds an ensemble member (``~m``) or an architecture variant (``#r<k>#h<widths>``).
The run's plan (``fedmets.shared.run_plan``) and a hospital's approval of it read these alone;
the fusion network itself is ``fedmets.shared.models``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

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
