"""Writing the model bundle (``<run output>/model/``, format ``fedmets.shared.bundle``): the final
federated model as a hospital applies it to its next patient (``fedmets site predict``), with what
it needs and what it was shown to do. Written atomically (a temporary folder renamed into place),
then sent to every site to keep (:func:`deliver_bundle`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmets.server.protocol import metrics_from_replies
from fedmets.server.results import to_jsonable
from fedmets.shared import wire
from fedmets.shared.bundle import (
    BUNDLE_FORMAT,
    STANDARDISE_ARRAYS,
    THRESHOLD_RULE,
    load_bundle,
    save_bundle,
)
from fedmets.shared.clinical import encoded_columns
from fedmets.shared.config import FederationConfig

if TYPE_CHECKING:
    from fedmets.server.protocol import SiteLink


def write_bundle(out: Path, result: dict, cfg: FederationConfig) -> Path:
    """Write the bundle of a protocol result (``FederatedProtocol.run_all`` with its
    ``final`` model) into ``out`` (replaced when it exists); return ``out``."""
    final = result["final"]
    census = result["census"]
    reference = census[min(census)]
    standardise = final["standardise"]
    names = reference["radiomics_names"]
    selected = [str(names[int(i)]) for i in standardise["radiomics_columns"]]
    arrays = {k: np.asarray(v) for k, v in standardise.items() if k in STANDARDISE_ARRAYS}
    combat = final.get("combat")
    for name, value in (combat or {}).items():  # the pooled ComBat fit of the selected columns
        arrays[f"combat_{name}"] = np.asarray(value)
    for parameter, value in (final["image"] or {}).items():
        arrays[f"image/{parameter}"] = np.asarray(value)
    for network, state in final["fusion"].items():
        for parameter, value in state.items():
            arrays[f"fusion/{network}/{parameter}"] = np.asarray(value)
    settings = cfg.model_dump(mode="json")
    model = cfg.model
    events = [c.get("positives") for c in census.values()]
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "fedmets": version("fedmets"),
            "protocol": wire.PROTOCOL_VERSION,
            "torch": version("torch"),
        },
        "run": result["run"],
        "config_fingerprint": cfg.fingerprint(),
        "federation": settings,
        "mode": reference["mode"],
        "schema_hash": reference["schema_hash"],
        "params_hash": reference["params_hash"],
        "radiomics_features": selected,
        "clinical_columns": encoded_columns() if "clinical_mean" in standardise else [],
        "harmonisation": final["record"]["selection"].get("harmonisation") or {"method": "none"},
        "image": None
        if final["image"] is None
        else {
            "backbone": model.backbone,
            "image_preset": model.image_preset,
            "mask_channel": model.mask_channel,
        },
        "fusion": {
            "mode": model.fusion,
            "networks": list(final["fusion"]),
            "hidden": list(model.fusion_hidden),
            "dropout": model.fusion_dropout,
            "group_dropout": model.fusion_group_dropout,
            "dims": final["dims"],
        },
        "main_model": result["main_model"],
        "models": list(final["record"]["thresholds"]),
        "thresholds": final["record"]["thresholds"],
        "threshold_rule": THRESHOLD_RULE,
        "rounds": final["rounds"],
        "cross_validated": {name: entry["pooled"] for name, entry in result["models"].items()},
        "per_site": result["models"][result["main_model"]].get("per_site") or {},
        "subgroups": result["models"][result["main_model"]].get("per_subsite") or {},
        "cohort": {
            "sites": len(census),
            "patients": int(sum(c["n"] for c in census.values())),
            "events": None if None in events else int(sum(events)),
        },
    }
    return save_bundle(out, json.loads(json.dumps(to_jsonable(manifest))), arrays)


def deliver_bundle(link: SiteLink, model_dir: Path, run: str, say: Callable[[str], None]) -> dict:
    """Send the bundle in ``model_dir`` to every site of ``link`` in a final message
    (``query.model_bundle``): each keeps it under ``<paths.output>/model/`` and replies the
    hash of what it stored. Returns site -> ``"stored"`` (the hash is the bundle's),
    ``"differs"`` or ``"not stored"`` (no reply); a site that did not store it does not fail
    the finished run."""
    bundle = load_bundle(model_dir)
    request = {
        "run": run,
        "manifest": json.dumps(bundle.manifest),
        "weights:bundle": bundle.arrays,
    }
    sites = link.sites()
    replies = link.ask("query.model_bundle", {site: request for site in sites})
    expected = bundle.digest()
    outcome = {}
    for site in sites:
        if site not in replies:
            outcome[site] = "not stored"
        else:
            stored = replies[site].get("bundle_sha256")
            outcome[site] = "stored" if stored == expected else "differs"
    say(
        f"model bundle {expected[:12]} sent to the sites: "
        + ", ".join(f"{site} {state}" for site, state in sorted(outcome.items()))
    )
    return outcome


def evaluate_held_out(
    link: SiteLink,
    model_dir: Path,
    result: dict,
    cfg: FederationConfig,
    say: Callable[[str], None],
) -> dict:
    """Ask the held-out sites (``[federation] held_out``), which kept the bundle in
    ``model_dir``, for their evaluation of it (``query.bundle_evaluation``): the training and
    held-out sites, the main model, its cross-validated pooled metrics (``result``'s, the
    training sites'), per held-out site and pooled held-out metrics (:func:`held_out_metrics`)."""
    started = time.perf_counter()
    bins = cfg.evaluation.histogram_bins
    request = {
        "run": result["run"],
        "min_patients": cfg.federation.min_patients,
        "bins": bins,
        "dp_mode": cfg.dp.mode,
    }
    present = [s for s in cfg.federation.held_out if s in link.sites()]
    replies = link.ask("query.bundle_evaluation", {site: request for site in present})
    main = result["main_model"]
    summary = {
        "training_sites": sorted(result["census"]),
        "held_out": sorted(replies),
        "main_model": main,
        "cross_validated": result["models"][main]["pooled"],
        **held_out_metrics(replies, main, bins),
        "bundle": str(model_dir),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for site in sorted(set(cfg.federation.held_out) - set(replies)):
        say(f"held-out site {site}: no evaluation (not connected, or it refused)")
    for site, metrics in sorted(summary["per_site"].items()):
        auc = "n/a" if not metrics or metrics["auc"] is None else f"{metrics['auc']:.3f}"
        say(f"held-out site {site}: AUC {auc} (the final model, trained without it)")
    return summary


def held_out_metrics(replies: Mapping[str, dict], model: str, bins: int) -> dict:
    """From held-out sites' releases (``fedmets.client.predict.evaluate_bundle``): ``per_site``
    metrics of ``model`` with each site's calibration slope and intercept, and ``pooled``."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    per_site = {}
    for site, reply in replies.items():
        metrics = metrics_from_replies([reply], model, edges, with_calibration=True)
        if metrics is not None and f"calibration:{model}" in reply:
            slope, intercept = (float(v) for v in reply[f"calibration:{model}"])
            metrics |= {"calibration_slope": slope, "calibration_intercept": intercept}
        per_site[site] = metrics
    pooled = metrics_from_replies(list(replies.values()), model, edges) if replies else None
    return {"per_site": per_site, "pooled": pooled}
