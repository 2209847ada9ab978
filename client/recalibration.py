"""`fedmets site recalibrate`: fit a model bundle's risk to this site's own patients, locally.

A model trained elsewhere ranks a site's patients by its risk, but its probabilities may sit too
high or too low there (other case mix, other scanners). Logistic recalibration keeps the ranking
and refits the scale: ``risk' = sigmoid(intercept + slope * logit(risk))``, the slope and
intercept of a logistic regression of the site's labels on the main model's log-odds
(``fedmets.shared.metrics.calibration_slope_intercept``), fitted on every labelled patient of the
site and kept in ``<paths.output>/recalibration.json`` with the bundle's content hash;
``fedmets site predict`` applies it to that bundle only. Nothing is sent.

At a site whose patients trained the bundle (it is one of the bundle's sites), the bundle's
risks of those patients are in-sample: the fit would learn how the model scores its own
training rows. There the risks it is fitted on are the run's out-of-fold ones, which the site
kept (each patient scored by the cross-validation model that did not train on it).

What it reports, on the site's patients: the calibration slope, intercept and Brier score of the
bundle as it is, and of the recalibrated risk **cross-validated** (each patient's recalibrated
risk from a fit on the other folds: an honest estimate, not the in-sample fit that is 1 and 0 by
construction).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from fedmets.client.site_worker import load_site_data
from fedmets.shared.bundle import load_bundle
from fedmets.shared.config import SiteConfig
from fedmets.shared.files import write_json
from fedmets.shared.metrics import calibration_slope_intercept, logit

RECALIBRATION_FILE = "recalibration.json"
MIN_EVENTS = 10
"""Fewest events and non-events a recalibration is fitted on."""
CV_FOLDS = 5


def apply(risk: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Recalibrated probabilities (n,) of ``risk`` (n,)."""
    return 1 / (1 + np.exp(-(intercept + slope * logit(risk))))


def _summary(y: np.ndarray, risk: np.ndarray) -> dict[str, float | None]:
    fitted = calibration_slope_intercept(y, risk)
    slope, intercept = fitted if fitted is not None else (None, None)
    return {"slope": slope, "intercept": intercept, "brier": float(np.mean((risk - y) ** 2))}


def recalibrate(cfg: SiteConfig, model_dir: Path, seed: int = 0) -> dict:
    """Fit the recalibration of the bundle in ``model_dir`` on the labelled patients of
    ``cfg`` (out-of-fold risks at a site that trained it); write and return it (``slope``,
    ``intercept``, ``fitted_on``, ``bundle_sha256``, ``model``, ``patients``, ``events``,
    ``before`` and ``after_cross_validated`` calibration). ValueError with fewer than
    :data:`MIN_EVENTS` events or non-events."""
    bundle = load_bundle(model_dir)
    if cfg.site_id in bundle.manifest.get("per_site", {}):
        fitted_on, risk, y = _out_of_fold_risk(cfg, bundle.manifest)
    else:
        fitted_on, risk, y = "bundle", *_bundle_risk(cfg, model_dir)
    events = int(y.sum())
    if min(events, len(y) - events) < MIN_EVENTS:
        raise ValueError(
            f"{cfg.site_id}: {events} events among {len(y)} labelled patients: recalibration "
            f"needs at least {MIN_EVENTS} events and {MIN_EVENTS} non-events"
        )
    slope, intercept = calibration_slope_intercept(y, risk)
    if slope <= 0:
        raise ValueError(
            f"{cfg.site_id}: calibration slope {slope:.3f}: the model ranks this site's patients "
            "no better than chance or backwards; recalibration cannot fix that"
        )
    crossed = np.empty_like(risk)
    folds = StratifiedKFold(min(CV_FOLDS, events), shuffle=True, random_state=seed)
    for train, test in folds.split(risk, y):
        fold_slope, fold_intercept = calibration_slope_intercept(y[train], risk[train])
        crossed[test] = apply(risk[test], fold_slope, fold_intercept)
    result = {
        "bundle_sha256": bundle.digest(),
        "model": bundle.manifest["main_model"],
        "slope": slope,
        "intercept": intercept,
        "fitted_on": fitted_on,
        "patients": int(len(y)),
        "events": events,
        "before": _summary(y, risk),
        "after_cross_validated": _summary(y, crossed),
    }
    write_json(cfg.paths.output / RECALIBRATION_FILE, result, indent=1)
    return result


def _bundle_risk(cfg: SiteConfig, model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's main-model risks (n,) of the site's labelled patients and their labels (n,)."""
    from fedmets.client.predict import predict_site

    data = load_site_data([cfg])
    table = predict_site(cfg, model_dir, recalibrated=False).set_index("patient_id")
    return table.loc[data.ids, "risk"].to_numpy(), data.labels.astype(int)


def _out_of_fold_risk(cfg: SiteConfig, manifest: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """("out-of-fold <run>", the main model's out-of-fold risks (n,), labels (n,)) of the site's
    labelled patients that the bundle's run scored out of fold; ValueError when the site kept
    none of them (the run's state removed)."""
    from fedmets.client.site_worker import SiteWorker

    run, main = str(manifest["run"]), str(manifest["main_model"])
    worker = SiteWorker([cfg])
    fold, scores = worker.out_of_fold(run, [main], int(manifest["federation"]["cv"]["folds"]))
    kept = (fold >= 0) & np.isfinite(scores[main])
    if not kept.any():
        raise ValueError(
            f"{cfg.site_id}: this site trained the bundle of run {run!r} but keeps none of that "
            "run's out-of-fold scores; fitted on its own training patients' risks, the "
            "recalibration would be in-sample"
        )
    return f"out-of-fold {run}", scores[main][kept], worker.data.labels[kept].astype(int)


def site_recalibration(site_output: Path, bundle_sha256: str) -> dict | None:
    """The site's recalibration (kept in its ``paths.output``) of the bundle with content hash
    ``bundle_sha256``, or None (none fitted, or fitted for another bundle)."""
    path = Path(site_output) / RECALIBRATION_FILE
    if not path.is_file():
        return None
    fitted = json.loads(path.read_text(encoding="utf-8"))
    return fitted if fitted.get("bundle_sha256") == bundle_sha256 else None
