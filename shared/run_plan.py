"""What a run trains and what it asks of a site, from its federation config alone: the models
and networks every fold trains (the ServerApp's plan, ``fedmets.server.protocol``), and the
request settings that a site's ``[policy]`` bounds (``fedmets site approve`` checks them against
the policy before it records a run, so that a run the site would refuse mid-way is not
approved). Both sides import it, so the plan the centre follows and the one a hospital reviews
are the same code."""

from __future__ import annotations

from typing import Any

from fedmets.shared import wire
from fedmets.shared.config import FederationConfig
from fedmets.shared.model_names import (
    NO_IMAGE,
    fusion_networks,
    group_subsets,
    model_groups,
    model_key,
    variant_name,
)

IMPORTANCE_REPEATS = 3
"""Permutations of each input block per patient in ``query.permutation``."""


def main_model(models: list[str]) -> str:
    """The model of the headline numbers: every group fused (the last, widest key)."""
    return max(models, key=lambda k: (len(model_groups(k)), k.startswith(NO_IMAGE)))


def planned_models(cfg: FederationConfig, images: bool, clinical: bool) -> list[str]:
    """The models every fold evaluates: each subset of the input groups the sites have
    (radiomics always; clinical when ``clinical``; deep features of ``[model] backbone`` when
    ``images``: the run trains the image stage); under DP without ``dp.ablation`` the main
    model alone."""
    groups = ("radiomics",) + (("clinical",) if clinical else ())
    models = [model_key(None, s) for s in group_subsets() if set(s) <= set(groups)]
    if images:
        models += [
            model_key(cfg.model.backbone, s)
            for s in group_subsets()
            if "deep" in s and set(s) - {"deep"} <= set(groups)
        ]
    if cfg.dp.mode != "off" and not cfg.dp.ablation:
        models = [main_model(models)]
    return models


def main_candidates(cfg: FederationConfig, main: str) -> list[str]:
    """The variant networks the main model chooses among (``[model] main_radiomics`` x
    ``main_hidden``, either defaulting to the run's setting), or [] when neither is set.
    A 0-radiomics variant of a radiomics-only model is left out (it would read nothing)."""
    model = cfg.model
    if not (model.main_radiomics or model.main_hidden):
        return []
    widths = model.main_radiomics or [cfg.selection.top_k]
    hiddens = model.main_hidden or [model.fusion_hidden]
    names = [variant_name(main, k, h) for k in widths for h in hiddens]
    return [n for n in names if model_groups(n)]


def planned_networks(cfg: FederationConfig, models: list[str]) -> list[str]:
    """The fusion networks every fold trains for ``models``: each trained model's members
    (``fusion_networks``), the main model's network replaced by its candidates when
    ``[model] main_*`` sets any."""
    networks = fusion_networks(models, cfg.model.fusion, cfg.model.fusion_members)
    main = main_model(models)
    candidates = main_candidates(cfg, main)
    if candidates:
        networks = [n for n in networks if n != main] + candidates
    return networks


POLICY_FIELDS = ("batch", "epochs", "lr", "trees", "resamples", "repeats", "bins", "hidden")
"""The request fields a run's config sets and a site's ``[policy]`` bounds
(``fedmets.client.policy.check_request``), besides ``folds``, ``dp_mode`` and the networks'
``weights:`` keys."""


def policy_requests(
    cfg: FederationConfig, images: bool, clinical: bool, held_out: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """(route, request) pairs holding every setting of ``cfg`` that a site's policy bounds,
    as the run sends them when ``images`` (the image stage runs) and ``clinical`` (every site
    has clinical data): the folds, the
    forest ranking's trees, the training settings, the histogram bins, the permutation
    repeats, DP's mode and each network a request carries (its ``weights:`` key, value None).
    A ``held_out`` site (``[federation] held_out``) is asked only for its evaluation of the
    final model's bundle. Not a request the site could answer: its data-dependent fields are
    left out."""
    model, bins = cfg.model, {"bins": cfg.evaluation.histogram_bins}
    dp = {"dp_mode": cfg.dp.mode}
    if held_out:
        return [("query.bundle_evaluation", {**bins, **dp})]
    models = planned_models(cfg, images, clinical)
    networks = planned_networks(cfg, models)
    weights = dict.fromkeys(wire.WEIGHTS_PREFIX + n for n in networks)
    importance: dict[str, Any] = {"trees": cfg.selection.rf_trees}
    if cfg.selection.ranking == "stability":
        importance["resamples"] = cfg.selection.stability_resamples
    fusion = {"hidden": list(model.fusion_hidden), **dp, **weights}
    requests = [
        ("query.folds", {"folds": cfg.cv.folds}),
        ("query.importance", importance),
        (
            "train.fusion",
            {
                **fusion,
                "epochs": cfg.stages.fusion_local_epochs,
                "lr": model.fusion_lr,
                "batch": model.fusion_batch,
            },
        ),
        ("query.train_scores", {**fusion, **bins}),
        ("query.evaluation", {**bins, **dp}),
    ]
    main = main_model(models)
    if main in networks or main_candidates(cfg, main):  # late fusion's may be no network
        requests.append(("query.permutation", {**fusion, "repeats": IMPORTANCE_REPEATS}))
    if cfg.dp.mode == "off":  # under DP no round is chosen on validation
        requests.append(("query.validate", {**fusion, **bins}))
    if images:
        image = {
            "epochs": cfg.stages.local_epochs,
            "lr": model.image_lr,
            "batch": model.image_batch,
        }
        requests.append(("train.image", {**image, **dp}))
    return requests
