"""`fedmets study`: the federated protocol over every patient pooled in one site, once per backbone,
with exact out-of-fold metrics. A tiny synthetic cohort through extraction, image models,
selection and fusion; the study equals simulate's centralised baseline; late fusion; folds in
parallel; tabular mode on synthetic and real feature tables; repeats; the CLI; the packed
cohort that carries an extracted cohort to a GPU machine."""

import importlib.util
import json
import queue
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
from conftest import run_fedmets
from packaging.utils import canonicalize_name

from fedmets.client.crops import HU_WINDOW, load_crops
from fedmets.client.policy import ScoreGroups
from fedmets.client.site_files import FEATURES_FILE, crop_path
from fedmets.client.site_service import SiteService
from fedmets.client.site_worker import SiteNotReady, load_site_data
from fedmets.shared import wire
from fedmets.shared.config import FederationConfig, load_site_config
from fedmets.shared.metrics import metrics_from_histograms
from fedmets.shared.model_names import group_subsets, model_key, single_group_models
from fedmets.simulation import simulate
from fedmets.simulation.packed_cohort import pack_cohort, unpack_cohort
from fedmets.simulation.repeated_study import run_repeated_study, summarise_repeats
from fedmets.simulation.simulate import federation_config
from fedmets.simulation.study import cohort_sites, run_study, table_site

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


SHORT = {"image_rounds": 1, "fusion_rounds": 3}
"""Fewer rounds than the preset, where the test checks structure or identity, not learning."""


def tiny(
    seed: int = 3, folds: int | None = None, stages: dict | None = None, **model: object
) -> FederationConfig:
    """The ``tiny`` preset as the study's federation config, with ``[model]`` and ``[stages]``
    changes and ``folds`` (default the preset's 3, the tiny cohort's own)."""
    data = federation_config("tiny", "study", seed).model_dump(mode="json")
    data["model"] |= model
    data["stages"] |= stages or {}
    data["cv"]["folds"] = folds or data["cv"]["folds"]
    return FederationConfig.model_validate(data)


@pytest.fixture(scope="session")
def cohort_run(tiny_extracted, tmp_path_factory):
    """The tiny preset on a copy of the tiny cohort, two backbones, two folds (the sites' own:
    their configs say 2): (cohort folder, out folder, StudyResult)."""
    root = tmp_path_factory.mktemp("study")
    cohort = root / "cohort"
    shutil.copytree(tiny_extracted, cohort)
    for toml in cohort.glob("*/site.toml"):
        toml.write_text(toml.read_text().replace("\nfolds = 3\n", "\nfolds = 2\n"))
    out = root / "run"
    fed = tiny(folds=2, stages=SHORT)
    result = run_study(cohort_sites(cohort, workers=2), fed, out, ["swin3d", "resnet3d"])
    return cohort, out, result


@pytest.mark.slow
def test_cohort_metrics_structure(cohort_run):
    cohort, out, result = cohort_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert set(metrics) == {
        "config",
        "oracle_auc",
        "oracle_auc_used",
        "models",
        "thresholds",
        "protocol",
        "timing_s",
    }
    oracle = json.loads((cohort / "ground_truth" / "oracle.json").read_text())["pooled"]
    assert metrics["oracle_auc"] == oracle
    assert 0.5 < metrics["oracle_auc_used"] <= 1
    n, positives = metrics["config"]["n_patients"], metrics["config"]["positives"]
    assert 0 < positives < n
    folds = metrics["config"]["folds"]
    expected = [model_key(None, s) for s in group_subsets() if "deep" not in s] + [
        model_key(b, s) for b in ("swin3d", "resnet3d") for s in group_subsets() if "deep" in s
    ]
    assert list(metrics["models"]) == expected
    assert set(metrics["protocol"]) == {"swin3d", "resnet3d"}
    for model in metrics["models"].values():
        pooled = model["pooled"]
        assert POOLED_KEYS <= set(pooled)
        assert (pooled["n"], pooled["positives"]) == (n, positives)
        assert 0 <= pooled["auc"] <= 1 and 0 <= pooled["brier"] <= 1
        low, high = pooled["auc_ci"]
        assert 0 <= low <= pooled["auc"] <= high <= 1
        assert pooled["oracle_auc"] == pytest.approx(metrics["oracle_auc_used"])
        per_fold = model["per_fold"]
        assert [f["fold"] for f in per_fold] == list(range(folds))
        assert sum(f["n"] for f in per_fold) == n
        # pooled accuracy = patients classified right at their fold's threshold, over folds
        assert sum(f["acc"] * f["n"] for f in per_fold) == pytest.approx(pooled["acc"] * n)
        subsites = model["per_subsite"]
        assert sum(s["n"] for s in subsites.values()) == n
    oof, bins = result.oof, tiny(folds=2, stages=SHORT).evaluation.histogram_bins
    y, cut_at = oof["label"].to_numpy(), oof["fold"].to_numpy()
    for key, model in metrics["models"].items():
        protocol = metrics["protocol"]["resnet3d" if key.startswith("resnet3d") else "swin3d"]
        # the study's exact metrics come from the out-of-fold scores; the protocol's are what
        # the pooled site released: the same scores on its score groups of 5 (a group that
        # straddles its fold's threshold is called as a whole)
        exact, released = model["pooled"], protocol["models"][key]["pooled"]
        scores, cut = oof[key].to_numpy(), np.asarray(metrics["thresholds"][key])[cut_at]
        assert exact["acc"] == pytest.approx(np.mean((scores >= cut) == y), abs=1e-12)
        groups = ScoreGroups(y, scores, 5)
        tp, fn, tn, fp = groups.confusion(cut)
        assert released["acc"] == pytest.approx((tp + tn) / n, abs=1e-12)
        pos, neg = groups.histograms(bins)
        edges = np.linspace(0, 1, bins + 1)
        grouped_auc = metrics_from_histograms(pos, neg, edges, 0.5)["auc"]
        assert released["auc"] == pytest.approx(grouped_auc, abs=1e-12)
        assert exact["auc"] == pytest.approx(released["auc"], abs=0.05)  # grouped histograms
        versus = model.get("versus_single_groups", {})
        singles = single_group_models(key)
        assert list(versus) == (singles if len(singles) > 1 else [])
        for single, test in versus.items():
            difference = model["pooled"]["auc"] - metrics["models"][single]["pooled"]["auc"]
            assert test["auc_difference"] == pytest.approx(difference)
        without = model.get("versus_without_radiomics", {})  # what the radiomics add
        groups = key.split("/")[1].split("+")
        if "radiomics" in groups and len(groups) > 1:
            rest = "+".join(g for g in groups if g != "radiomics")
            (other, test), *more = without.items()
            prefix = key.split("/")[0] if "deep" in groups else "none"
            assert not more and other == f"{prefix}/{rest}"
            difference = model["pooled"]["auc"] - metrics["models"][other]["pooled"]["auc"]
            assert test["auc_difference"] == pytest.approx(difference)
        else:
            assert without == {}
        versus = model.get("versus_other_backbones", {})  # the first backbone against the rest
        groups = key.split("/")[1]
        assert list(versus) == ([f"resnet3d/{groups}"] if key.startswith("swin3d") else [])
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert len(oof) == n and set(oof["fold"]) == set(range(folds))
    assert ((oof[expected] >= 0) & (oof[expected] <= 1)).all().all()
    for figure in ("roc.png", "calibration.png", "ablation.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_study_is_simulates_centralised_baseline(cohort_run, tmp_path, monkeypatch):
    """Same seed and settings: the study's protocol run (its first backbone, swin3d) and
    ``fedmets simulate``'s centralised baseline (``simulate._baseline``, here in this process)
    give identical metrics for every model."""
    cohort, _, study = cohort_run
    fed = tiny(folds=2, stages=SHORT)  # the study's
    tomls = sorted(cohort.glob("*/site.toml"))
    assert all(load_site_config(toml).policy.folds == 2 for toml in tomls)
    monkeypatch.setattr(simulate, "_PROGRESS", queue.SimpleQueue())  # its log, unread
    centralized = simulate._baseline(
        "centralized", tomls, fed.model_dump(mode="json"), tmp_path / "simulate"
    )
    protocol = study.metrics["protocol"]["swin3d"]
    assert json.dumps(protocol["models"]) == json.dumps(centralized["models"])
    assert protocol["folds"][0]["thresholds"] == centralized["folds"][0]["thresholds"]


def test_a_table_without_its_id_or_label_column_is_named_as_such(tmp_path):
    """`fedmets study --table`: an --id or --label the table lacks, or a table not there, is
    said so, not as "no labelled patient in .../features.parquet"."""
    table = noise_table(tmp_path / "t.csv", n=20, p=5)
    with pytest.raises(ValueError, match=r"t\.csv: --id: column 'id' not found \(columns found"):
        table_site(table, "label", "id", tmp_path / "a")
    with pytest.raises(ValueError, match=r"t\.csv: --label: column 'DM' not found"):
        table_site(table, "DM", "pid", tmp_path / "b")
    with pytest.raises(ValueError, match=r"--table: .*u\.csv: file not found"):
        table_site(tmp_path / "u.csv", "label", "pid", tmp_path / "c")
    table.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\xec\x00")  # an .xlsx named .csv
    with pytest.raises(ValueError, match=r"t\.csv: a spreadsheet workbook"):
        table_site(table, "label", "pid", tmp_path / "d")


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    table = noise_table(tmp_path / "t.csv", n=20, p=5)
    done = run_fedmets("study", "--table", table, "--label", "label", "--id", "pid", "--out", table)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "t.csv is a file, not a folder for the study" in done.stderr.replace("\n", "")


def test_late_fusion_scores_with_the_mean_logit_of_the_single_group_models(tmp_path):
    """With ``[model] fusion = "late"`` a model of several groups gives each patient the sigmoid
    of the mean logit of that fold's single-group models of its groups; nothing more is
    trained. The presets fuse jointly, as the seed paper."""
    assert tiny().model.fusion == "joint"
    table = noise_table(tmp_path / "t.csv", n=120, p=40, signal=True)
    sites = table_site(table, "label", "pid", tmp_path / "late")
    result = run_study(sites, tiny(fusion="late"), tmp_path / "late")
    oof = result.oof
    assert [key for key in result.metrics["models"] if "+" in key] == ["none/radiomics+clinical"]
    curves = result.metrics["protocol"]["tabular"]["folds"][0]["fusion"]
    assert set(curves) == {"none/radiomics", "none/clinical"}

    def logit(p: pd.Series) -> np.ndarray:
        p = np.clip(p.to_numpy(), 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    mean_logit = (logit(oof["none/radiomics"]) + logit(oof["none/clinical"])) / 2
    np.testing.assert_allclose(oof["none/radiomics+clinical"], 1 / (1 + np.exp(-mean_logit)))
    assert result.metrics["protocol"]["tabular"]["importance"]["model"] is None


@pytest.mark.slow
def test_a_site_missing_a_crop_is_named_at_the_site_alone(cohort_run, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(cohort_run[0], cohort)
    cfg = load_site_config(sorted(cohort.glob("*/site.toml"))[1])
    patient = pd.read_parquet(cfg.paths.output / FEATURES_FILE)["patient_id"].iloc[0]
    crop_path(cfg, str(patient)).unlink()
    with pytest.raises(ValueError, match=rf"{cfg.site_id}: 1 crops missing.*{patient}"):
        run_study(cohort_sites(cohort), tiny(), tmp_path / "run", ["swin3d"])
    # what the centre would hear of it names no patient; the site's own error does
    with pytest.raises(SiteNotReady) as caught:
        SiteService(cfg.source).answer(
            "query.census", wire.to_records("query.census", {}, reply=False)
        )
    assert "1 crops missing" in str(caught.value) and str(patient) not in str(caught.value)
    assert str(patient) in caught.value.local()


def test_folds_in_parallel_need_dp_off(tmp_path):
    table = noise_table(tmp_path / "t.csv", n=120, p=40, signal=True)
    sites = table_site(table, "label", "pid", tmp_path / "dp")
    data = tiny(5).model_dump(mode="json")
    data["dp"] |= {"mode": "sample", "epsilon": 8.0}
    with pytest.raises(ValueError, match="dp.mode 'sample': folds run at once"):
        run_study(
            sites, FederationConfig.model_validate(data), tmp_path / "dp", [], parallel_folds=2
        )


@pytest.mark.slow
def test_folds_in_parallel_give_the_sequential_results(cohort_run, tmp_path):
    """``parallel_folds``: two backbones' runs side by side, their four folds in two fold
    processes, handed over through checkpoints, give the fixture's results of the same
    settings in sequence: the models without images exactly, the image models' kept rounds,
    and up to the rounding of other thread counts their validation losses and thresholds; each
    fold's seconds are its process's."""
    cohort, _, in_sequence = cohort_run
    fed = tiny(folds=2, stages=SHORT)
    backbones = ["swin3d", "resnet3d"]
    at_once = run_study(cohort_sites(cohort), fed, tmp_path, backbones, parallel_folds=2)
    runs = [in_sequence.metrics, at_once.metrics]
    assert runs[1]["models"].keys() == runs[0]["models"].keys()
    tabular = [k for k in runs[0]["models"] if k.startswith("none/")]
    assert tabular and all(runs[1]["models"][k] == runs[0]["models"][k] for k in tabular)
    for backbone in backbones:
        sequential, parallel = (r["protocol"][backbone] for r in runs)
        for one, other in zip(sequential["folds"], parallel["folds"], strict=True):
            assert other["image"]["best_round"] == one["image"]["best_round"]
            assert other["image"]["val_loss"] == pytest.approx(one["image"]["val_loss"], rel=1e-5)
            assert other["thresholds"] == pytest.approx(one["thresholds"], abs=1e-5)
            assert other["seconds"] > 0
        assert set(parallel["timing_s"]) >= {"selection", "image", "fusion", "total"}


@pytest.mark.slow
def test_repeated_study_is_the_study_once_per_repeat(tmp_path):
    """``repeats = 3``: repeat k is exactly the study with ``repeat=k`` (folds from each site's
    seed + k, training seed + k; the same seed gives the same metrics, byte for byte, and
    another seed others), and the summary's AUCs, spreads, paired differences and counts are
    those of the repeats."""
    table = noise_table(tmp_path / "t.csv", n=120, p=40, signal=True)
    out = tmp_path / "rep"
    sites = table_site(table, "label", "pid", out)
    summary = run_repeated_study(sites, tiny(4), out, 3, [])
    assert summary["seeds"] == [4, 5, 6] and summary["repeats"] == 3
    assert json.loads((out / "repeats.json").read_text()) == summary
    runs = [json.loads((out / f"repeat-{k}" / "metrics.json").read_text()) for k in range(3)]
    alone = run_study(sites, tiny(4), tmp_path / "alone", [], repeat=1)
    assert json.dumps(alone.metrics["models"]) == json.dumps(runs[1]["models"])
    assert alone.metrics["config"]["backbones"] == []
    assert runs[0]["models"] != runs[1]["models"] != runs[2]["models"]
    assert summary["models"]["none/radiomics"]["auc_mean"] > 0.6, summary  # it learns
    folds = [pd.read_csv(out / f"repeat-{k}" / "oof_predictions.csv")["fold"] for k in range(3)]
    assert not folds[0].equals(folds[1]) and not folds[1].equals(folds[2])  # folds redrawn
    for key, model in summary["models"].items():
        aucs = [run["models"][key]["pooled"]["auc"] for run in runs]
        assert model["auc_per_repeat"] == aucs
        assert model["auc_mean"] == pytest.approx(np.mean(aucs))
        assert model["auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
    fused = "none/radiomics+clinical"
    versus = summary["models"][fused]["versus_single_groups"]
    assert set(versus) == {"none/radiomics", "none/clinical"}
    for single, test in versus.items():
        differences = [run["models"][fused]["versus_single_groups"][single] for run in runs]
        differences = [entry["auc_difference"] for entry in differences]
        assert test["difference_per_repeat"] == differences
        assert test["repeats_above"] == sum(d > 0 for d in differences)
    del runs[2]["models"][fused]
    with pytest.raises(ValueError, match="repeats differ in their models"):
        summarise_repeats(runs)


@pytest.mark.slow
def test_permuted_labels_give_chance_auc(tmp_path):
    """Many noise features, few rows: selection fitted on all rows would pick features that
    happen to match the test rows' labels too and lift the AUC well above 0.5."""
    table = pd.read_csv(noise_table(tmp_path / "noise.csv", n=240, p=400, seed=1))
    aucs = []
    for permutation in range(3):
        shuffled = table.copy()
        shuffled["label"] = np.random.default_rng(permutation).permutation(table["label"])
        shuffled.drop(columns=["age", "sex", "n_stage", "subsite"]).to_csv(
            tmp_path / f"perm{permutation}.csv", index=False
        )
        out = tmp_path / f"p{permutation}"
        sites = table_site(tmp_path / f"perm{permutation}.csv", "label", "pid", out)
        result = run_study(sites, tiny(permutation), out)
        aucs.append(result.metrics["models"]["none/radiomics"]["pooled"]["auc"])
    assert abs(np.mean(aucs) - 0.5) < 0.1, aucs


@pytest.mark.slow
@pytest.mark.skipif(not REAL_TABLE.is_file(), reason=f"real reference table absent: {REAL_TABLE}")
def test_real_table(tmp_path):
    sites = table_site(REAL_TABLE, "Distant", "id", tmp_path / "real")
    result = run_study(sites, federation_config("demo", "study", 0), tmp_path / "real")
    config = result.metrics["config"]
    assert (config["n_patients"], config["positives"]) == (201, 19)
    # 98 CT (_x) + 98 PET (_y) + 7 unsuffixed original_* features; no outcome column
    assert config["radiomics_columns"] == 203
    assert set(result.oof["subsite"]) == {"oropharynx"}
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
    assert metrics["config"]["federation"]["model"]["fusion"] == "late"
    printed = done.stdout.replace("│", " ")
    assert re.search(r"none/radiomics\+clinical\s+\S+ \[", printed)
    assert re.search(r"none/radiomics\+clinical\s+none/clinical\s+[+-]\d", printed)  # paired
    for figure in ("roc.png", "calibration.png", "ablation.png"):
        assert (out / figure).is_file()
    bad = run_fedmets("study", "--out", out)
    assert bad.returncode == 1 and "exactly one of --cohort and --table" in bad.stderr
    # a federation TOML keeps its own [run] seed (no --seed), and --seed replaces it
    settings = federation_config("tiny", "own", 11).model_dump(mode="json", exclude_none=True)
    (tmp_path / "fed.toml").write_text(tomli_w.dumps(settings))
    for seed, expected in (((), 11), (("--seed", "5"), 5)):
        own = tmp_path / f"own-{expected}"
        given = [*command[:7], "--config", tmp_path / "fed.toml", "--folds", "2", "--out", own]
        done = run_fedmets(*given, *seed)
        assert done.returncode == 0, done.stderr
        assert json.loads((own / "metrics.json").read_text())["config"]["seed"] == expected
    repeated = run_fedmets(*command[:-2], "--repeats", "2", "--seed", "3")
    assert repeated.returncode == 0, repeated.stderr
    assert json.loads((out / "repeats.json").read_text())["seeds"] == [3, 4]
    assert (out / "repeat-1" / "metrics.json").is_file()
    printed = repeated.stdout.replace("│", " ")
    assert re.search(r"none/radiomics\s+0\.\d{3} \(0\.\d{3}\)\s+0\.\d{3} - 0\.\d{3}", printed)
    assert re.search(r"none/radiomics\+clinical\s+none/clinical\s+[+-]\d\.\d{3}\s+[0-2]/2", printed)


# ---- the packed cohort (fedmets.simulation.packed_cohort): the study on a GPU machine ---------
# It carries an extracted cohort to a machine without PyRadiomics or SimpleITK: the sites,
# feature tables, reports and ground truth come back byte for byte, the masks exactly, the CT
# within half a step inside the image models' window (and so every model input within that),
# and the study's pooled worker reads the unpacked cohort as the original. Here, beside the
# other users of the extracted tiny cohort (one fixture per xdist worker).


@pytest.fixture(scope="module")
def unpacked(tiny_extracted, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    summary = pack_cohort(tiny_extracted, root / "cohort.zip", hu_step=10.0)
    return summary, unpack_cohort(root / "cohort.zip", root / "cohort")


def _configs(cohort):
    """The site configs of ``cohort``, sorted."""
    return [load_site_config(p) for p in sorted(cohort.glob("*/site.toml"))]


@pytest.mark.slow
def test_the_sites_come_back_byte_for_byte(tiny_extracted, unpacked):
    summary, cohort = unpacked
    originals = _configs(tiny_extracted)
    assert [c.site_id for c in _configs(cohort)] == [c.site_id for c in originals]
    for original in originals:
        for path in (original.source, original.paths.output / FEATURES_FILE):
            relative = path.resolve().relative_to(tiny_extracted.resolve())
            assert (cohort / relative).read_bytes() == path.read_bytes()
    truth = sorted(p.name for p in (tiny_extracted / "ground_truth").glob("*"))
    assert truth and sorted(p.name for p in (cohort / "ground_truth").glob("*")) == truth
    assert summary["patients"] == sum(len(load_site_data([c]).ids) for c in originals)
    assert summary["rounding_sd_hu"] == pytest.approx(10 / 12**0.5)


@pytest.mark.slow
def test_crops_come_back_within_half_a_step_in_the_window(tiny_extracted, unpacked):
    _, cohort = unpacked
    low, high = HU_WINDOW
    for original, copy in zip(_configs(tiny_extracted), _configs(cohort), strict=True):
        data = load_site_data([original])
        for patient in data.ids[:6]:
            before = np.load(crop_path(original, patient))
            after = np.load(crop_path(copy, patient))
            for key in ("tumour", "ring", "spacing_mm", "origin_mm"):
                np.testing.assert_array_equal(after[key], before[key])
            clipped = np.clip(before["ct"], low, high)
            assert np.abs(after["ct"] - clipped).max() <= 5
        side = np.load(data.crops[0])["ct"].shape[0]
        inputs = [load_crops(load_site_data([c]).crops[:6], side, "ring") for c in (original, copy)]
        assert np.abs(inputs[0] - inputs[1]).max() <= 5 / (high - low) + 1e-6


@pytest.mark.slow
def test_the_study_reads_the_unpacked_cohort_as_the_original(tiny_extracted, unpacked):
    _, cohort = unpacked
    before, after = (load_site_data(_configs(c)) for c in (tiny_extracted, cohort))
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.labels, before.labels)
    assert after.radiomics.equals(before.radiomics)


# The study on the GPU machine of benchmarks/gpu_check.sh: only the distributions of its image
# (benchmarks/gpu_machine_packages.txt: no PyRadiomics, SimpleITK, Flower, ...) and the wheels
# that travel with it (gpu_pack.WHEELS) are there; a module of any other is absent.
ON_THE_GPU_MACHINE = """
import importlib.abc, importlib.metadata, sys
from packaging.utils import canonicalize_name

there = set(sys.argv[2].split(","))
owners = importlib.metadata.packages_distributions()

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = [] if top in sys.stdlib_module_names else owners.get(top, [])
        if dists and not {canonicalize_name(d) for d in dists} & there:
            raise ModuleNotFoundError(f"No module named {top!r} on the GPU machine")

sys.meta_path.insert(0, Absent())
import fedmets.cli, fedmets.simulation.in_process, fedmets.simulation.simulate
from fedmets.client.site_worker import load_site_data
from fedmets.simulation.study import cohort_sites

sites = cohort_sites(sys.argv[1])
print(len(load_site_data(sites.configs).ids))
"""


@pytest.mark.slow
def test_the_study_reads_a_packed_cohort_with_the_gpu_machines_packages(unpacked) -> None:
    summary, cohort = unpacked
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    listed = (benchmarks / "gpu_machine_packages.txt").read_text().split("\n")
    spec = importlib.util.spec_from_file_location("gpu_pack", benchmarks / "gpu_pack.py")
    gpu_pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_pack)
    names = [n for n in listed if n and n[0] != "#"] + list(gpu_pack.WHEELS)
    there = {canonicalize_name(n) for n in names}
    assert {"flwr", "numpy"} <= there and "simpleitk" not in there  # both lists read
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            ON_THE_GPU_MACHINE,
            str(cohort),
            ",".join(sorted(there | {"fedmets"})),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == summary["patients"]


@pytest.mark.slow
def test_a_cohort_without_features_is_named(tiny_cohort, tmp_path):
    with pytest.raises(ValueError, match="no .*features.parquet; extract the site first"):
        pack_cohort(tiny_cohort, tmp_path / "x.zip")


def test_the_study_tables_fold_long_model_names_at_80_columns(monkeypatch):
    """On an 80-column terminal the results and paired tables fold a model's name instead of
    cutting it ('swin3d/radiomics+clinic…' was all the main model's row showed)."""
    import io

    from rich.console import Console

    from fedmets import cli

    pooled = {"auc": 0.7, "auc_ci": [0.6, 0.8], "acc": 0.7, "sen": 0.6, "spe": 0.7}
    pooled |= {"brier": 0.2, "oracle_auc": 0.8}
    paired = {"auc_difference": 0.01, "ci": [-0.1, 0.12], "p": 0.5}
    main, single = "swin3d/radiomics+clinical+deep", "swin3d/deep"
    metrics = {
        "config": {"folds": 5, "n_patients": 200, "positives": 40, "seed": 7},
        "models": {
            single: {"pooled": pooled},
            main: {
                "pooled": pooled,
                "versus_single_groups": {single: paired},
                "versus_without_radiomics": {"swin3d/clinical+deep": paired},
                "versus_other_backbones": {"resnet3d/radiomics+clinical+deep": paired},
            },
        },
        "oracle_auc": None,
        "timing_s": {"total": 1.0},
    }
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, width=80))
    monkeypatch.setattr(cli, "_plain", lambda text: None)
    cli._print_study(metrics, "demo", Path("out"))
    printed = screen.getvalue()
    assert "…" not in printed and max(map(len, printed.splitlines())) <= 80
    rows = [line.split("│") for line in printed.splitlines() if line.startswith("│")]
    first, second = ("".join(row[i].strip() for row in rows) for i in (1, 2))  # folds joined
    assert main in first and "swin3d/clinical+deep" in second
    assert "resnet3d/radiomics+clinical+deep" in second
