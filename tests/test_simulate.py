"""`fedmets simulate` end to end: a real Flower simulation (SuperLink, simulated SuperNodes,
ServerApp, ClientApps) on a tiny image cohort, then the centralised and local-only baselines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
import torch
from typer.testing import CliRunner

from fedmets.cli import app
from fedmets.shared.app_digest import folder_digest
from fedmets.shared.bundle import load_bundle
from fedmets.shared.config import PreprocessSection, load_site_config
from fedmets.shared.image_presets import IMAGE_PRESETS
from fedmets.shared.wire import REPLY_KINDS
from fedmets.simulation import simulate as simulate_module
from fedmets.simulation.feature_sites import write_feature_sites
from fedmets.simulation.simulate import (
    federation_config,
    run_name,
    simulation_resources,
    summary_text,
)
from fedmets.simulation.synth import generate_cohort

FEDMETS = str(Path(sys.executable).parent / "fedmets")
PREPROCESS = "\n[preprocess]\nspacing_mm = [2.0, 2.0, 2.0]\ncrop_voxels = [32, 32, 32]\n"
"""The simulated sites' grid and crops (the tiny cohort's radiomics preset is "fast")."""


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A 3-site tiny cohort (fast radiomics on a 2 mm grid: a third of the 1 mm grid's
    extraction time; 32^3 crops) simulated with the tiny preset's
    settings in fewer rounds, its 3 folds at once, from a federation TOML: (cohort, run
    folder, metrics.json)."""
    root = tmp_path_factory.mktemp("simulate")
    cohort = root / "cohort"
    generate_cohort("tiny", 3, 3, cohort, workers=2)
    for toml in cohort.glob("*/site.toml"):
        toml.write_text(toml.read_text() + PREPROCESS)
    run = root / "run"
    settings = federation_config("tiny", "run", 7).model_dump(mode="json", exclude_none=True)
    settings["stages"] |= {"image_rounds": 1, "fusion_rounds": 3}  # structure, not learning
    settings["federation"]["parallel_folds"] = 3  # the folds' requests in batches
    fed = root / "federation.toml"
    fed.write_text(tomli_w.dumps(settings))
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [FEDMETS, "simulate", "--cohort", str(cohort), "--out", str(run), "--config", str(fed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return cohort, run, json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_metrics_have_every_comparison(simulated) -> None:
    cohort, run, metrics = simulated
    sites = ["hospital_a", "hospital_b", "hospital_c"]
    assert metrics["config"]["sites"] == sites
    assert 0.5 < metrics["oracle_auc"] < 1
    main = metrics["main_model"]
    assert main == "swin3d/deep+radiomics+clinical"
    total = sum(c["n"] for c in metrics["census"].values())
    for arm in ("federated", "centralized"):
        pooled = metrics[arm]["pooled"]
        assert {"auc", "acc", "sen", "spe", "auc_ci", "brier"} <= set(pooled)
        assert pooled["n"] == total
    assert set(metrics["federated"]["per_site"]) == set(sites)
    assert set(metrics["local_only"]["per_site"]) == set(sites)
    assert len(metrics["ablation"]) == 7
    stages = {"selection", "image", "deep", "fusion", "thresholds", "importance", "total"}
    assert set(metrics["federated"]["timing_s"]) == stages  # seconds per stage, all folds
    summary = (run / "summary.txt").read_text()
    assert summary.startswith("fedmets simulation: 3 sites")
    assert re.search(r"federated +[\d.]+ +\(selection \d+, image \d+, deep \d+", summary)
    assert re.search(r"baselines +[\d.]+ +side by side: centralised \d+ \(selection", summary)
    assert set(metrics["timing_s"]) == {"federated", "baselines", "total"}
    (installed,) = (run / "flwr-home" / "apps").iterdir()  # the bundle Flower ran
    assert metrics["app_sha256"] == folder_digest(installed)
    server_log = (run / "federated" / "server.log").read_text()
    assert "3 folds at once" in server_log and "fold 3: done" in server_log
    # the plain model beside the main one, through the same protocol, federated and pooled
    logistic = metrics["baselines"]["logistic"]
    assert logistic["model"] == "none/radiomics+clinical"
    assert all(logistic[arm]["n"] == total for arm in ("federated", "centralized"))
    assert re.search(r"logistic baseline \(none/radiomics\+clinical\):\n  federated +AUC", summary)
    effect = metrics["site_effect"]
    assert 0 <= effect["before"] <= 1 and effect["after"] is None and effect["folds"] == 3
    stability = metrics["federated"]["selection_stability"]
    assert stability["folds"] == 3 and 0 <= stability["mean_jaccard"] <= 1


@pytest.mark.slow
def test_sites_kept_their_state_and_audit_log_on_their_disk(simulated) -> None:
    cohort, run, metrics = simulated
    for site in ("hospital_a", "hospital_b", "hospital_c"):
        state = cohort / site / "cache" / "federated" / run.name
        assert (state / "folds.npz").is_file()
        assert len(list(state.glob("deep-fold*.npy"))) == 3 + 1  # the folds', the final model's
        audit = cohort / site / "output" / "audit" / "wire-audit.jsonl"
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        routes = {e["route"] for e in entries}
        assert {"query.census", "query.covariance", "train.image", "train.fusion"} <= routes
        assert all(e["sent"] for e in entries)
        kinds = {f["kind"] for e in entries for f in e["fields"].values()}
        assert kinds <= {str(k) for k in REPLY_KINDS}


@pytest.mark.slow
def test_the_servers_bundle_scores_each_site_as_the_run_did(simulated) -> None:
    """The ServerApp's final model (every patient, fold -1) and bundle, which every site kept
    from the final message: `fedmets site predict` at each site with its own copy gives the
    final model's in-run scores (Swin3D deep features, through the Flower simulation's own
    code) to 1e-6."""
    cohort, run, metrics = simulated
    bundle = run / "federated" / "model"
    server = json.loads((run / "federated" / "federated.json").read_text())
    assert server["model"]["bundle"] == str(bundle) and "final" not in server
    sites = ("hospital_a", "hospital_b", "hospital_c")
    assert server["model"]["sites"] == dict.fromkeys(sites, "stored")
    digest = load_bundle(bundle).digest()
    kept = {site: load_site_config(cohort / site / "site.toml").paths.output for site in sites}
    assert all(load_bundle(folder / "model").digest() == digest for folder in kept.values())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["image"]["backbone"] == "swin3d" and manifest["cohort"]["sites"] == 3
    main = metrics["main_model"]
    for site in sites:
        out = run / f"predict-{site}.csv"
        toml = cohort / site / "site.toml"
        own = kept[site] / "model"
        done = CliRunner().invoke(
            app, ["site", "predict", "--config", str(toml), "--model", str(own), "--out", str(out)]
        )
        assert done.exit_code == 0, done.output
        state = cohort / site / "cache" / "federated" / run.name
        with np.load(state / "scores-fold-1.npz") as stored:
            in_run = stored[main.replace("/", "_").replace("+", "_")]
        np.testing.assert_allclose(pd.read_csv(out)["risk"], in_run, atol=1e-6)


@pytest.mark.slow
def test_flower_processes_are_gone_and_flwr_home_is_inside_the_run(simulated) -> None:
    _, run, _ = simulated
    assert (run / "flwr-home" / "config.toml").is_file()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run / "flwr-home") not in ps


@pytest.mark.slow
def test_site_explains_its_image_model_locally(simulated) -> None:
    cohort, run, _ = simulated
    site = cohort / "hospital_a"
    done = subprocess.run(
        [
            FEDMETS,
            "site",
            "explain",
            "--config",
            str(site / "site.toml"),
            "--run",
            run.name,
            "--fold",
            "1",
            "--patients",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    pngs = sorted((site / "output" / "explain" / run.name).glob("*/occlusion-z*.png"))
    assert 1 <= len(pngs) <= 3 and all(p.stat().st_size > 2000 for p in pngs)


def test_the_summary_of_a_real_cohort_says_its_oracle_auc_is_unknown() -> None:
    pooled = {"auc": 0.6571, "auc_ci": [0.48, 0.834], "acc": 0.7}
    metrics = {
        "main_model": "none/radiomics",
        "config": {"sites": ["chum"]},
        "federated": {"pooled": pooled, "per_site": {"chum": pooled}, "timing_s": {}},
        "timing_s": {"federated": 12.0},
    }
    real = summary_text({**metrics, "oracle_auc": None}).splitlines()
    assert real[1] == "oracle AUC (true risk, pooled): unknown (not a synthetic cohort)"
    synthetic = summary_text({**metrics, "oracle_auc": 0.73324}).splitlines()
    assert synthetic[1] == "oracle AUC (true risk, pooled): 0.733"


def test_sites_get_the_gpu_share_asked_for() -> None:
    assert simulation_resources(3, 0.0) == "num-supernodes=3 client-resources-num-cpus=1"
    assert simulation_resources(4, 0.5) == (
        "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.5"
    )
    fed = federation_config("gpu", "gpu-run", 1)
    assert fed.simulation.gpus_per_site == 0.5
    assert federation_config("demo", "demo-run", 1).simulation.gpus_per_site == 0


def test_the_paper_preset_reads_the_demo_crops_natively(tmp_path) -> None:
    """``paper``: the demo's training with its networks on 64^3 inputs, the crop side sites
    extract by default (the demo cohort's: nothing upsampled), for 24 image epochs."""
    paper, demo = (federation_config(p, "run", 1) for p in ("paper", "demo"))
    image = IMAGE_PRESETS[paper.model.image_preset][paper.model.backbone]
    assert [image.crop_voxels] * 3 == PreprocessSection().crop_voxels == [64, 64, 64]
    assert paper.stages.image_rounds * paper.stages.local_epochs == 24
    assert paper.model_dump(exclude={"stages", "model"}) == demo.model_dump(
        exclude={"stages", "model"}
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_a_gpu_share_without_a_gpu_is_refused(tmp_path) -> None:
    command = ["simulate", "--cohort", str(tmp_path), "--out", str(tmp_path / "run")]
    done = CliRunner().invoke(app, [*command, "--gpus-per-site", "1"])
    assert done.exit_code == 1
    assert "gpus_per_site 1: no CUDA GPU on this machine" in done.output


def test_a_run_folder_is_not_replaced_unasked_and_a_holdout_typo_stops_at_once(tmp_path) -> None:
    """A second run into a finished run's folder is refused before anything is removed, and a
    misspelt --holdout site before anything is extracted or run (no --out folder made)."""
    cohort = tmp_path / "sites"
    write_feature_sites(cohort, [20, 20], seed=1, folds=2)
    run = tmp_path / "My Run.v2"
    (run / "federated" / "model").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    command = ["simulate", "--cohort", str(cohort), "--preset", "tiny", "--no-baselines"]
    done = CliRunner().invoke(app, [*command, "--out", str(run)])
    assert (
        done.exit_code == 1
        and "holds a run already" in done.output
        and "--overwrite" in done.output
    )
    assert (run / "federated" / "model").is_dir() and (run / "metrics.json").read_text() == "{}"
    typo = tmp_path / "typo"
    done = CliRunner().invoke(app, [*command, "--out", str(typo), "--holdout", "site_009"])
    assert done.exit_code == 1 and "--holdout: sites not in the cohort" in done.output
    assert "site_009" in done.output and not typo.exists()
    done = CliRunner().invoke(app, [*command, "--out", str(run / "metrics.json")])
    assert done.exit_code == 1 and "metrics.json is a file, not a run folder" in done.output
    every = CliRunner().invoke(
        app, [*command, "--out", str(typo), "--holdout", "site_000,site_001"]
    )
    assert every.exit_code == 1 and not typo.exists()
    assert "--holdout: 0 of the cohort's 2 sites would train, fewer than [federation]" in (
        every.output.replace("\n", "")
    )
    assert run_name(run) == "my-run-v2" and run_name(tmp_path / "_") == "simulation"


def test_overwrite_removes_the_replaced_runs_held_out_bundles(tmp_path, monkeypatch) -> None:
    """``--overwrite`` without ``--holdout``/``--loso``: the replaced run's held-out bundles go
    with its other results, so that none is taken for the new run's."""

    def stop(*_args, **_kwargs):
        raise RuntimeError("stopped here")

    monkeypatch.setattr(simulate_module, "run_flower_simulation", stop)
    cohort = tmp_path / "sites"
    write_feature_sites(cohort, [20, 20], seed=1, folds=3)
    run = tmp_path / "run"
    for old in ("federated/model", "holdout/model", "loso/site_000/model"):
        (run / old).mkdir(parents=True)
    command = ["simulate", "--cohort", str(cohort), "--preset", "tiny", "--out", str(run)]
    done = CliRunner().invoke(app, [*command, "--no-baselines", "--overwrite"])
    assert done.exit_code == 1 and "stopped here" in done.output
    assert not (run / "holdout").exists() and not (run / "loso").exists()


def test_a_held_out_site_too_small_for_its_own_combat_batch_stops_at_once(
    tmp_path, monkeypatch
) -> None:
    """Under ComBat a held-out site fits its own batch on at least 20 labelled patients: one of
    15 is refused before the run (was: after the federated run and the training without it)."""

    def no_run(*_args, **_kwargs):
        raise AssertionError("the federated run started")

    monkeypatch.setattr(simulate_module, "run_flower_simulation", no_run)
    cohort = tmp_path / "sites"
    write_feature_sites(cohort, [30, 30, 15], seed=1, folds=2)
    settings = federation_config("tiny", "combat", 7).model_dump(mode="json", exclude_none=True)
    settings["cv"]["folds"] = 2
    settings["harmonisation"] = {"method": "combat", "covariates": ["age"]}
    fed = tmp_path / "federation.toml"
    fed.write_text(tomli_w.dumps(settings))
    command = ["simulate", "--cohort", str(cohort), "--config", str(fed), "--no-baselines"]
    for option in (["--holdout", "site_002"], ["--loso"]):
        done = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "run"), *option])
        assert done.exit_code == 1 and "Traceback" not in done.output
        said = done.output.replace("\n", "")
        assert f'{option[0]}: with [harmonisation] method = "combat"' in said
        assert said.endswith("at least 20: site_002 has 15")


@pytest.mark.slow
def test_a_simulation_stopped_by_sigterm_leaves_no_flower_process(tmp_path) -> None:
    """SIGTERM (``kill``, a batch job's time limit) stops `fedmets simulate` as Ctrl-C does:
    its SuperLink and the simulation it started end with it, none is left running."""
    cohort = tmp_path / "sites"
    write_feature_sites(cohort, [20, 20], seed=1, folds=3)
    run = tmp_path / "run"
    command = [FEDMETS, "simulate", "--cohort", str(cohort), "--preset", "tiny", "--out", str(run)]
    process = subprocess.Popen(
        [*command, "--no-baselines"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    for line in process.stdout:
        if line.startswith("census:"):
            break
    process.send_signal(signal.SIGTERM)
    said = process.communicate(timeout=120)[0]
    assert "stopped: its Flower processes are stopped" in said
    address = re.search(r"127\.0\.0\.1:\d+", (run / "flwr-home" / "config.toml").read_text())[0]
    time.sleep(2)
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    alive = [
        p for p in ps.splitlines() if not p.startswith("Z") and (str(run) in p or address in p)
    ]
    assert alive == []


@pytest.mark.slow
def test_stopped_baselines_end_their_workers_at_once(tmp_path, monkeypatch) -> None:
    """Ctrl-C (or SIGTERM, which `fedmets simulate` turns into one) while the baselines run:
    their worker processes end at once, instead of the command waiting for every baseline
    to finish (seconds here, minutes on the demo cohort)."""
    import multiprocessing

    tomls = write_feature_sites(tmp_path / "sites", [40, 40], seed=1, folds=3)
    configs = [load_site_config(t) for t in tomls]

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulate_module, "wait", interrupted)
    fed = federation_config("tiny", "stopped", 7)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        simulate_module.run_baselines(configs, fed, tmp_path / "run", lambda _: None)
    assert time.monotonic() - started < 15  # the baselines alone take longer
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_a_hospital_that_never_joined_scores_new_raw_patients(simulated, tmp_path) -> None:
    """`fedmets site predict --manifest` at a freshly synthesised site outside the federation:
    eight raw patients (NIfTI; one as a DICOM series + RTSTRUCT, one without a label) are
    checked, extracted with only the bundle's radiomics features and scored; every NIfTI
    patient's scores equal those of a full extraction of the same patients to 1e-6."""
    import SimpleITK as sitk
    from test_ingest import write_dicom_series, write_rtstruct

    from fedmets.client.predict import predict_site

    cohort, run, _ = simulated
    bundle = run / "federated" / "model"
    fresh = tmp_path / "fresh"
    generate_cohort("tiny", 1, 11, fresh, workers=2)
    (toml,) = fresh.glob("*/site.toml")
    site = toml.parent
    toml.write_text(toml.read_text() + PREPROCESS)
    table = pd.read_csv(site / "manifest.csv").head(8)
    table.to_csv(site / "manifest.csv", index=False)  # the reference: a full extraction
    done = subprocess.run(
        [FEDMETS, "site", "extract", "--config", str(toml)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reference = predict_site(load_site_config(toml), bundle).set_index("patient_id")

    ct_file = site / table.loc[0, "ct_path"]
    write_dicom_series(sitk.ReadImage(str(ct_file)), site / "dicom" / "ct")
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(site / table.loc[0, "tumour_mask_path"])))
    write_rtstruct(site / "dicom" / "ct", {"GTVp": tumour}, site / "dicom" / "rtstruct.dcm")
    new = table.copy()
    new.loc[0, ["ct_path", "tumour_mask_path"]] = ["dicom/ct", "dicom/rtstruct.dcm"]
    new["dm"] = new["dm"].astype("Int64")
    new.loc[1, "dm"] = pd.NA  # a patient whose outcome is not known yet
    new.to_csv(site / "new_patients.csv", index=False)
    out = tmp_path / "new.csv"
    done = CliRunner().invoke(
        app,
        ["site", "predict", "--config", str(toml), "--model", str(bundle), "--out", str(out),
         "--manifest", str(site / "new_patients.csv")],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    scored = pd.read_csv(out).set_index("patient_id")
    assert list(scored.index) == list(table["patient_id"])
    assert np.isfinite(scored["risk"]).all() and scored["top_blocks"].notna().all()
    nifti = table["patient_id"].iloc[1:]
    for column in [c for c in reference.columns if c.startswith("risk")]:
        expected = reference.loc[nifti, column]
        np.testing.assert_allclose(scored.loc[nifti, column], expected, atol=1e-6)
    own = load_site_config(toml).paths.output / "predict" / "new_patients"
    extracted = pd.read_parquet(own / "features.parquet")
    radiomics = [c for c in extracted.columns if c.startswith(("tumour_", "ring_"))]
    selected = json.loads((bundle / "manifest.json").read_text())["radiomics_features"]
    assert sorted(radiomics) == sorted(selected)


def test_sites_with_other_folds_than_the_run_stop_at_once(tmp_path) -> None:
    """Sites whose [policy] folds differ from the run's [cv] folds (a split table's 5-fold
    sites with the tiny preset's 3) are refused before anything is written or run, naming
    both keys, instead of after extraction and the Flower run's start."""
    cohort = tmp_path / "sites"
    write_feature_sites(cohort, [20, 20], seed=1, folds=5)
    run = tmp_path / "run"
    command = ["simulate", "--cohort", str(cohort), "--preset", "tiny", "--out", str(run)]
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 1 and not run.exists()
    assert "site_000, site_001 cross-validate with 5 folds ([policy] folds" in done.output
    assert "the run with 3 ([cv] folds of the tiny preset)" in done.output


def test_simulate_prints_its_progress_as_written(tmp_path, monkeypatch) -> None:
    """A progress line naming a config key ([policy] folds) is printed as written, not read
    as rich markup (which dropped the brackets and the key names)."""

    def fake(*args, log, **kwargs):
        log("run stopped: 5 folds ([policy] folds), the run with 3 ([cv] folds)")
        raise RuntimeError("stopped")

    monkeypatch.setattr("fedmets.simulation.simulate.simulate", fake)
    command = ["simulate", "--cohort", str(tmp_path), "--out", str(tmp_path / "run")]
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 1
    assert "5 folds ([policy] folds), the run with 3 ([cv] folds)" in done.output
