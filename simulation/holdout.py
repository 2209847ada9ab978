"""Held-out-site validation (`fedmets simulate --holdout SITE[,SITE] | --loso`): how the model
does at a hospital that did not train it.

The federation is trained without the held-out sites, in process (the protocol's very code over
``InProcessLink``): cross-validation, selection and round choice inside the training sites only,
then the final model (``[stages] final_model``) and its bundle. Each held-out site applies the
bundle to its own patients and releases only what a site's evaluation releases
(``fedmets.client.predict.evaluate_bundle``: grouped score histograms, confusion counts at the
bundle's threshold, the Brier sum, the calibration slope and intercept); the metrics come from
those releases as the protocol's do (``fedmets.server.protocol.metrics_from_replies``).
``--loso`` does it for each site in turn and pools the held-out releases (each site's scores
from the model trained without it). A deployment does the same in one run with ``[federation]
held_out``: the held-out sites check their census with the others, train nothing, keep the
bundle and answer ``query.bundle_evaluation`` with these releases
(``fedmets.server.bundle.evaluate_held_out``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedmets.client.predict import evaluate_bundle
from fedmets.client.site_worker import SiteWorker
from fedmets.server.bundle import held_out_metrics, write_bundle
from fedmets.server.protocol import FederatedProtocol
from fedmets.shared.config import FederationConfig, SiteConfig
from fedmets.simulation.in_process import InProcessLink


def held_out_validation(
    configs: Sequence[SiteConfig],
    fed: FederationConfig,
    held_out: Sequence[str],
    out: Path,
    log: Callable[[str], None] | None = None,
) -> tuple[dict, dict[str, dict]]:
    """Train on the sites of ``configs`` not in ``held_out`` (bundle in ``out/model``) and
    evaluate the final model at each held-out site: (the result: training and held-out sites,
    main model, its cross-validated pooled metrics on the training sites, per held-out site and
    pooled held-out metrics, seconds; the held-out sites' releases)."""
    started = time.perf_counter()
    unknown = sorted(set(held_out) - {c.site_id for c in configs})
    if unknown:
        raise ValueError(f"held-out sites not in the cohort: {', '.join(unknown)}")
    training = [c for c in configs if c.site_id not in held_out]
    if len(training) < fed.federation.min_sites:
        raise ValueError(
            f"{len(training)} training sites without {', '.join(held_out)}; min_sites is "
            f"{fed.federation.min_sites}"
        )
    state = Path(out) / "state"
    workers = {
        c.site_id: SiteWorker([c], state_root=state / c.site_id, ledger_root=state / c.site_id)
        for c in training
    }
    settings = fed.model_dump(mode="json")
    settings["strategy"]["secure_aggregation"] = False  # in process: aggregated in clear
    settings["stages"]["final_model"] = True
    cfg = FederationConfig.model_validate(settings)
    run = f"{fed.run.name}-holdout"
    result = FederatedProtocol(
        InProcessLink(workers), cfg, run, log, privacy_dir=state / "server-privacy"
    ).run_all()
    if result["final"] is None:
        raise ValueError("no final model (not trained under DP): nothing to validate")
    bundle = write_bundle(Path(out) / "model", result, cfg)
    bins = cfg.evaluation.histogram_bins
    replies = {
        c.site_id: evaluate_bundle(c, bundle, bins) for c in configs if c.site_id in held_out
    }
    main = result["main_model"]
    summary = {
        "training_sites": sorted(workers),
        "held_out": sorted(held_out),
        "main_model": main,
        "cross_validated": result["models"][main]["pooled"],
        **held_out_metrics(replies, main, bins),
        "bundle": str(bundle),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return summary, replies


def leave_one_site_out(
    configs: Sequence[SiteConfig],
    fed: FederationConfig,
    out: Path,
    log: Callable[[str], None] = print,
) -> dict:
    """:func:`held_out_validation` for each site in turn (``out/<site>/``): per held-out site
    its metrics and the cross-validated pooled metrics of the model trained without it, and
    the held-out releases of every site pooled."""
    per_site, runs, releases = {}, {}, []
    for cfg in configs:
        log(f"leave-one-site-out: without {cfg.site_id}")
        summary, replies = held_out_validation(configs, fed, [cfg.site_id], Path(out) / cfg.site_id)
        per_site[cfg.site_id] = summary["per_site"][cfg.site_id]
        runs[cfg.site_id] = summary
        releases.append(replies[cfg.site_id])
        log(f"  {cfg.site_id}: held-out AUC {_auc(per_site[cfg.site_id])}")
    main = next(iter(runs.values()))["main_model"]
    bins = fed.evaluation.histogram_bins
    return {
        "main_model": main,
        "per_site": per_site,
        "pooled": held_out_metrics(dict(enumerate(releases)), main, bins)["pooled"],
        "runs": runs,
    }


def _auc(metrics: dict | None) -> str:
    if not metrics or metrics["auc"] is None:
        return "n/a"
    low, high = metrics["auc_ci"] or (float("nan"), float("nan"))
    return f"{metrics['auc']:.3f} [{low:.3f}, {high:.3f}]"
