"""`fedmets study`: the centralised reference study of the seed paper, and the baseline the
federated system must match -- the federated protocol itself (``fedmets.server.protocol``) over
one in-process site that holds every patient, exactly as ``fedmets simulate``'s centralised
baseline (``fedmets.simulation.in_process.run_in_process``), plus what only pooled data allows.

Input: a cohort folder of site configs (``COHORT/*/site.toml``; a site whose
``features.parquet`` is missing is extracted first with its own config), pooled in one
``SiteWorker`` where each patient keeps its own site's fold; or one feature table CSV (tabular
mode: radiomics and clinical columns, no images), read as a tabular site reads it.

Everything fitted is fitted on training folds only, by the protocol: per fold the pooled
selection (constant columns, correlation filter, random-forest ranking), the image model and
its deep-feature projection, one fusion network per feature-group subset (the ablations;
``[model] fusion_members`` networks each for ensembles, ``[model] fusion = "late"`` for
decision-level fusion) and each model's Youden threshold on its training rows.

What the study adds, from the pooled worker's out-of-fold scores (read in process,
``SiteWorker.out_of_fold``; in a federation they never leave a site):

- exact pooled metrics (AUC with its DeLong 95% CI, ACC/SEN/SPE at each patient's own fold's
  threshold, Brier, calibration), per fold and per subsite, beside the oracle AUC of a synthetic
  cohort's true risk on the same patients;
- several image backbones: the protocol runs once per backbone (the models without deep features
  are the first run's: the same folds, selection and seeds give the same networks in every run);
  the first backbone against each other one, and each model of several groups against its
  single-group models, by DeLong's paired test;
- ``OUT/metrics.json``, ``OUT/oof_predictions.csv`` and PNG figures (``roc.png``,
  ``calibration.png``, ``ablation.png``); each protocol run's own (histogram-pooled) results
  are kept in ``metrics.json`` under ``protocol``.

Repeat ``k`` (``fedmets study --repeats``; ``fedmets.simulation.repeated_study``) redraws every
site's folds from its config seed + ``k`` and trains with run seed + ``k``; repeat 0 keeps the
sites' own folds, those of the federated run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from fedmets.client.memory import lane_budget_bytes
from fedmets.client.site_worker import SiteNotReady, SiteWorker
from fedmets.server.protocol import ProtocolError
from fedmets.server.report.figures import (
    COLOURS,
    Figures,
    auc_axis,
    auc_interval,
    calibration_axes,
    new_figure,
    reliability_curve,
    roc_axes,
)
from fedmets.server.results import StudyResults, to_jsonable, typed
from fedmets.shared.config import FederationConfig, SiteConfig
from fedmets.shared.metrics import binary_metrics, calibration, delong_paired_test
from fedmets.shared.model_names import (
    FUSION_GROUPS,
    NO_IMAGE,
    model_groups,
    model_key,
    single_group_models,
)
from fedmets.simulation.in_process import FoldPool, run_in_process
from fedmets.simulation.simulate import extract_missing, site_configs

STATE_DIR = "state"
"""``OUT/state``: the pooled worker's run state (folds, deep features, held-out scores)."""


# ---- sites -------------------------------------------------------------------------------------


@dataclass
class StudySites:
    """What the study pools: the site configs (``source`` the cohort folder or table), the
    synthetic cohort's ground truth when present (``oracle``: oracle.json; ``true_risk``:
    patient id -> true risk) and notes for the reader."""

    source: str
    mode: str  # "cohort" | "table"
    configs: list[SiteConfig]
    oracle: dict | None = None
    true_risk: pd.Series | None = None
    notes: list[str] = field(default_factory=list)


def cohort_sites(
    cohort: Path, workers: int | None = None, say: Callable[[str], None] | None = None
) -> StudySites:
    """The sites of ``cohort`` (``*/site.toml``, sorted), each extracted first when its
    ``features.parquet`` is missing (its progress and left-out patients told to ``say``), and
    the cohort's ground truth (``ground_truth/``)."""
    sites = StudySites(str(cohort), "cohort", site_configs(cohort))
    for site_id in extract_missing(sites.configs, workers, say):
        sites.notes.append(f"{site_id}: features extracted")
    for cfg in sites.configs:
        if cfg.data.mode == "tabular":
            sites.notes.append(f"{cfg.site_id}: tabular site, no crops: no deep models")
    truth = Path(cohort) / "ground_truth"
    if (truth / "oracle.json").is_file():
        sites.oracle = json.loads((truth / "oracle.json").read_text(encoding="utf-8"))
    if (truth / "truth.csv").is_file():
        table = pd.read_csv(truth / "truth.csv", dtype={"patient_id": str})
        sites.true_risk = table.set_index("patient_id")["true_risk"]
    return sites


def table_site(path: Path, label: str, id_column: str, out: Path) -> StudySites:
    """Tabular mode: one feature table CSV as a tabular site (``fedmets.client.tabular``:
    radiomics = the columns matching ``fedmets.shared.config.DEFAULT_RADIOMICS_PATTERN``;
    clinical = the columns named in ``CLINICAL_NAMES``, mapped onto the fedmets schema), its
    features written under ``OUT/table-site`` (the table's folder is only read). Rows that fail
    the checks (no 0/1 label, a bad cell) are left out and reported by the extraction.
    ValueError naming the table's problem when it is not found or no row is usable (an --id or
    --label column it lacks)."""
    from fedmets.client.extract import extract_site
    from fedmets.client.ingest import read_text_table
    from fedmets.client.tabular import CLINICAL_NAMES

    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"--table: {path}: {'a folder' if path.is_dir() else 'file not found'}")
    header = {str(c).lower() for c in read_text_table(path)[0].columns}
    names = {n for name, more in CLINICAL_NAMES.items() for n in (name, *more)}
    with_clinical = bool(header & names)
    site = Path(out).resolve() / "table-site"
    cfg = SiteConfig.model_validate(
        {
            "site_id": "table",
            "data": {
                "root": str(path.parent),
                "manifest": path.name,
                "mode": "tabular",
                "modalities": ["radiomics_table", *(["clinical"] if with_clinical else [])],
                "id_column": id_column,
                "label_column": label,
            },
            "paths": {"cache": str(site / "cache"), "output": str(site / "output")},
            "policy": {"randomness": "seeded"},
        },
        context={"base_dir": path.parent},
    )
    report = extract_site(cfg)
    if report["site_problems"]:
        options = {"data.id_column": "--id", "data.label_column": "--label"}
        problems = [
            next((p.replace(k, v) for k, v in options.items() if k in p), p)
            for p in report["site_problems"]
        ]
        raise ValueError("; ".join(problems))
    notes = [] if with_clinical else ["no clinical columns in the table"]
    quarantined = report.get("counts", {}).get("quarantined", 0) if report else 0
    if quarantined:
        notes.append(f"{quarantined} rows left out (extraction_report.json in {site})")
    return StudySites(str(path), "table", [cfg], notes=notes)


def study_configs(
    configs: Sequence[SiteConfig], folds: int, repeat: int, device: str | None
) -> list[SiteConfig]:
    """The site configs as the study runs them: ``folds`` folds; from repeat 1 on, folds drawn
    from each site's config seed + ``repeat`` (``[policy] randomness = "seeded"``); ``device``
    for every site when given."""
    out = []
    for cfg in configs:
        policy = {"folds": folds}
        if repeat:
            policy["randomness"] = "seeded"
        update = {"policy": cfg.policy.model_copy(update=policy)}
        if repeat:
            update["seed"] = cfg.seed + repeat
        if device:
            update["compute"] = cfg.compute.model_copy(update={"device": device})
        out.append(cfg.model_copy(update=update))
    return out


# ---- the study ---------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """``metrics`` as written to metrics.json, ``oof`` as oof_predictions.csv."""

    metrics: dict
    oof: pd.DataFrame


def run_study(
    sites: StudySites,
    fed: FederationConfig,
    out: Path,
    backbones: Sequence[str] = ("swin3d",),
    repeat: int = 0,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    parallel_folds: int = 1,
) -> StudyResult:
    """Run the cross-validated study of ``fed`` (the protocol's settings; its ``[run] seed``
    plus ``repeat`` seeds the training) on ``sites`` pooled, once per backbone of
    ``backbones`` (none for tabular sites or an empty list), and write metrics.json,
    oof_predictions.csv and the figures into ``out``. ``parallel_folds`` > 1: that many folds
    at once, of every backbone's run (``fedmets.simulation.in_process.FoldPool``; the runs side
    by side, each with its own pooled worker). ValueError names a site that cannot
    be pooled or a protocol that cannot run."""
    started = time.perf_counter()
    say = log or (lambda message: None)
    out = Path(out)
    configs = study_configs(sites.configs, fed.cv.folds, repeat, device)
    state = out / STATE_DIR
    try:
        worker = SiteWorker(configs, state_root=state, ledger_root=state)
    except SiteNotReady as error:
        raise ValueError(error.local()) from error
    data = worker.data
    if len(set(data.ids)) != len(data.ids):
        raise ValueError("patient ids repeat across sites")
    backbones = list(backbones) if data.crops is not None else []
    y = data.labels
    models: dict[str, np.ndarray] = {}  # model -> out-of-fold scores (n,)
    decisions: dict[str, np.ndarray] = {}
    thresholds: dict[str, list[float]] = {}
    protocol: dict[str, dict] = {}
    fold = np.full(len(y), -1)

    def protocol_run(backbone: str | None, run_worker: SiteWorker, pool: FoldPool | None) -> dict:
        settings = fed.model_dump(mode="json")
        settings["run"]["seed"] = fed.run.seed + repeat
        settings["stages"]["image"] = backbone is not None
        if backbone:
            settings["model"]["backbone"] = backbone
        run = f"{fed.run.name}-{backbone or 'tabular'}"
        say(f"protocol run {run}: every patient in one site, {fed.cv.folds} folds")
        run_log = log if pool is None else (lambda message: say(f"[{run}] {message.strip()}"))
        try:
            return run_in_process(
                run_worker, FederationConfig.model_validate(settings), run, state, run_log, pool
            )
        except ProtocolError as error:
            raise ValueError(f"{run}: {error}") from error

    runs = backbones or [None]
    if parallel_folds > 1:  # every backbone's run at once, their folds in one pool
        gib = configs[0].compute.gpu_memory_gib
        share = lane_budget_bytes(worker.device, gib, parallel_folds)
        run_workers = [worker] + [SiteWorker(configs, state, state) for _ in runs[1:]]
        with FoldPool(parallel_folds, share, say) as pool, ThreadPoolExecutor(len(runs)) as side:
            say(f"fold processes: {pool.describe()}")
            finished = list(side.map(protocol_run, runs, run_workers, [pool] * len(runs)))
    else:
        finished = [protocol_run(backbone, worker, None) for backbone in runs]
    for i, (backbone, result) in enumerate(zip(runs, finished, strict=True)):
        run = result["run"]
        keys = [k for k in result["models"] if i == 0 or not k.startswith(NO_IMAGE)]
        fold, scores = worker.out_of_fold(run, keys, fed.cv.folds)
        for key in keys:
            cut = np.array([f["thresholds"][key] for f in result["folds"]])
            models[key], thresholds[key] = scores[key], cut.tolist()
            decisions[key] = (scores[key] >= cut[fold]).astype(int)
        protocol[backbone or "tabular"] = {
            "run": run,
            "main_model": result["main_model"],
            "models": result["models"],
            "folds": result["folds"],
            "importance": result["importance"],
            "timing_s": result["timing_s"],
        }
    if (fold < 0).any():
        raise ValueError(f"{int((fold < 0).sum())} patients have no out-of-fold score")
    true_risk = _true_risk(sites, data.ids)
    every = np.arange(len(y))
    results = {
        key: {
            "pooled": _pooled(y, scores, decisions[key], every, true_risk, with_calibration=True),
            "per_subsite": {
                name: _pooled(
                    y, scores, decisions[key], np.flatnonzero(data.subsite == name), true_risk
                )
                for name in sorted(set(data.subsite))
            },
            "per_fold": [
                {
                    "fold": f,
                    **binary_metrics(y[fold == f], scores[fold == f], thresholds[key][f]),
                    "oracle_auc": _oracle_auc(y, true_risk, np.flatnonzero(fold == f)),
                }
                for f in range(fed.cv.folds)
            ],
        }
        for key, scores in models.items()
    }
    for key in results:  # DeLong paired, pooled out-of-fold scores
        if len(model_groups(key)) > 1:
            results[key]["versus_single_groups"] = {
                single: delong_paired_test(y, models[key], models[single])
                for single in single_group_models(key)
            }
    for key in results:  # what the radiomics add: the same model without them (DeLong)
        groups = model_groups(key)
        if "radiomics" in groups and len(groups) > 1:
            prefix = key.split("/", 1)[0]
            without = f"{prefix if 'deep' in groups else 'none'}/" + "+".join(
                g for g in groups if g != "radiomics"
            )
            if without in models:
                results[key]["versus_without_radiomics"] = {
                    without: delong_paired_test(y, models[key], models[without])
                }
    for key in [k for k in results if backbones and k.startswith(backbones[0] + "/")]:
        others = [f"{b}/{key.split('/', 1)[1]}" for b in backbones[1:]]
        if others:
            results[key]["versus_other_backbones"] = {
                other: delong_paired_test(y, models[key], models[other]) for other in others
            }
    metrics = {
        "config": {
            "mode": sites.mode,
            "source": sites.source,
            "federation": fed.model_dump(mode="json"),
            "folds": fed.cv.folds,
            "seed": fed.run.seed + repeat,
            "repeat": repeat,
            "backbones": backbones,
            "n_patients": int(len(y)),
            "positives": int(y.sum()),
            "sites": sorted(set(data.site)),
            "radiomics_columns": int(data.radiomics.shape[1]),
            "clinical_columns": 0 if data.clinical is None else int(data.clinical.shape[1]),
            "threshold_rule": "Youden J on the pooled training rows' scores of each fold",
            "notes": sites.notes,
        },
        "oracle_auc": None if sites.oracle is None else sites.oracle.get("pooled"),
        "oracle_auc_used": _oracle_auc(y, true_risk, every),
        "models": results,
        "thresholds": thresholds,
        "protocol": protocol,
        "timing_s": {
            "protocol": {name: p["timing_s"].get("total") for name, p in protocol.items()},
            "total": round(time.perf_counter() - started, 1),
        },
    }
    metrics = typed(StudyResults, to_jsonable(metrics))
    oof = pd.DataFrame(
        {
            "patient_id": data.ids,
            "site": data.site,
            "subsite": data.subsite,
            "fold": fold,
            "label": y,
        }
    )
    for key, scores in models.items():
        oof[key] = scores
    if true_risk is not None:
        oof["oracle_true_risk"] = true_risk
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    oof.to_csv(out / "oof_predictions.csv", index=False)
    write_figures(metrics, oof, out, main_models(metrics))
    return StudyResult(metrics, oof)


def _true_risk(sites: StudySites, ids: np.ndarray) -> np.ndarray | None:
    """The true risk of each patient (n,), or None when the cohort has none for some."""
    if sites.true_risk is None:
        return None
    risk = sites.true_risk.reindex(ids)
    if risk.isna().any():
        sites.notes.append(f"truth.csv lacks {int(risk.isna().sum())} patients: no oracle")
        return None
    return risk.to_numpy(float)


def _oracle_auc(y: np.ndarray, true_risk: np.ndarray | None, rows: np.ndarray) -> float | None:
    """AUC of the true risk on ``rows`` (synthetic cohorts only; None if single-class)."""
    if true_risk is None or len(set(y[rows])) < 2:
        return None
    return float(roc_auc_score(y[rows], true_risk[rows]))


def _pooled(
    y: np.ndarray,
    scores: np.ndarray,
    decisions: np.ndarray,
    rows: np.ndarray,
    true_risk: np.ndarray | None,
    with_calibration: bool = False,
) -> dict:
    """Pooled out-of-fold metrics over ``rows``: AUC, DeLong CI, Brier from the scores
    (``fedmets.shared.metrics.binary_metrics``); ACC/SEN/SPE from each patient's decision at its
    own fold's threshold; optionally the calibration curve; the oracle AUC on the same rows."""
    y, s, d = y[rows], scores[rows], decisions[rows]
    result = binary_metrics(y, s, threshold=0.5)  # threshold-free parts only; see below
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    result.pop("threshold")
    result["acc"] = float((d == y).mean())
    result["sen"] = float(d[y == 1].mean()) if positives else None
    result["spe"] = float(1 - d[y == 0].mean()) if negatives else None
    if with_calibration:
        cal = calibration(y, s)
        result["calibration"] = {k: np.asarray(v).tolist() for k, v in cal.items() if k != "edges"}
    result["oracle_auc"] = _oracle_auc(
        y, None if true_risk is None else true_risk[rows], np.arange(len(y))
    )
    return result


# ---- figures -----------------------------------------------------------------------------------


def main_models(metrics: dict) -> list[str]:
    """The models shown in the ROC and calibration figures: each single group (deep of the first
    backbone) and everything fused with the first backbone (or radiomics + clinical in tabular
    mode)."""
    keys = list(metrics["models"])
    backbones = metrics["config"]["backbones"]
    main = backbones[0] if backbones else None
    wanted = [model_key(None, ("clinical",)), model_key(None, ("radiomics",))]
    if main:
        wanted += [model_key(main, ("deep",)), model_key(main, FUSION_GROUPS)]
    else:
        wanted.append(model_key(None, ("radiomics", "clinical")))
    return [k for k in wanted if k in keys]


def write_figures(metrics: dict, oof: pd.DataFrame, out: Path, shown: Sequence[str]) -> None:
    """roc.png (ROC of ``shown`` and of the oracle), calibration.png (reliability of ``shown``)
    and ablation.png (pooled AUC with 95% CI of every model) in ``out``, drawn with the run
    report's primitives (``fedmets.server.report.figures``)."""
    figures = Figures(out)
    y = oof["label"].to_numpy()
    figure, (ax,) = new_figure(5.2, 5.0)
    roc_axes(ax, "ROC, pooled out-of-fold")
    curves = [(k, oof[k].to_numpy(), "-") for k in shown]
    if "oracle_true_risk" in oof:
        curves.append(("oracle (true risk)", oof["oracle_true_risk"].to_numpy(), "--"))
    for name, s, style in curves:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, style, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    ax.legend(fontsize=7, loc="lower right")
    figures.write(figure, "roc")

    figure, (ax,) = new_figure(5.2, 5.0)
    calibration_axes(ax, "calibration, pooled out-of-fold")
    for i, name in enumerate(shown):
        reliability_curve(ax, metrics["models"][name]["pooled"]["calibration"], f"C{i}", name)
    ax.legend(fontsize=7)
    figures.write(figure, "calibration")

    names = list(metrics["models"])
    figure, (ax,) = new_figure(7.5, 0.5 * len(names) + 1.4)
    for i, name in enumerate(names):
        pooled = metrics["models"][name]["pooled"]
        if pooled["auc"] is not None:
            auc_interval(ax, i, pooled, COLOURS["centralized"])
    oracle = metrics["oracle_auc_used"]
    auc_axis(ax, names, oracle, "pooled out-of-fold AUC with 95% DeLong CI")
    ax.set_title("ablations, pooled out-of-fold", fontsize=10)
    if oracle is not None:
        ax.legend(fontsize=8)
    figures.write(figure, "ablation")
