"""`fedmets study` end to end: a tiny synthetic cohort through extraction, image models, selection
and fusion; tabular mode on synthetic and real feature tables; leakage checks; the CLI."""

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_fedmets
from sklearn.impute import SimpleImputer
from sklearn.metrics import roc_auc_score

from fedmets.client.site_files import FEATURES_FILE, crop_path
from fedmets.client.training import train_fusion
from fedmets.shared.config import load_site_config
from fedmets.shared.models import FusionNet, group_subsets
from fedmets.simulation.packed_cohort import pack_cohort, unpack_cohort
from fedmets.simulation.repeated_study import run_repeated_study, summarise_repeats
from fedmets.simulation.study import (
    PRESETS,
    _fit_fusion,
    load_cohort,
    load_table,
    model_key,
    run_study,
)
from fedmets.simulation.synth import generate_cohort

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
REAL_TABLE = REAL / "head_neck_pet_ct_gtvp_radiomics_dm.csv"
POOLED_KEYS = {"auc", "auc_ci", "acc", "sen", "spe", "brier", "n", "positives", "oracle_auc"}


def noise_table(
    path: Path, n: int = 300, p: int = 300, seed: int = 0, signal: bool = False
) -> Path:
    """A feature table CSV: ``p`` Gaussian noise radiomics columns (``original_noise_<i>``),
    clinical columns in the fedmets schema, a 0/1 ``label`` (20% positives). With ``signal``
    the first two features shift with the label."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.2).astype(int)
    features = rng.normal(size=(n, p))
    if signal:
        features[:, :2] += 1.0 * label[:, None]
    table = pd.DataFrame(features, columns=[f"original_noise_{i}" for i in range(p)])
    table.insert(0, "pid", [f"P{i:04d}" for i in range(n)])
    table["label"] = label
    table["age"] = rng.integers(30, 85, n)
    table["sex"] = rng.choice(["M", "F"], n)
    table["n_stage"] = rng.choice(["N0", "N1", "N2", "N3", ""], n)
    table["subsite"] = rng.choice(["oropharynx", "larynx"], n)
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def cohort_run(tmp_path_factory):
    """The tiny preset with late fusion on a 2-site tiny cohort (fast radiomics, 32^3 crops),
    2 folds, two backbones: (cohort folder, out folder, StudyResult)."""
    root = tmp_path_factory.mktemp("study")
    cohort = root / "cohort"
    generate_cohort("tiny", 2, 11, cohort, workers=2)
    for toml in cohort.glob("*/site.toml"):
        text = toml.read_text().replace('params = "default"', 'params = "fast"')
        toml.write_text(text + "\n[preprocess]\ncrop_voxels = [32, 32, 32]\n")
    out = root / "run"
    data = load_cohort(cohort, workers=2)
    preset = replace(PRESETS["tiny"], fusion="late")
    result = run_study(data, preset, out, folds=2, seed=3, backbones=["swin3d", "resnet3d"])
    return cohort, out, result


@pytest.mark.slow
def test_cohort_metrics_structure(cohort_run):
    cohort, out, result = cohort_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert set(metrics) == {"config", "oracle_auc", "oracle_auc_used", "models", "timing_s"}
    oracle = json.loads((cohort / "ground_truth" / "oracle.json").read_text())["pooled"]
    assert metrics["oracle_auc"] == oracle
    assert 0.5 < metrics["oracle_auc_used"] <= 1
    n, positives = metrics["config"]["n_patients"], metrics["config"]["positives"]
    assert n == 48 and 0 < positives < n  # every tiny patient extracts
    expected = [model_key(None, s) for s in group_subsets() if "deep" not in s] + [
        model_key(b, s) for b in ("swin3d", "resnet3d") for s in group_subsets() if "deep" in s
    ]
    assert list(metrics["models"]) == expected
    for model in metrics["models"].values():
        pooled = model["pooled"]
        assert POOLED_KEYS <= set(pooled)
        assert (pooled["n"], pooled["positives"]) == (n, positives)
        assert 0 <= pooled["auc"] <= 1 and 0 <= pooled["brier"] <= 1
        low, high = pooled["auc_ci"]
        assert 0 <= low <= pooled["auc"] <= high <= 1
        for rate in ("acc", "sen", "spe"):
            assert 0 <= pooled[rate] <= 1
        assert pooled["oracle_auc"] == pytest.approx(metrics["oracle_auc_used"])
        folds = model["per_fold"]
        assert [f["fold"] for f in folds] == [0, 1]
        assert sum(f["n"] for f in folds) == n
        assert sum(f["positives"] for f in folds) == positives
        # pooled accuracy = patients classified right at their fold's threshold, over folds
        assert sum(f["acc"] * f["n"] for f in folds) == pytest.approx(pooled["acc"] * n)
        subsites = model["per_subsite"]
        assert sum(s["n"] for s in subsites.values()) == n
        assert sum(s["positives"] for s in subsites.values()) == positives
        for s in subsites.values():
            single_class = s["positives"] in (0, s["n"])
            assert (s["auc"] is None) == single_class
    for key, model in metrics["models"].items():
        versus = model.get("versus_single_groups", {})
        backbone, groups = key.split("/")
        singles = [model_key(backbone if g == "deep" else None, (g,)) for g in groups.split("+")]
        assert list(versus) == (singles if len(singles) > 1 else [])
        for single, test in versus.items():
            difference = model["pooled"]["auc"] - metrics["models"][single]["pooled"]["auc"]
            assert test["auc_difference"] == pytest.approx(difference)
            assert test["ci"][0] <= test["auc_difference"] <= test["ci"][1] and 0 <= test["p"] <= 1
        versus = model.get("versus_other_backbones", {})  # the first backbone against the rest
        assert list(versus) == ([f"resnet3d/{groups}"] if backbone == "swin3d" else [])
        for other, test in versus.items():
            difference = model["pooled"]["auc"] - metrics["models"][other]["pooled"]["auc"]
            assert test["auc_difference"] == pytest.approx(difference)
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert len(oof) == n and set(oof["fold"]) == {0, 1}
    assert oof[expected].notna().all().all()
    assert ((oof[expected] >= 0) & (oof[expected] <= 1)).all().all()
    for figure in ("roc.png", "calibration.png", "ablation.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(metrics["timing_s"]["image_training"]) == {"swin3d", "resnet3d"}


@pytest.mark.slow
def test_tasks_in_parallel_give_the_sequential_results(cohort_run, tmp_path):
    """Two worker processes (image tasks of both folds at once, then the fold tasks) against
    one process, each task on the same number of CPU threads (torch's CPU kernels round
    differently with another thread count)."""
    data = load_cohort(cohort_run[0])
    preset = replace(PRESETS["tiny"], fusion="late")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        alone = run_study(data, preset, tmp_path / "one", 2, 3, ["resnet3d"], "cpu")
    finally:
        torch.set_num_threads(threads)
    both = run_study(data, preset, tmp_path / "two", 2, 3, ["resnet3d"], "cpu", parallel=2)
    assert both.metrics["config"]["parallel_tasks"] == 2
    assert both.metrics["models"] == alone.metrics["models"]
    pd.testing.assert_frame_equal(both.oof, alone.oof)
    assert not (tmp_path / "two" / ".study-model-inputs.npy").exists()
    for fold_one, fold_two in zip(alone.folds, both.folds, strict=True):
        assert fold_one.selector.selected_features_ == fold_two.selector.selected_features_
        history = fold_two.image_histories["resnet3d"]
        assert history == fold_one.image_histories["resnet3d"] | {"seconds": history["seconds"]}


@pytest.mark.slow
def test_a_packed_cohort_runs_the_same_tabular_study(cohort_run, tmp_path):
    data = load_cohort(cohort_run[0])
    summary = pack_cohort(data, tmp_path / "packed.npz", hu_step=2.0)
    assert summary["patients"] == len(data.ids) and summary["bytes"] > 0
    unpacked = unpack_cohort(tmp_path / "packed.npz", tmp_path / "crops")
    assert list(unpacked.ids) == list(data.ids) and list(unpacked.labels) == list(data.labels)
    assert list(unpacked.site) == list(data.site) and list(unpacked.subsite) == list(data.subsite)
    pd.testing.assert_frame_equal(unpacked.radiomics, data.radiomics.reset_index(drop=True))
    pd.testing.assert_frame_equal(unpacked.clinical, data.clinical.reset_index(drop=True))
    assert np.array_equal(unpacked.true_risk, data.true_risk) and unpacked.oracle == data.oracle
    for before, after in zip(data.crops, unpacked.crops, strict=True):
        with np.load(before) as old, np.load(after) as new:
            assert np.array_equal(old["tumour"], new["tumour"])
            assert np.array_equal(old["ring"], new["ring"])
            window = np.clip(old["ct"], -200, 300)  # the packed window, in 2 HU steps
            assert np.abs(new["ct"] - window).max() <= 1
    with pytest.raises(ValueError, match="do not fit uint8"):
        pack_cohort(data, tmp_path / "fine.npz", hu_step=1.0)
    tabular = replace(PRESETS["tiny"], fusion="late")
    first = run_study(data, tabular, tmp_path / "a", 2, 3, [], "cpu")
    again = run_study(unpacked, tabular, tmp_path / "b", 2, 3, [], "cpu")
    assert again.metrics["models"] == first.metrics["models"]


@pytest.mark.slow
def test_a_site_missing_a_crop_is_named(cohort_run, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(cohort_run[0], cohort)
    cfg = load_site_config(sorted(cohort.glob("*/site.toml"))[1])
    patient = pd.read_parquet(cfg.paths.output / FEATURES_FILE)["patient_id"].iloc[0]
    crop_path(cfg, str(patient)).unlink()
    with pytest.raises(ValueError, match=rf"{cfg.site_id}: 1 crops missing, e.g. .*{patient}"):
        load_cohort(cohort)


@pytest.mark.slow
def test_selector_sees_training_rows_only(cohort_run):
    _, _, result = cohort_run
    data = load_cohort(cohort_run[0])  # features are cached now: no extraction
    radiomics = data.radiomics.replace([np.inf, -np.inf], np.nan)
    for fold in result.folds:
        test_ids = set(data.ids[fold.test])
        assert not test_ids & set(fold.selector_fit_ids)
        assert sorted(fold.selector_fit_ids) == sorted(data.ids[fold.train])
        # the selector's standardisation statistics are those of the training rows alone
        train = radiomics.iloc[fold.train]
        imputed = SimpleImputer(strategy="median").set_output(transform="pandas").fit(train)
        columns = fold.selector.scaler_.feature_names_in_
        train_mean = imputed.transform(train)[columns].mean().to_numpy()
        all_mean = imputed.transform(radiomics)[columns].mean().to_numpy()
        np.testing.assert_allclose(fold.selector.scaler_.mean_, train_mean, rtol=1e-9)
        assert not np.allclose(fold.selector.scaler_.mean_, all_mean, rtol=1e-9)


@pytest.mark.parametrize("fusion", ["late", "joint"])
def test_same_seed_same_metrics(tmp_path, fusion):
    table = noise_table(tmp_path / "t.csv", n=120, p=40, signal=True)
    preset = replace(PRESETS["tiny"], fusion=fusion)
    runs = []
    for name in ("a", "b"):
        data = load_table(table, "label", "pid")
        result = run_study(data, preset, tmp_path / name, seed=5)
        runs.append({k: v for k, v in result.metrics.items() if k != "timing_s"})
        assert result.metrics["models"]["none/radiomics"]["pooled"]["auc"] > 0.6  # it learns
        assert result.metrics["config"]["preset"]["fusion"] == fusion
    assert json.dumps(runs[0]) == json.dumps(runs[1])
    other = run_study(load_table(table, "label", "pid"), preset, tmp_path / "c", seed=6)
    assert other.metrics["models"] != runs[0]["models"]


def test_repeated_study_is_the_study_once_per_fold_seed(tmp_path):
    """``repeats = 3``: repeat k is exactly the study with fold seed ``seed + k``, and the
    summary's AUCs, spreads, paired differences and counts are those of the repeats."""
    table = noise_table(tmp_path / "t.csv", n=120, p=40, signal=True)
    out = tmp_path / "rep"
    summary = run_repeated_study(load_table(table, "label", "pid"), PRESETS["tiny"], out, 3, seed=4)
    assert summary["seeds"] == [4, 5, 6] and summary["repeats"] == 3
    assert json.loads((out / "repeats.json").read_text()) == summary
    runs = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (4, 5, 6)]
    run_study(load_table(table, "label", "pid"), PRESETS["tiny"], tmp_path / "alone", seed=5)
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    assert json.dumps(alone["models"]) == json.dumps(runs[1]["models"])
    for key, model in summary["models"].items():
        aucs = [run["models"][key]["pooled"]["auc"] for run in runs]
        assert model["auc_per_repeat"] == aucs
        assert model["auc_mean"] == pytest.approx(np.mean(aucs))
        assert model["auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
        assert (model["auc_min"], model["auc_max"]) == (min(aucs), max(aucs))
    assert len(set(summary["models"]["none/radiomics"]["auc_per_repeat"])) == 3  # splits differ
    fused = "none/radiomics+clinical"
    versus = summary["models"][fused]["versus_single_groups"]
    assert set(versus) == {"none/radiomics", "none/clinical"}
    for single, test in versus.items():
        paired = [run["models"][fused]["versus_single_groups"][single] for run in runs]
        differences = [entry["auc_difference"] for entry in paired]
        assert test["difference_per_repeat"] == differences
        assert test["p_per_repeat"] == [entry["p"] for entry in paired]
        assert test["difference_mean"] == pytest.approx(np.mean(differences))
        assert test["repeats_above"] == sum(d > 0 for d in differences)
    del runs[2]["models"][fused]
    with pytest.raises(ValueError, match="repeats differ in their models"):
        summarise_repeats(runs)


@pytest.mark.slow
def test_late_fusion_scores_with_the_mean_logit_of_the_single_group_models(cohort_run):
    """With ``fusion = "late"`` a model of several groups gives each patient the sigmoid of the
    mean logit of that fold's single-group models of its groups (the deep one of its own
    backbone). The presets fuse jointly, as the seed paper."""
    _, out, result = cohort_run
    assert {preset.fusion for preset in PRESETS.values()} == {"joint"}
    assert result.metrics["config"]["preset"]["fusion"] == "late"
    oof = pd.read_csv(out / "oof_predictions.csv")
    fused = [key for key in result.metrics["models"] if "+" in key]
    assert len(fused) == 1 + 2 * 3  # radiomics+clinical, and three per backbone

    def logit(p: pd.Series) -> np.ndarray:
        p = np.clip(p.to_numpy(), 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    for key in fused:
        backbone, groups = key.split("/")
        singles = [model_key(backbone if g == "deep" else None, (g,)) for g in groups.split("+")]
        mean_logit = np.mean([logit(oof[single]) for single in singles], axis=0)
        np.testing.assert_allclose(oof[key], 1 / (1 + np.exp(-mean_logit)), rtol=1e-9)
        assert not np.allclose(oof[key], oof[singles[0]])


def test_permuted_labels_give_chance_auc(tmp_path):
    """Many noise features, few rows: selection fitted on all rows would pick features that
    happen to match the test rows' labels too and lift the AUC well above 0.5."""
    table = pd.read_csv(noise_table(tmp_path / "noise.csv", n=240, p=400, seed=1))
    aucs = []
    for permutation in range(3):
        shuffled = table.copy()
        shuffled["label"] = np.random.default_rng(permutation).permutation(table["label"])
        shuffled.drop(columns=["age", "sex", "n_stage", "subsite"]).to_csv(
            tmp_path / "perm.csv", index=False
        )
        data = load_table(tmp_path / "perm.csv", "label", "pid")
        result = run_study(data, PRESETS["tiny"], tmp_path / f"p{permutation}", seed=permutation)
        aucs.append(result.metrics["models"]["none/radiomics"]["pooled"]["auc"])
    assert abs(np.mean(aucs) - 0.5) < 0.1, aucs


@pytest.mark.slow
@pytest.mark.skipif(not REAL_TABLE.is_file(), reason=f"real reference table absent: {REAL_TABLE}")
def test_real_table(tmp_path):
    data = load_table(REAL_TABLE, "Distant", "id")
    assert (len(data.ids), int(data.labels.sum())) == (201, 19)
    # 98 CT (_x) + 98 PET (_y) + 7 unsuffixed original_* features; no outcome column
    assert data.radiomics.shape[1] == 203
    assert all(c.startswith("original_") for c in data.radiomics.columns)
    assert set(data.subsite) == {"oropharynx"}
    result = run_study(data, PRESETS["demo"], tmp_path / "real", seed=0)
    pooled = result.metrics["models"]["none/radiomics"]["pooled"]
    print("real table, radiomics pooled AUC", pooled["auc"], pooled["auc_ci"])
    assert pooled["auc"] > 0.55


@pytest.mark.slow
def test_cli_tabular(tmp_path):
    table = noise_table(tmp_path / "t.csv", n=90, p=30, signal=True)
    out = tmp_path / "run"
    command = ["study", "--table", str(table), "--label", "label", "--id", "pid"]
    command += ["--preset", "tiny", "--folds", "2", "--out", str(out), "--fusion", "late"]
    done = run_fedmets(*command)  # not a terminal: one table row per line
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["folds"] == 2 and metrics["oracle_auc"] is None
    assert metrics["config"]["preset"]["fusion"] == "late"
    printed = done.stdout.replace("│", " ")
    assert re.search(r"none/radiomics\+clinical\s+\S+ \[", printed)
    assert re.search(r"none/radiomics\+clinical\s+none/clinical\s+[+-]\d", printed)  # paired
    for figure in ("roc.png", "calibration.png", "ablation.png"):
        assert (out / figure).is_file()
    bad = run_fedmets("study", "--out", out)
    assert bad.returncode == 1 and "exactly one of --cohort and --table" in bad.stderr
    repeated = run_fedmets(*command[:-2], "--repeats", "2", "--seed", "3")
    assert repeated.returncode == 0, repeated.stderr
    assert json.loads((out / "repeats.json").read_text())["seeds"] == [3, 4]
    assert (out / "seed-4" / "metrics.json").is_file()
    printed = repeated.stdout.replace("│", " ")
    assert re.search(r"none/radiomics\s+0\.\d{3} \(0\.\d{3}\)\s+0\.\d{3} - 0\.\d{3}", printed)
    assert re.search(r"none/radiomics\+clinical\s+none/clinical\s+[+-]\d\.\d{3}\s+[0-2]/2", printed)


def test_fusion_options_auc_monitor_and_deep_compression():
    """The preset's fusion guards (deep bottleneck, group dropout, AUC early stopping) run
    end to end in ``_fit_fusion``, repeat with the seed, and the AUC monitor keeps the epoch
    of the best inner-validation AUC."""
    rng = np.random.default_rng(0)
    n = 160
    y = (rng.random(n) < 0.25).astype(int)
    groups = {
        "deep": rng.normal(size=(n, 48)).astype(np.float32),
        "radiomics": (rng.normal(size=(n, 6)) + 0.8 * y[:, None]).astype(np.float32),
        "clinical": rng.normal(size=(n, 4)).astype(np.float32),
    }
    preset = replace(
        PRESETS["tiny"],
        fusion_bottleneck={"deep": 2},
        fusion_group_dropout=0.3,
        fusion_monitor="auc",
    )
    train, test = np.arange(120), np.arange(120, n)
    first = _fit_fusion(groups, y, train, test, preset, seed=1)
    second = _fit_fusion(groups, y, train, test, preset, seed=1)
    np.testing.assert_array_equal(first.test, second.test)
    assert first.train.shape == (len(train),) and first.test.shape == (len(test),)
    assert roc_auc_score(y[test], first.test) > 0.7
    X = np.concatenate(list(groups.values()), axis=1)
    model = FusionNet({g: m.shape[1] for g, m in groups.items()}, (8,), bottleneck={"deep": 2})
    history = train_fusion(
        model, X, y, epochs=15, lr=1e-2, pos_weight=3.0, seed=0, patience=None, monitor="auc"
    )
    aucs = history["val_auc"]
    assert history["best_epoch"] == 1 + aucs.index(max(aucs))
