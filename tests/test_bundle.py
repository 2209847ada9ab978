"""The final model and its bundle: trained on every patient after cross-validation, written by the
centre, applied by a site (`fedmets site predict`) with the very scores the run gave."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import run_fedmets

from fedmets.client.predict import predict_site
from fedmets.client.site_worker import SiteWorker
from fedmets.server.bundle import write_bundle
from fedmets.server.protocol import FederatedProtocol
from fedmets.shared.bundle import load_bundle
from fedmets.shared.config import FederationConfig, load_site_config
from fedmets.simulation.feature_sites import write_feature_sites
from fedmets.simulation.in_process import InProcessLink
from fedmets.simulation.simulate import federation_config


def _final_scores(worker: SiteWorker, run: str, model: str) -> np.ndarray:
    """The final model's in-run scores of every patient of ``worker`` (``train_scores`` on
    fold -1 keeps them on the site's disk)."""
    with np.load(worker.state_root / run / "scores-fold-1.npz") as stored:
        assert np.array_equal(stored["rows"], np.arange(len(worker.data.ids)))
        return stored[model.replace("/", "_").replace("+", "_").replace("~", "_")]


def _run(configs: dict, fed: FederationConfig, run: str, out) -> tuple[dict, dict]:
    workers = {site: SiteWorker([cfg]) for site, cfg in configs.items()}
    result = FederatedProtocol(InProcessLink(workers), fed, run).run_all()
    write_bundle(out / "model", result, fed)
    return result, workers


@pytest.mark.parametrize("fusion", ["joint", "late"])
def test_the_bundle_scores_every_patient_as_the_run_did(tmp_path, fusion):
    tomls = write_feature_sites(tmp_path / "sites", [70, 60, 50], seed=2, folds=2)
    configs = {load_site_config(t).site_id: load_site_config(t) for t in tomls}
    fed = FederationConfig.model_validate(
        {
            "run": {"name": "final", "seed": 3},
            "cv": {"folds": 2},
            "stages": {"fusion_rounds": 4, "fusion_local_epochs": 2},
            "selection": {"top_k": 8, "rf_trees": 20},
            "model": {"fusion_members": 2, "fusion": fusion},
        }
    )
    result, workers = _run(configs, fed, "final", tmp_path)
    final = result["final"]
    assert set(final["rounds"]) == set(final["fusion"])  # each network: its median round
    assert all(1 <= r <= 4 for r in final["rounds"].values())
    bundle = load_bundle(tmp_path / "model")
    manifest = bundle.manifest
    assert manifest["models"] == list(result["models"]) and manifest["fusion"]["mode"] == fusion
    assert len(manifest["radiomics_features"]) == 8
    assert manifest["cohort"] == {
        "sites": 3,
        "patients": 180,
        "events": manifest["cohort"]["events"],
    }
    assert manifest["cross_validated"][result["main_model"]] == json.loads(
        json.dumps(result["models"][result["main_model"]]["pooled"])
    )
    n = {site: len(worker.data.ids) for site, worker in workers.items()}
    assert all(v.ndim == 0 or v.shape[0] not in n.values() for v in bundle.arrays.values())
    for site, cfg in configs.items():
        predicted = predict_site(cfg, tmp_path / "model", tmp_path / f"{site}.csv")
        assert list(predicted["patient_id"]) == list(workers[site].data.ids)
        for model in manifest["models"]:
            in_run = _final_scores(workers[site], "final", model)
            np.testing.assert_allclose(predicted[f"risk:{model}"], in_run, rtol=0, atol=1e-6)
        main = manifest["main_model"]
        threshold = manifest["thresholds"][main]
        assert (predicted["dm_predicted"] == (predicted["risk"] >= threshold)).all()
        assert pd.read_csv(tmp_path / f"{site}.csv").shape == predicted.shape


def test_a_bundle_that_does_not_fit_the_site_is_refused(tmp_path):
    tomls = write_feature_sites(tmp_path / "sites", [60, 60], seed=4, folds=2)
    configs = {load_site_config(t).site_id: load_site_config(t) for t in tomls}
    fed = FederationConfig.model_validate(
        {"run": {"name": "fit", "seed": 1}, "cv": {"folds": 2}, "stages": {"fusion_rounds": 2}}
    )
    _run(configs, fed, "fit", tmp_path)
    manifest_file = tmp_path / "model" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["params_hash"] = "0" * 64
    manifest["radiomics_features"][0] = "original_firstorder_NotAFeature"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as refused:
        predict_site(next(iter(configs.values())), tmp_path / "model")
    message = str(refused.value)
    assert "extraction settings differ" in message and "original_firstorder_NotAFeature" in message
    shutil.rmtree(tmp_path / "model")
    with pytest.raises(ValueError, match="manifest.json: missing"):
        predict_site(next(iter(configs.values())), tmp_path / "model")


@pytest.mark.slow
def test_an_image_model_bundle_predicts_through_the_cli(tiny_extracted, tmp_path):
    """The tiny cohort's two sites (images: Swin3D deep features), the final model in process,
    then `fedmets site predict` at each site: the run's scores to 1e-6."""
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_extracted, cohort)
    configs = {}
    for toml in sorted(cohort.glob("*/site.toml")):
        cfg = load_site_config(toml)
        configs[cfg.site_id] = cfg
    fed = federation_config("tiny", "final-images", 5)
    result, workers = _run(configs, fed, "final-images", tmp_path)
    assert result["final"]["image"] is not None and "image" in result["final"]["rounds"]
    assert load_bundle(tmp_path / "model").manifest["image"]["backbone"] == "swin3d"
    for site, cfg in configs.items():
        out = tmp_path / f"{site}.csv"
        done = run_fedmets(
            "site", "predict", "--config", cfg.source, "--model", tmp_path / "model", "--out", out
        )
        assert done.returncode == 0, done.stderr
        assert f"{len(workers[site].data.ids)} patients scored by" in done.stdout
        predicted = pd.read_csv(out)
        main = result["main_model"]
        np.testing.assert_allclose(
            predicted["risk"], _final_scores(workers[site], "final-images", main), atol=1e-6
        )
