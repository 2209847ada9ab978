"""The run results as typed models (``metrics.json`` of ``fedmets simulate`` and of ``fedmets
study``), and turning protocol results into JSON.

``simulate`` and ``study`` validate what they write with :class:`SimulationResults` and
:class:`StudyResults`; the report validates what it reads (``fedmets.server.report.loading``).
A key that is not declared here is an error, so the writers and the reader cannot drift apart.
Free-form records (the census, each fold's selection and curves, the privacy ledger, the
federation settings) stay plain dicts: their shape is the protocol's and the config's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict


def to_jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars turned into lists and Python numbers (NaN ->
    None), recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def typed(model: type[BaseModel], results: dict) -> dict:
    """``results`` checked against ``model`` (pydantic ValidationError naming each key that is
    missing, undeclared or of the wrong type), back as the same plain JSON dict."""
    return model.model_validate(results).model_dump(mode="json", exclude_unset=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(_Strict):
    """Reliability curve: per non-empty bin the observed DM rate, the mean probability and the
    patient count."""

    prob_true: list[float]
    prob_pred: list[float]
    counts: list[int]


class RocPoints(_Strict):
    """ROC points (false and true positive rates)."""

    fpr: list[float]
    tpr: list[float]


class Metrics(_Strict):
    """One model's results on one set of patients (pooled, a site, a subsite, a fold): counts,
    AUC with its 95% DeLong CI (None under two patients of a class, ``auc_note`` says why),
    ACC/SEN/SPE at the fold thresholds, Brier; optional parts by where they appear."""

    n: int
    positives: int
    sites: int | None = None  # protocol results: sites that released this
    auc: float | None
    auc_ci: tuple[float, float] | None
    auc_note: str | None = None
    acc: float | None
    sen: float | None
    spe: float | None
    brier: float | None
    calibration: Calibration | None = None
    roc: RocPoints | None = None
    oracle_auc: float | None = None  # study: the true risk's AUC on the same patients
    fold: int | None = None  # study, per fold
    threshold: float | None = None  # study, per fold
    calibration_slope: float | None = None  # held-out sites: logistic recalibration fit
    calibration_intercept: float | None = None


class ModelResults(_Strict):
    """One model of a protocol run: pooled, per site and per subsite (None: not released)."""

    pooled: Metrics | None
    per_site: dict[str, Metrics | None] = {}
    per_subsite: dict[str, Metrics | None] = {}


class ProtocolSummary(_Strict):
    """A protocol run in ``metrics.json`` (federated, centralised): the main model's pooled and
    per-site metrics up front, every model below, each fold's record, the main model's
    permutation importance and seconds per stage."""

    pooled: Metrics | None
    per_site: dict[str, Metrics | None]
    models: dict[str, ModelResults]
    folds: list[dict[str, Any]]
    selection_stability: dict[str, Any] | None = None  # protocol.selection_stability
    importance: dict[str, Any] | None = None
    timing_s: dict[str, float]


class LocalOnly(_Strict):
    """Each site alone: the main model per site, every model per site, seconds, and the sites
    too small to train alone (why)."""

    per_site: dict[str, Metrics | None]
    models: dict[str, dict[str, ModelResults]] = {}
    timing_s: dict[str, dict[str, float]] = {}
    not_run: dict[str, str] = {}


class HeldOut(_Strict):
    """The final model trained without ``held_out`` and validated at each of them: its
    cross-validated pooled metrics on the training sites, each held-out site's metrics and the
    held-out sites pooled."""

    training_sites: list[str]
    held_out: list[str]
    main_model: str
    cross_validated: Metrics | None
    per_site: dict[str, Metrics | None]
    pooled: Metrics | None
    bundle: str
    seconds: float


class LeaveOneSiteOut(_Strict):
    """Each site held out in turn: its metrics, every held-out release pooled, and each run."""

    main_model: str
    per_site: dict[str, Metrics | None]
    pooled: Metrics | None
    runs: dict[str, HeldOut]


class SimulationResults(_Strict):
    """``fedmets simulate``'s ``metrics.json`` (and the report's input)."""

    config: dict[str, Any]
    oracle_auc: float | None = None
    main_model: str | None = None
    federated: ProtocolSummary
    census: dict[str, dict[str, Any]] = {}
    dropouts: list[dict[str, Any]] = []
    privacy_ledger: dict[str, Any] | None = None
    centralized: ProtocolSummary | None = None
    local_only: LocalOnly | None = None
    ablation: dict[str, dict[str, Metrics | None]] | None = None
    baselines: dict[str, dict[str, Any]] | None = None  # logistic: the plain model beside
    site_effect: dict[str, Any] | None = None  # simulation.site_effect: site AUC before/after
    holdout: HeldOut | None = None
    loso: LeaveOneSiteOut | None = None
    timing_s: dict[str, float] = {}
    dp: dict[str, Any] | None = None  # a deployed run's server output: its DP settings
    run: str | None = None  # a deployed run's name
    backbone: str | None = None  # a deployed run's image backbone
    secure_aggregation: bool | None = None  # a deployed run: its rounds went through SecAgg+
    model: dict[str, Any] | None = None  # a deployed run: its bundle's path and rounds
    app_sha256: str | None = None  # the app bundle that ran the federated run (app digest)


class PairedTest(_Strict):
    """DeLong's test of two correlated AUCs: difference (first - second), its 95% CI, p."""

    auc_difference: float
    ci: tuple[float, float]
    p: float


class StudyModel(_Strict):
    """One model of the study: exact pooled, per-subsite and per-fold metrics, and its paired
    tests against its single groups, against itself without the radiomics and against the
    other backbones."""

    pooled: Metrics
    per_subsite: dict[str, Metrics]
    per_fold: list[Metrics]
    versus_single_groups: dict[str, PairedTest] = {}
    versus_without_radiomics: dict[str, PairedTest] = {}
    versus_other_backbones: dict[str, PairedTest] = {}


class StudyProtocolRun(_Strict):
    """One protocol run of the study (per backbone): its histogram-pooled results."""

    run: str
    main_model: str
    models: dict[str, ModelResults]
    folds: list[dict[str, Any]]
    importance: dict[str, Any] | None
    timing_s: dict[str, float]


class StudyResults(_Strict):
    """``fedmets study``'s ``metrics.json``."""

    config: dict[str, Any]
    oracle_auc: float | None
    oracle_auc_used: float | None
    models: dict[str, StudyModel]
    thresholds: dict[str, list[float]]
    protocol: dict[str, StudyProtocolRun]
    timing_s: dict[str, Any]
