"""Scoring a site's patients with given models: the feature groups a fusion network reads, the
image model's settings and the networks themselves. One code path for the federated protocol's
site worker (``fedmets.client.site_worker``) and for applying a model bundle
(``fedmets.client.predict``), so a bundle scores a patient exactly as the run did."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmets.client.training import set_state
from fedmets.shared.model_names import FUSION_GROUPS, network_dims, network_hidden
from fedmets.shared.models import FusionNet

if TYPE_CHECKING:
    from fedmets.client.site_worker import SiteData
    from fedmets.shared.image_presets import ImageModelConfig


def image_config(settings: Mapping[str, Any]) -> ImageModelConfig:
    """The image model of ``settings`` (``backbone``, ``image_preset``, ``mask_channel``):
    the preset's network with one input channel per image (CT, and the mask unless "none")."""
    from fedmets.shared.image_presets import IMAGE_PRESETS, ImageModelConfig

    cfg = IMAGE_PRESETS[str(settings["image_preset"])][str(settings["backbone"])]
    channels = 1 if settings["mask_channel"] == "none" else 2
    return ImageModelConfig.model_validate({**cfg.model_dump(), "in_channels": channels})


def standardised_groups(
    data: SiteData,
    standardise: Mapping[str, Any],
    deep: np.ndarray | None,
    radiomics_columns: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The feature groups of every patient (n rows), float32: radiomics (n, k), the columns
    ``radiomics_columns`` (default ``standardise["radiomics_columns"]``: indices into the
    site's columns) standardised by the pooled mean and scale, missing values at the mean (0);
    clinical (n, q) standardised, when the site has it and ``standardise`` holds its
    statistics; deep (n, c) from the image model's features ``deep`` (n, D), centred and
    projected (``deep_projection``) or scaled, when given."""
    columns = np.asarray(
        standardise["radiomics_columns"] if radiomics_columns is None else radiomics_columns,
        dtype=int,
    )
    X = data.radiomics.to_numpy()[:, columns]
    z = (X - standardise["radiomics_mean"]) / standardise["radiomics_scale"]
    groups = {"radiomics": _bounded(np.where(np.isnan(z), 0.0, z))}
    if data.clinical is not None and "clinical_mean" in standardise:
        C = data.clinical.to_numpy()
        groups["clinical"] = _bounded(
            (C - standardise["clinical_mean"]) / standardise["clinical_scale"]
        )
    if deep is not None and "deep_mean" in standardise:
        centred = deep - standardise["deep_mean"]
        if "deep_projection" in standardise:
            groups["deep"] = _bounded(centred @ standardise["deep_projection"])
        else:
            groups["deep"] = _bounded(centred / standardise["deep_scale"])
    return groups


INPUT_BOUND = 1e6
"""Largest standardised input a network gets (in SDs): the centre's mean and scale are any
finite numbers, and one that overflowed float32 for the patients past a threshold would make
the request fail for them alone (a yes/no answer about their values)."""


def _bounded(values: np.ndarray) -> np.ndarray:
    """``values`` (float64, any shape) clipped to +/- INPUT_BOUND, as float32 (NaN stays)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.clip(values, -INPUT_BOUND, INPUT_BOUND).astype(np.float32)


def load_networks(
    states: Mapping[str, Mapping[str, np.ndarray]],
    groups: Mapping[str, np.ndarray],
    settings: Mapping[str, Any],
) -> dict[str, tuple[FusionNet, np.ndarray]]:
    """Each network (name -> state dict) as (the loaded FusionNet, its input matrix (n, F) from
    ``groups``); ``settings``: ``hidden``, ``dropout``, ``group_dropout``. A variant network
    (``fedmets.shared.model_names.network_variant``) has its own hidden widths and reads the first
    (top-ranked) of the radiomics columns only."""
    networks = {}
    for name, state in states.items():
        widths = {g: groups[g].shape[1] for g in FUSION_GROUPS if g in groups}
        net = FusionNet(
            network_dims(name, widths),
            hidden=network_hidden(name, np.atleast_1d(settings["hidden"])),
            dropout=float(settings["dropout"]),
            group_dropout=float(settings.get("group_dropout", 0.0)),
        )
        set_state(net, state)
        inputs = [groups[g][:, : net.group_dims[g]] for g in net.input_groups]
        networks[name] = (net, np.concatenate(inputs, axis=1))
    return networks
