"""`fedmets study`: the centralised reference study of the seed paper, and the baseline the
federated system must match.

Input: a cohort folder of site configs (``COHORT/*/site.toml``; a site whose
``features.parquet`` is missing is extracted first with ``fedmets.client.extract.extract_site`` and
its own config) -- radiomics, clinical and deep-model crops pooled over sites -- or one feature
table CSV (tabular mode: radiomics and clinical columns, no images).

Stratified k-fold cross-validation (seeded). In each fold, everything fitted sees the training
folds only:

1. image model (per backbone) trained on the training crops, early-stopped on a stratified inner
   validation split of the training rows;
2. deep features (n, D) of every patient from that fold's model; standardised with the training
   rows' mean and SD, then (``deep_components``) whitened PCA components fitted on those rows;
3. radiomics: median imputation, then ``fedmets.shared.selection.RadiomicsSelector`` (constant
   columns dropped, standardised, correlation filter, random-forest top-k) fitted on the training
   rows; clinical columns standardised with the training rows' statistics;
4. per feature-group subset (ablations): a ``FusionNet`` ensemble trained on the training rows
   (group dropout; early stop on the AUC of an inner split) -- for a subset of several groups
   with ``fusion = "late"``, instead the mean of the logits of its single-group ensembles
   (decision-level fusion, nothing more fitted); the Youden threshold is taken on the model's
   predictions for all training rows, then applied to the held-out fold.

Out-of-fold predictions are pooled over folds: AUC with its DeLong 95% CI, accuracy,
sensitivity, specificity (each patient classified at its own fold's threshold), Brier score,
calibration; per fold and per subsite too, beside the oracle AUC of the synthetic cohort's true
risk on the same patients; each model of several groups against each of its single-group
models by DeLong's paired test. Outputs in ``RUN/``: ``metrics.json``,
``oof_predictions.csv`` and PNG figures (``roc.png``, ``calibration.png``, ``ablation.png``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, logit
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler

from fedmets.client.crops import HU_WINDOW, CropDataset, Fit, MaskChannel, load_crops
from fedmets.client.memory import CUDA_CONTEXT_BYTES, device_budget_bytes, plan_image_training
from fedmets.client.site_files import FEATURES_FILE
from fedmets.client.training import (
    Monitor,
    extract_deep_features,
    predict_proba,
    resolve_device,
    train_fusion,
    train_image_model,
)
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
from fedmets.shared.clinical import decode_subsite, encoded_columns
from fedmets.shared.config import SiteConfig, load_site_config
from fedmets.shared.image_models import (
    BACKBONES,
    IMAGE_PRESETS,
    ImageModelConfig,
    at_crop_size,
    build_image_model,
)
from fedmets.shared.metrics import binary_metrics, calibration, delong_paired_test, youden_threshold
from fedmets.shared.models import (
    FUSION_GROUPS,
    FusionNet,
    group_subsets,
    model_key,
    positive_class_weight,
)
from fedmets.shared.reproducibility import set_seed
from fedmets.shared.selection import RadiomicsSelector

# ---- presets -----------------------------------------------------------------------------------


def _image_configs(crop: int, **per_backbone: dict) -> dict[str, ImageModelConfig]:
    """One ImageModelConfig per backbone at ``crop``^3 (CT + mask channel, dropout 0.2)."""
    return {
        name: ImageModelConfig(
            backbone=name, crop_voxels=crop, in_channels=2, dropout=0.2, **per_backbone[name]
        )
        for name in BACKBONES
    }


FusionMode = Literal["joint", "late"]
"""How a model of several feature groups is built: ``"joint"``, one ``FusionNet`` ensemble on
the concatenated groups (feature-level fusion, the seed paper's); ``"late"``, the mean of the
logits of the groups' single-group ensembles (decision-level fusion)."""


@dataclass(frozen=True)
class StudyPreset:
    """Every setting of a study run besides data, folds and seed (units: epochs, rows)."""

    name: str
    image_models: dict[str, ImageModelConfig]  # backbone -> config (one crop size for all)
    mask_channel: MaskChannel = "ring"  # image channel 1
    fit: Fit = "resize"  # crop.npz -> crop_voxels^3: resize the whole crop or centre-crop it
    hu_window: tuple[float, float] = HU_WINDOW
    augment: bool = True
    image_epochs: int = 10
    image_lr: float = 3e-4
    image_batch: int = 8
    image_val_fraction: float = 0.15  # inner split of the training rows for early stopping
    image_patience: int | None = None
    fusion_hidden: tuple[int, ...] = (64, 32)
    fusion_dropout: float = 0.3
    fusion_epochs: int = 200
    fusion_lr: float = 1e-3
    fusion_batch: int = 32
    fusion_weight_decay: float = 1e-3
    fusion_val_fraction: float = 0.2
    fusion_patience: int = 25
    fusion_members: int = 5  # nets averaged, each early-stopped on its own inner split
    fusion_bottleneck: dict[str, int] = field(default_factory=dict)  # group -> learnt width
    fusion_group_dropout: float = 0.3  # P(a group of a sample is zeroed) in fusion training
    fusion_monitor: Monitor = "auc"  # fusion early stopping: inner-split AUC (or loss)
    fusion: FusionMode = "joint"  # models of several groups: one net, or mean single logits
    deep_components: int | None = 8  # PCA (whitened, training rows) of the deep features
    correlation_threshold: float = 0.9
    top_k: int = 36
    rf_trees: int = 200
    folds: int = 5

    def to_json(self) -> dict:
        """Plain JSON-able settings (image configs as dicts)."""
        data = asdict(self)
        data["image_models"] = {k: v.model_dump() for k, v in self.image_models.items()}
        return data


PRESETS: dict[str, StudyPreset] = {
    # Seconds to a minute on a laptop CPU: 32^3 crops, very narrow networks, 2 epochs.
    "tiny": StudyPreset(
        name="tiny",
        image_models=_image_configs(
            32,
            swin3d={"embed_dim": 8, "num_heads": (1, 2, 4, 8), "depths": (1, 1, 1, 1)},
            resnet3d={"widths": (8, 8, 16, 16), "depths": (1, 1, 1, 1), "norm_groups": 4},
            densenet3d={
                "init_features": 8,
                "growth_rate": 4,
                "depths": (2, 2, 2, 2),
                "norm_groups": 4,
            },
        ),
        image_epochs=2,
        image_batch=4,
        image_val_fraction=0.25,
        fusion_hidden=(16,),
        fusion_epochs=40,
        fusion_patience=10,
        fusion_members=2,
        rf_trees=50,
        folds=3,
    ),
    # CPU minutes: 32^3 crops, the narrow "cpu-small" networks, a few epochs.
    "demo": StudyPreset(
        name="demo",
        image_models=IMAGE_PRESETS["cpu-small"],
        image_epochs=12,
        image_lr=1e-3,
    ),
    # The paper's protocol at 64^3 on a CPU (hours) or a small GPU.
    "paper": StudyPreset(
        name="paper",
        image_models=at_crop_size(IMAGE_PRESETS["cpu-small"], 64),
        image_epochs=40,
        image_lr=2e-4,
        image_patience=10,
    ),
    # A GPU: 96^3 crops, Swin UNETR encoder as published (embed 48), mixed precision.
    "gpu": StudyPreset(
        name="gpu",
        image_models=IMAGE_PRESETS["gpu"],
        image_epochs=60,
        image_lr=1e-4,
        image_batch=16,
        image_patience=15,
    ),
}
"""Study presets by name: the one place their settings live."""


# ---- data --------------------------------------------------------------------------------------


@dataclass
class StudyData:
    """Pooled patients: ``ids``, ``labels`` 0/1, ``site``, ``subsite`` (``"unknown"`` when
    missing) (n,); ``radiomics`` (n, p) float (NaN allowed); ``clinical`` (n, q) encoded
    (``fedmets.shared.clinical``) or None; ``crops`` crop.npz paths (n,) or None (tabular);
    ``true_risk`` (n,) of a synthetic cohort or None; ``oracle`` (oracle.json) or None."""

    source: str
    mode: str
    ids: np.ndarray
    labels: np.ndarray
    site: np.ndarray
    subsite: np.ndarray
    radiomics: pd.DataFrame
    clinical: pd.DataFrame | None
    crops: list[Path] | None = None
    true_risk: np.ndarray | None = None
    oracle: dict | None = None
    notes: list[str] = field(default_factory=list)


def load_cohort(cohort: Path, workers: int | None = None) -> StudyData:
    """Pool the sites of ``cohort`` (``*/site.toml``, sorted) as a site pools its own data
    (``fedmets.client.site_worker.load_site_data``): features, labels and crops (none at all when a
    site is in tabular mode). Sites without ``features.parquet`` are extracted first. Patients
    without a label are left out (counted in ``notes``). The oracle comes from
    ``cohort/ground_truth`` when present. ValueError names a site that cannot be pooled."""
    from fedmets.client.extract import extract_site  # PyRadiomics: not needed once data is pooled
    from fedmets.client.site_worker import SiteNotReady, load_site_data

    paths = sorted(Path(cohort).glob("*/site.toml"))
    if not paths:
        raise ValueError(f"no site configs (*/site.toml) under {cohort}")
    configs = [load_site_config(path) for path in paths]
    notes = []
    for cfg in configs:
        if not (cfg.paths.output / FEATURES_FILE).is_file():
            extract_site(cfg, workers)
            notes.append(f"{cfg.site_id}: features extracted")
        if cfg.data.mode == "tabular":
            notes.append(f"{cfg.site_id}: tabular site, no crops: no deep models in this study")
    try:
        pooled = load_site_data(configs)
    except SiteNotReady as error:
        raise ValueError(str(error)) from error
    if pooled.unlabelled:
        notes.append(f"{pooled.unlabelled} patients without label left out")
    if len(set(pooled.ids)) != len(pooled.ids):
        raise ValueError("patient ids repeat across sites")
    data = StudyData(
        source=str(cohort),
        mode="cohort",
        ids=pooled.ids,
        labels=pooled.labels,
        site=pooled.site,
        subsite=pooled.subsite,
        radiomics=pooled.radiomics,
        clinical=pooled.clinical,
        crops=pooled.crops,
        notes=notes,
    )
    _attach_oracle(data, Path(cohort) / "ground_truth")
    return data


def _attach_oracle(data: StudyData, truth_dir: Path) -> None:
    """Read oracle.json and the true risks (truth.csv, by patient_id) when present."""
    if (truth_dir / "oracle.json").is_file():
        data.oracle = json.loads((truth_dir / "oracle.json").read_text(encoding="utf-8"))
    if (truth_dir / "truth.csv").is_file():
        truth = pd.read_csv(truth_dir / "truth.csv", dtype={"patient_id": str})
        risk = truth.set_index("patient_id")["true_risk"].reindex(data.ids)
        if risk.notna().all():
            data.true_risk = risk.to_numpy(float)
        else:
            data.notes.append(f"truth.csv lacks {int(risk.isna().sum())} patients: no oracle")


def load_table(path: Path, label: str, id_column: str) -> StudyData:
    """Tabular mode: one feature table CSV, read as a tabular site reads it
    (``fedmets.client.tabular.load_feature_table``): radiomics = the columns matching
    ``fedmets.shared.config.DEFAULT_RADIOMICS_PATTERN``; clinical = the table's columns named in
    ``fedmets.client.tabular.CLINICAL_NAMES``, mapped onto the fedmets schema and encoded (absent
    schema columns count as missing; no clinical group when the table has none of them). Rows that
    fail the checks (no 0/1 label, a bad cell) are left out and counted in ``notes``."""
    from fedmets.client.tabular import CLINICAL_NAMES, load_feature_table  # SimpleITK via ingest

    path = Path(path).resolve()
    header = {str(c).lower() for c in pd.read_csv(path, nrows=0).columns}
    names = {n for field, more in CLINICAL_NAMES.items() for n in (field, *more)}
    with_clinical = bool(header & names)
    data = {
        "root": str(path.parent),
        "manifest": path.name,
        "mode": "tabular",
        "modalities": ["radiomics_table", *(["clinical"] if with_clinical else [])],
        "id_column": id_column,
        "label_column": label,
    }
    cfg = SiteConfig.model_validate(
        {"site_id": "table", "data": data}, context={"base_dir": path.parent}
    )
    loaded = load_feature_table(cfg)
    if loaded.site_problems:
        raise ValueError("; ".join(loaded.site_problems))
    notes = []
    if loaded.quarantined:
        first = next(iter(loaded.quarantined.values()))[0]
        notes.append(f"{len(loaded.quarantined)} rows left out, e.g. {first}")
    if with_clinical:
        mapped = {k: v for k, v in loaded.clinical_sources.items() if v is not None}
        notes.append("clinical columns: " + ", ".join(f"{v}->{k}" for k, v in mapped.items()))
    table = loaded.features
    clinical = table[encoded_columns()].astype(float) if with_clinical else None
    return StudyData(
        source=str(path),
        mode="table",
        ids=table["patient_id"].astype(str).to_numpy(),
        labels=table["label"].astype(int).to_numpy(),
        site=np.full(len(table), "table"),
        subsite=decode_subsite(table) if with_clinical else np.full(len(table), "unknown"),
        radiomics=table[loaded.radiomics_columns].astype(float),
        clinical=clinical,
        notes=notes,
    )


# ---- the study ---------------------------------------------------------------------------------


@dataclass
class FoldRecord:
    """What one fold fitted, kept for inspection: row indices (into StudyData), the ids handed
    to the radiomics selector and the fitted selector itself."""

    fold: int
    train: np.ndarray
    test: np.ndarray
    selector_fit_ids: np.ndarray
    selector: RadiomicsSelector
    image_histories: dict[str, dict] = field(default_factory=dict)


@dataclass
class StudyResult:
    """``metrics`` as written to metrics.json, ``oof`` as oof_predictions.csv, and the folds."""

    metrics: dict
    oof: pd.DataFrame
    folds: list[FoldRecord]


def _child_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed derived from ``seed`` and ``keys`` (distinct streams per fold and task)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] % 2**31)


def run_study(
    data: StudyData,
    preset: StudyPreset,
    out: Path,
    folds: int | None = None,
    seed: int = 0,
    backbones: Sequence[str] = BACKBONES,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    parallel: int | Literal["auto"] = 1,
    gpu_memory_gib: float | None = None,
) -> StudyResult:
    """Run the cross-validated study on ``data`` and write metrics.json, oof_predictions.csv
    and the figures into ``out``. ``backbones`` are ignored in tabular mode.

    The work is one image task per fold and backbone (training, deep features) and one fold
    task per fold (selection, every fusion model); ``parallel`` > 1 runs that many tasks at
    once in worker processes (a fold task starts when its folds' image tasks are done), and
    ``"auto"`` as many as the GPU's free memory holds (one on a CPU). Every task is seeded
    on its own, so the results do not depend on ``parallel``. ``gpu_memory_gib``: each image
    training's GPU memory budget (``fedmets.client.memory``; default: what the device has free)."""
    started = time.perf_counter()
    say = log or (lambda message: None)
    n_folds = folds or preset.folds
    torch_device = resolve_device(device)
    backbones = list(backbones) if data.crops is not None else []
    y = data.labels
    timing = {"crops": 0.0, "selection": 0.0, "fusion": 0.0, "deep_features": 0.0}
    timing["image_training"] = dict.fromkeys(backbones, 0.0)

    images = None
    if backbones:
        sides = {preset.image_models[b].crop_voxels for b in backbones}
        if len(sides) != 1:
            raise ValueError(f"backbones need one crop size, got {sorted(sides)}")
        tic = time.perf_counter()
        say(f"loading {len(data.crops)} crops at {sides.pop()}^3")
        images = load_crops(
            data.crops,
            preset.image_models[backbones[0]].crop_voxels,
            preset.mask_channel,
            preset.hu_window,
            preset.fit,
        )
        timing["crops"] = time.perf_counter() - tic

    groups_available = ["radiomics"] + (["clinical"] if data.clinical is not None else [])
    plain_subsets = [s for s in group_subsets() if set(s) <= set(groups_available)]
    deep_subsets = [
        s for s in group_subsets() if "deep" in s and set(s) - {"deep"} <= set(groups_available)
    ]
    models_built = [(None, s) for s in plain_subsets] + [
        (b, s) for b in backbones for s in deep_subsets
    ]
    keys = [model_key(b, s) for b, s in models_built]
    # each model of several groups -> its single-group models (the deep one of its backbone)
    singles_of = {
        model_key(b, s): [model_key(b if g == "deep" else None, (g,)) for g in s]
        for b, s in models_built
        if len(s) > 1
    }
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros(len(y)), y))
    job = _StudyJob(
        data, preset, seed, str(torch_device), gpu_memory_gib, images, backbones, groups_available
    )
    workers = _workers(parallel, job, splits)
    outcomes = _run_tasks(job, splits, workers, Path(out), say)

    scores = {k: np.full(len(y), np.nan) for k in keys}
    decisions = {k: np.zeros(len(y), dtype=int) for k in keys}
    per_fold: dict[str, list[dict]] = {k: [] for k in keys}
    fold_of = np.full(len(y), -1)
    records: list[FoldRecord] = []
    for fold, (train, test) in enumerate(splits):
        outcome = outcomes[fold]
        fold_of[test] = fold
        records.append(
            FoldRecord(
                fold, train, test, data.ids[train].copy(), outcome.selector, outcome.histories
            )
        )
        for name, seconds in outcome.timing.items():
            if name == "image_training":
                for backbone, value in seconds.items():
                    timing[name][backbone] += value
            else:
                timing[name] += seconds
        for key in keys:
            fitted = outcome.scores[key]
            threshold = youden_threshold(y[train], fitted.train)
            scores[key][test] = fitted.test
            decisions[key][test] = fitted.test >= threshold
            per_fold[key].append(
                {"fold": fold, **_summary(y[test], fitted.test, threshold, data, test)}
            )

    models = {
        key: {
            "pooled": _pooled(y, scores[key], decisions[key], data, np.arange(len(y)), True),
            "per_subsite": {
                name: _pooled(
                    y, scores[key], decisions[key], data, np.flatnonzero(data.subsite == name)
                )
                for name in sorted(set(data.subsite))
            },
            "per_fold": per_fold[key],
        }
        for key in keys
    }
    for key, singles in singles_of.items():  # DeLong paired, pooled out-of-fold scores
        models[key]["versus_single_groups"] = {
            single: delong_paired_test(y, scores[key], scores[single]) for single in singles
        }
    for subset in deep_subsets if len(backbones) > 1 else []:  # main backbone against the rest
        main_key = model_key(backbones[0], subset)
        models[main_key]["versus_other_backbones"] = {
            model_key(other, subset): delong_paired_test(
                y, scores[main_key], scores[model_key(other, subset)]
            )
            for other in backbones[1:]
        }
    oracle_used = _oracle_auc(data, np.arange(len(y)))
    timing["total"] = time.perf_counter() - started
    metrics = {
        "config": {
            "mode": data.mode,
            "source": data.source,
            "preset": preset.to_json(),
            "folds": n_folds,
            "seed": seed,
            "backbones": backbones,
            "device": str(torch_device),
            "parallel_tasks": workers,
            "n_patients": int(len(y)),
            "positives": int(y.sum()),
            "radiomics_columns": int(data.radiomics.shape[1]),
            "clinical_columns": 0 if data.clinical is None else int(data.clinical.shape[1]),
            "threshold_rule": "Youden J on the model's predictions for all training rows",
            "notes": data.notes,
        },
        "oracle_auc": None if data.oracle is None else data.oracle.get("pooled"),
        "oracle_auc_used": oracle_used,
        "models": models,
        "timing_s": _rounded(timing),
    }
    oof = pd.DataFrame(
        {
            "patient_id": data.ids,
            "site": data.site,
            "subsite": data.subsite,
            "fold": fold_of,
            "label": y,
        }
    )
    for key in keys:
        oof[key] = scores[key]
    if data.true_risk is not None:
        oof["oracle_true_risk"] = data.true_risk
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    oof.to_csv(out / "oof_predictions.csv", index=False)
    write_figures(metrics, oof, out, main_models(metrics))
    return StudyResult(metrics, oof, records)


# ---- tasks: one per fold and backbone (image), one per fold (selection and fusion) --------------


@dataclass
class _StudyJob:
    """What every task reads; sent once to each worker process. ``images``: the model inputs
    (n, C, S, S, S) float32, or in workers the path of a ``.npy`` copy they memory-map."""

    data: StudyData
    preset: StudyPreset
    seed: int
    device: str
    gpu_memory_gib: float | None
    images: np.ndarray | Path | None
    backbones: list[str]
    groups: list[str]  # tabular groups present: radiomics[, clinical]

    def model_inputs(self) -> np.ndarray:
        if isinstance(self.images, Path):
            self.images = np.load(self.images, mmap_mode="c")  # copy on write: no copy
        return self.images


@dataclass
class _ImageOutcome:
    """One fold's image model of one backbone: deep features (n, D) of every patient (fitted
    on the training rows), its training history and seconds."""

    deep: np.ndarray
    history: dict
    training_s: float
    features_s: float


@dataclass
class _FoldOutcome:
    """One fold's selection and fusion models: per model key its ``FusionScores``; the fitted
    selector; each backbone's image history; seconds per stage (as ``timing_s``)."""

    scores: dict[str, FusionScores]
    selector: RadiomicsSelector
    histories: dict[str, dict]
    timing: dict


def _image_task(job: _StudyJob, fold: int, backbone: str, train: np.ndarray) -> _ImageOutcome:
    """Stage 1 + 2 of one fold for one backbone (``_deep_group``)."""
    timing = {"image_training": {backbone: 0.0}, "deep_features": 0.0}
    deep, history = _deep_group(
        job.model_inputs(),
        job.data.labels,
        train,
        job.preset,
        backbone,
        _child_seed(job.seed, fold, 1),
        torch.device(job.device),
        timing,
        job.gpu_memory_gib,
    )
    return _ImageOutcome(deep, history, timing["image_training"][backbone], timing["deep_features"])


def _fold_task(
    job: _StudyJob,
    fold: int,
    train: np.ndarray,
    test: np.ndarray,
    images: dict[str, _ImageOutcome],
) -> _FoldOutcome:
    """Selection, then every fusion model of the fold: the tabular subsets, then each
    backbone's subsets with its deep features."""
    tic = time.perf_counter()
    features, selector = _tabular_groups(
        job.data, train, job.preset, _child_seed(job.seed, fold, 0)
    )
    timing = {"selection": time.perf_counter() - tic, "fusion": 0.0}
    scores: dict[str, FusionScores] = {}
    singles: dict[str, FusionScores] = {}  # this fold's single-group models (late fusion)
    for backbone in [None, *job.backbones]:
        subsets = [s for s in group_subsets() if set(s) <= set(job.groups)]
        if backbone is not None:
            features = {**features, "deep": images[backbone].deep}
            subsets = [
                s for s in group_subsets() if "deep" in s and set(s) - {"deep"} <= set(job.groups)
            ]
        for subset in subsets:
            tic = time.perf_counter()
            if job.preset.fusion == "late" and len(subset) > 1:
                fitted = late_fusion([singles[g] for g in subset])
            else:
                fitted = _fit_fusion(
                    {g: features[g] for g in subset},
                    job.data.labels,
                    train,
                    test,
                    job.preset,
                    _child_seed(job.seed, fold, 2),
                )
            if len(subset) == 1:
                singles[subset[0]] = fitted
            scores[model_key(backbone, subset)] = fitted
            timing["fusion"] += time.perf_counter() - tic
    timing["image_training"] = {b: o.training_s for b, o in images.items()}
    timing["deep_features"] = sum(o.features_s for o in images.values())
    return _FoldOutcome(scores, selector, {b: o.history for b, o in images.items()}, timing)


_WORKER_JOB: _StudyJob | None = None


def _start_worker(job: _StudyJob, threads: int) -> None:
    """Pool initializer: keep the job for the tasks; torch on ``threads`` CPU threads."""
    global _WORKER_JOB
    _WORKER_JOB = job
    torch.set_num_threads(threads)


def _in_worker(task: Callable, *args: Any) -> Any:
    return task(_WORKER_JOB, *args)


def _workers(
    parallel: int | Literal["auto"], job: _StudyJob, splits: list[tuple[np.ndarray, np.ndarray]]
) -> int:
    """Tasks at once: ``parallel``, or for ``"auto"`` on a GPU as many image trainings as its
    free memory holds (each backbone's peak measured at the preset's batch, with a fold's
    training crops and a CUDA context on top), at most one per CPU core and one per image
    task; ``"auto"`` on a CPU: 1."""
    tasks = len(splits) * max(len(job.backbones), 1)
    if parallel != "auto":
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1 or 'auto', got {parallel}")
        return min(parallel, tasks)
    device = torch.device(job.device)
    if device.type != "cuda" or not job.backbones:
        return 1
    images = job.model_inputs()
    fold_crops = images[: len(splits[0][0])].nbytes
    peaks = []
    for backbone in job.backbones:
        model = build_image_model(job.preset.image_models[backbone])
        budget = device_budget_bytes(device, job.gpu_memory_gib)
        plan = plan_image_training(model, images.shape[1:], job.preset.image_batch, device, budget)
        peaks.append(plan.peak_bytes + fold_crops + CUDA_CONTEXT_BYTES)
        del model
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(tasks, os.cpu_count() or 1, int(free * 0.9 // max(peaks))))


def _run_tasks(
    job: _StudyJob,
    splits: list[tuple[np.ndarray, np.ndarray]],
    workers: int,
    out: Path,
    say: Callable[[str], None],
) -> list[_FoldOutcome]:
    """Every fold's outcome, in fold order: in this process (``workers`` 1), or in a pool of
    ``workers`` spawned processes that read the model inputs from a temporary ``.npy`` in
    ``out``."""
    n_folds = len(splits)

    def image_done(fold: int, backbone: str, outcome: _ImageOutcome) -> None:
        history = outcome.history
        val_auc = history["val_auc"][history["best_epoch"] - 1] if history["val_auc"] else None
        say(
            f"  fold {fold + 1} {backbone}: best epoch {history['best_epoch']}/"
            f"{history['epochs_run']}, inner validation AUC"
            f" {val_auc if val_auc is None else round(val_auc, 3)}, {history['seconds']:.0f} s"
            f" ({history['memory']})"
        )

    if workers == 1:
        outcomes = []
        for fold, (train, test) in enumerate(splits):
            say(f"fold {fold + 1}/{n_folds}: {len(train)} training, {len(test)} test patients")
            images = {}
            for backbone in job.backbones:
                images[backbone] = _image_task(job, fold, backbone, train)
                image_done(fold, backbone, images[backbone])
            outcomes.append(_fold_task(job, fold, train, test, images))
        return outcomes

    out.mkdir(parents=True, exist_ok=True)
    shipped = replace(job)
    if job.images is not None:
        shipped.images = out / ".study-model-inputs.npy"
        np.save(shipped.images, job.model_inputs())
    threads = max(1, (os.cpu_count() or 1) // workers)
    say(
        f"{n_folds} folds x {max(len(job.backbones), 1)} image tasks on {workers} worker"
        f" processes ({threads} CPU threads each)"
    )
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(shipped, threads),
    )
    try:
        images: dict[int, dict[str, _ImageOutcome]] = {f: {} for f in range(n_folds)}
        running = {}
        for fold, (train, _) in enumerate(splits):
            for backbone in job.backbones:
                future = pool.submit(_in_worker, _image_task, fold, backbone, train)
                running[future] = ("image", fold, backbone)
        outcomes: dict[int, _FoldOutcome] = {}

        def submit_fold(fold: int) -> None:
            train, test = splits[fold]
            future = pool.submit(_in_worker, _fold_task, fold, train, test, images[fold])
            running[future] = ("fold", fold, None)

        if not job.backbones:
            for fold in range(n_folds):
                submit_fold(fold)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                kind, fold, backbone = running.pop(future)
                if kind == "fold":
                    outcomes[fold] = future.result()
                    say(f"fold {fold + 1}/{n_folds}: selection and fusion models done")
                    continue
                images[fold][backbone] = future.result()
                image_done(fold, backbone, images[fold][backbone])
                if len(images[fold]) == len(job.backbones):
                    submit_fold(fold)
        return [outcomes[fold] for fold in range(n_folds)]
    finally:
        pool.shutdown(cancel_futures=True)
        if isinstance(shipped.images, Path):
            shipped.images.unlink(missing_ok=True)


def _tabular_groups(
    data: StudyData, train: np.ndarray, preset: StudyPreset, seed: int
) -> tuple[dict[str, np.ndarray], RadiomicsSelector]:
    """Radiomics (median-imputed, selected, standardised) and clinical (standardised) matrices
    of every patient, (n, k) and (n, q) float32, fitted on the ``train`` rows only."""
    radiomics = data.radiomics.replace([np.inf, -np.inf], np.nan)
    imputer = SimpleImputer(strategy="median").set_output(transform="pandas")
    imputer.fit(radiomics.iloc[train])
    selector = RadiomicsSelector(
        preset.correlation_threshold, preset.top_k, preset.rf_trees, random_state=seed
    )
    selector.fit(imputer.transform(radiomics.iloc[train]), data.labels[train])
    groups = {"radiomics": selector.transform(imputer.transform(radiomics)).to_numpy(np.float32)}
    if data.clinical is not None:
        scaler = StandardScaler().fit(data.clinical.iloc[train])
        groups["clinical"] = scaler.transform(data.clinical).astype(np.float32)
    return groups, selector


def _deep_group(
    images: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    preset: StudyPreset,
    backbone: str,
    seed: int,
    device: torch.device,
    timing: dict,
    gpu_memory_gib: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Stage 1 + 2: train the fold's image model on the training crops (inner stratified
    validation split for early stopping; micro-batches and checkpointing that fit
    ``gpu_memory_gib``, ``fedmets.client.memory``), then deep features (n, D) of every patient,
    standardised with the training rows' statistics and, with ``preset.deep_components``,
    reduced to that many whitened PCA components (fitted on the training rows). The history
    gains ``memory``, the plan in words."""
    fit_rows, val_rows = train_test_split(
        train, test_size=preset.image_val_fraction, stratify=y[train], random_state=seed
    )
    set_seed(seed)
    model = build_image_model(preset.image_models[backbone])
    tic = time.perf_counter()
    fitting = CropDataset(
        images[fit_rows], y[fit_rows], augment=preset.augment, seed=seed, device=device
    )
    plan = plan_image_training(
        model,
        tuple(images.shape[1:]),
        preset.image_batch,
        device,
        device_budget_bytes(device, gpu_memory_gib),
    )
    history = train_image_model(
        model,
        fitting,
        epochs=preset.image_epochs,
        lr=preset.image_lr,
        pos_weight=positive_class_weight(y[fit_rows]),
        seed=seed,
        device=device,
        val_dataset=CropDataset(images[val_rows], y[val_rows]),
        batch_size=preset.image_batch,
        patience=preset.image_patience,
        memory=plan,
    )
    history["memory"] = plan.describe()
    timing["image_training"][backbone] += time.perf_counter() - tic
    tic = time.perf_counter()
    deep = extract_deep_features(model, CropDataset(images), device)
    timing["deep_features"] += time.perf_counter() - tic
    deep = StandardScaler().fit(deep[train]).transform(deep)
    if preset.deep_components:
        k = min(preset.deep_components, deep.shape[1], len(train))
        pca = PCA(k, whiten=True, random_state=seed).fit(deep[train])
        deep = pca.transform(deep)
    return deep.astype(np.float32), history


@dataclass(frozen=True)
class FusionScores:
    """DM probabilities of one fold's model for its training rows and its test rows."""

    train: np.ndarray
    test: np.ndarray


def _fit_fusion(
    groups: dict[str, np.ndarray],
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    preset: StudyPreset,
    seed: int,
) -> FusionScores:
    """Train ``preset.fusion_members`` FusionNets on the ``train`` rows of ``groups`` (each
    (n, width)), each early-stopped on its own seeded inner split of those rows; return their
    averaged probabilities for the ``train`` and the ``test`` rows."""
    train_scores, test_scores = [], []
    for member in range(preset.fusion_members):
        member_seed = _child_seed(seed, member)
        set_seed(member_seed)
        model = FusionNet(
            {g: m.shape[1] for g, m in groups.items()},
            preset.fusion_hidden,
            preset.fusion_dropout,
            bottleneck=preset.fusion_bottleneck,
            group_dropout=preset.fusion_group_dropout,
        )
        X = np.concatenate([groups[g] for g in model.input_groups], axis=1)
        train_fusion(
            model,
            X[train],
            y[train],
            epochs=preset.fusion_epochs,
            lr=preset.fusion_lr,
            pos_weight=positive_class_weight(y[train]),
            seed=member_seed,
            val_fraction=preset.fusion_val_fraction,
            patience=preset.fusion_patience,
            batch_size=preset.fusion_batch,
            weight_decay=preset.fusion_weight_decay,
            monitor=preset.fusion_monitor,
        )
        train_scores.append(predict_proba(model, X[train]))
        test_scores.append(predict_proba(model, X[test]))
    return FusionScores(np.mean(train_scores, axis=0), np.mean(test_scores, axis=0))


def late_fusion(members: Sequence[FusionScores]) -> FusionScores:
    """Decision-level fusion of single-group models: the sigmoid of the mean of their logits
    (the normalised geometric mean of their odds), rows as in ``members``. Probabilities are
    clipped to [1e-7, 1 - 1e-7] first so that a saturated member stays finite."""

    def mean_logit(parts: list[np.ndarray]) -> np.ndarray:
        return expit(np.mean([logit(np.clip(p, 1e-7, 1 - 1e-7)) for p in parts], axis=0))

    return FusionScores(
        mean_logit([m.train for m in members]), mean_logit([m.test for m in members])
    )


def _oracle_auc(data: StudyData, rows: np.ndarray) -> float | None:
    """AUC of the true risk on ``rows`` (synthetic cohorts only; None if single-class)."""
    if data.true_risk is None or len(set(data.labels[rows])) < 2:
        return None
    return float(roc_auc_score(data.labels[rows], data.true_risk[rows]))


def _summary(
    y: np.ndarray, scores: np.ndarray, threshold: float, data: StudyData, rows: np.ndarray
) -> dict:
    """binary_metrics at ``threshold`` plus the oracle AUC on the same rows."""
    result = binary_metrics(y, scores, threshold)
    return {**result, "oracle_auc": _oracle_auc(data, rows)}


def _pooled(
    y: np.ndarray,
    scores: np.ndarray,
    decisions: np.ndarray,
    data: StudyData,
    rows: np.ndarray,
    with_calibration: bool = False,
) -> dict:
    """Pooled out-of-fold metrics over ``rows``: AUC, DeLong CI, Brier from the scores
    (``fedmets.shared.metrics.binary_metrics``); ACC/SEN/SPE from each patient's decision at its own
    fold's threshold; optionally the calibration curve; the oracle AUC on the same rows."""
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
    result["oracle_auc"] = _oracle_auc(data, rows)
    return result


def _rounded(timing: dict) -> dict:
    return {
        k: _rounded(v) if isinstance(v, dict) else round(float(v), 2) for k, v in timing.items()
    }


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
