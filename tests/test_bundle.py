"""The final model and its bundle: trained on every patient after cross-validation, written by the
centre, applied by a site (`fedmets site predict`) with the very scores the run gave."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import run_fedmets
from sklearn.metrics import roc_auc_score
from test_study import noise_table

from fedmets.client.extract import extract_site
from fedmets.client.policy import ScoreGroups
from fedmets.client.predict import evaluate_bundle, predict_site
from fedmets.client.recalibration import apply, recalibrate
from fedmets.client.release import site_audit_path
from fedmets.client.site_worker import SiteWorker
from fedmets.server.bundle import deliver_bundle, evaluate_held_out, held_out_metrics, write_bundle
from fedmets.server.protocol import FederatedProtocol
from fedmets.server.results import HeldOut, LeaveOneSiteOut, to_jsonable, typed
from fedmets.shared.bundle import load_bundle, save_bundle
from fedmets.shared.config import FederationConfig, load_site_config
from fedmets.shared.metrics import calibration_slope_intercept
from fedmets.simulation.feature_sites import write_feature_sites
from fedmets.simulation.holdout import held_out_validation, leave_one_site_out
from fedmets.simulation.in_process import InProcessLink
from fedmets.simulation.site_files import write_site_config


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


def _three_sites(tmp_path, run: str, model: dict) -> tuple[dict, FederationConfig]:
    """Three tabular sites (70, 60, 50 patients, 2 folds) and a short federation (2 folds, 4
    fusion rounds, top 8 radiomics, a final model) with ``[model]`` settings ``model``."""
    tomls = write_feature_sites(tmp_path / "sites", [70, 60, 50], seed=2, folds=2)
    configs = {load_site_config(t).site_id: load_site_config(t) for t in tomls}
    fed = FederationConfig.model_validate(
        {
            "run": {"name": run, "seed": 3},
            "cv": {"folds": 2},
            "stages": {"fusion_rounds": 4, "fusion_local_epochs": 2},
            "selection": {"top_k": 8, "rf_trees": 20},
            "model": model,
        }
    )
    return configs, fed


@pytest.mark.parametrize("fusion", ["joint", "late"])
def test_the_bundle_scores_every_patient_as_the_run_did(tmp_path, fusion):
    configs, fed = _three_sites(tmp_path, "final", {"fusion_members": 2, "fusion": fusion})
    result, workers = _run(configs, fed, "final", tmp_path)
    final = result["final"]
    assert set(final["rounds"]) == set(final["fusion"])  # each network: its median round
    # two members per model, each trained and picking its own round (under late fusion the
    # single-group models only)
    curves = result["folds"][0]["fusion"]
    assert {"none/radiomics", "none/radiomics~1"} <= set(curves)
    assert ("none/radiomics+clinical~1" in curves) == (fusion == "joint")
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
    # the final message: every site keeps the bundle, byte for byte what the centre wrote
    kept = deliver_bundle(InProcessLink(workers), tmp_path / "model", "final", lambda _: None)
    assert kept == dict.fromkeys(configs, "stored")
    card = (tmp_path / "model" / "MODEL_CARD.md").read_text()
    for cfg in configs.values():
        assert load_bundle(cfg.paths.output / "model").digest() == bundle.digest()
        assert (cfg.paths.output / "model" / "MODEL_CARD.md").read_text() == card
    main_auc = manifest["cross_validated"][result["main_model"]]["auc"]
    for heading in ("Intended use", "Predictors", "Performance", "Calibration", "Limitations"):
        assert f"## {heading}" in card
    assert f"| **{result['main_model']}** | 180 | {main_auc:.3f} [" in card
    # tabular sites: the card names their tables, not a CT, contour or peritumoral ring
    assert "from radiomics features of the tumour from the sites' feature tables" in card
    assert "planning CT" not in card and "peritumoral ring" not in card
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
        _check_contributions(predicted, fusion)
        assert pd.read_csv(tmp_path / f"{site}.csv").shape == predicted.shape


@pytest.mark.slow
def test_the_main_models_network_is_chosen_on_inner_validation_and_kept_in_the_bundle(tmp_path):
    """``[model] main_radiomics`` x ``main_hidden``: per fold the main model's network is the
    candidate with the lowest pooled inner-validation loss (its radiomics width and hidden
    layers its own); the final model keeps the one chosen in most folds, and the bundle scores
    with it as the run did."""
    choice = {"main_radiomics": [0, 4, 8], "main_hidden": [[], [8]]}
    configs, fed = _three_sites(tmp_path, "chosen", choice)
    result, workers = _run(configs, fed, "chosen", tmp_path)
    main = result["main_model"]
    candidates = [f"{main}#r{k}#h{h}" for k in (0, 4, 8) for h in ("", "8")]
    for fold in result["folds"]:
        figures = fold["main_candidates"]
        assert list(figures) == candidates and all(np.isfinite(list(figures.values())))
        assert fold["main_network"] == min(candidates, key=lambda c: figures[c])
        assert main not in fold["fusion"] and set(candidates) <= set(fold["fusion"])
        width = int(fold["main_network"].split("#r")[1].split("#")[0])
        radiomics = [b for b in fold["importance"]["blocks"] if b.startswith("radiomics:")]
        assert len(radiomics) == width  # the chosen network's own inputs
    chosen = [fold["main_network"] for fold in result["folds"]]
    kept = [n for n in result["final"]["fusion"] if "#" in n]
    assert len(kept) == 1 and chosen.count(kept[0]) == max(map(chosen.count, candidates))
    assert load_bundle(tmp_path / "model").manifest["fusion"]["networks"].count(kept[0]) == 1
    for site, cfg in configs.items():
        predicted = predict_site(cfg, tmp_path / "model", tmp_path / f"{site}.csv")
        in_run = _final_scores(workers[site], "chosen", main)
        np.testing.assert_allclose(predicted[f"risk:{main}"], in_run, rtol=0, atol=1e-6)


def _check_contributions(predicted: pd.DataFrame, fusion: str) -> None:
    """Each patient's blocks ranked by their contribution; under late fusion (the main model
    the mean logit of its single-group models) occluding the clinical block moves the main
    log-odds by half the clinical model's log-odds, plus a constant (its output at the mean)."""
    blocks = {"radiomics", "clinical"}
    contributions = predicted[[f"contribution:{b}" for b in sorted(blocks)]]
    assert np.isfinite(contributions.to_numpy()).all()
    for _, row in predicted.iterrows():
        ranked = row["top_blocks"].split(" > ")
        assert set(ranked) == blocks
        values = [row[f"contribution:{b}"] for b in ranked]
        assert values == sorted(values, reverse=True)
    if fusion == "late":
        p = predicted["risk:none/clinical"].to_numpy()
        half_logit = np.log(p / (1 - p)) / 2
        offset = predicted["contribution:clinical"].to_numpy() - half_logit
        np.testing.assert_allclose(offset, offset.mean(), atol=1e-5)


@pytest.mark.slow
def test_a_bundle_that_does_not_fit_the_site_is_refused(tmp_path):
    tomls = write_feature_sites(tmp_path / "sites", [60, 60], seed=4, folds=2)
    configs = {load_site_config(t).site_id: load_site_config(t) for t in tomls}
    fed = FederationConfig.model_validate(
        {"run": {"name": "fit", "seed": 1}, "cv": {"folds": 2}, "stages": {"fusion_rounds": 2}}
    )
    _run(configs, fed, "fit", tmp_path)
    site = next(iter(configs.values()))
    model = tmp_path / "model"
    bundle = load_bundle(model)
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["thresholds"] = {k: 0.05 for k in manifest["thresholds"]}  # edited by hand
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the bundle bundle.sha256 names"):
        predict_site(site, model)
    arrays = (model / "arrays.npz").read_bytes()
    (model / "arrays.npz").write_bytes(arrays[: len(arrays) // 2])
    with pytest.raises(ValueError, match="arrays.npz: unreadable or truncated"):
        predict_site(site, model)
    manifest["params_hash"] = "0" * 64  # a bundle of other settings, as written
    manifest["radiomics_features"][0] = "original_firstorder_NotAFeature"
    save_bundle(model, manifest, bundle.arrays)
    with pytest.raises(ValueError) as refused:
        predict_site(site, model)
    message = str(refused.value)
    assert "extraction settings differ" in message and "original_firstorder_NotAFeature" in message
    shutil.rmtree(tmp_path / "model")
    with pytest.raises(ValueError, match="manifest.json: missing"):
        predict_site(next(iter(configs.values())), tmp_path / "model")


def test_a_run_folder_given_as_the_bundle_names_the_bundle_inside_it(tmp_path):
    """`site predict --model runs/demo` (the run, not its bundle): the refusal says where the
    bundle is; a folder without one says only that it is none."""
    (tmp_path / "run" / "federated" / "model").mkdir(parents=True)
    (tmp_path / "run" / "federated" / "model" / "manifest.json").write_text("{}")
    bundle = tmp_path / "run" / "federated" / "model"
    for given in (tmp_path / "run", tmp_path / "run" / "federated"):
        with pytest.raises(ValueError, match=f"a run's folder: its bundle is {bundle}\\)$"):
            load_bundle(given)
    with pytest.raises(ValueError, match=r"a fedmets model bundle\?$"):
        load_bundle(tmp_path)


@pytest.mark.slow
def test_a_new_list_whose_every_patient_fails_scores_nobody(tmp_path):
    """`fedmets site predict --manifest`: a list without labels, its sex column under another
    name fedmets knows, is scored; next month's list under the same file name, its every
    patient quarantined, is an error naming them; it neither scores last month's patients
    again nor writes a predictions file. A list of no row is an error too. The extraction
    shows its progress."""
    configs = {}
    for i, n in enumerate([60, 60]):
        folder = tmp_path / "sites" / f"site_{i}"
        folder.mkdir(parents=True)
        noise_table(folder / "features.csv", n=n, p=12, seed=i, signal=True)
        toml = write_site_config(
            folder,
            f"site_{i}",
            mode="tabular",
            modalities=["radiomics_table", "clinical"],
            seed=i,
            manifest="features.csv",
            id_column="pid",
            label_column="label",
            policy={"folds": 2},
        )
        configs[f"site_{i}"] = load_site_config(toml)
        extract_site(configs[f"site_{i}"])
    fed = FederationConfig.model_validate(
        {"run": {"name": "lists", "seed": 1}, "cv": {"folds": 2}, "stages": {"fusion_rounds": 2}}
    )
    _run(configs, fed, "lists", tmp_path)
    site = tmp_path / "sites" / "site_0"
    new = site / "new_patients.csv"
    table = pd.read_csv(site / "features.csv").head(6).assign(label="")
    table = table.rename(columns={"sex": "gender"})  # another name fedmets knows for it
    table.assign(pid=[f"march-{i}" for i in range(6)]).to_csv(new, index=False)
    predict = ["site", "predict", "--config", site / "site.toml", "--model", tmp_path / "model"]
    done = run_fedmets(*predict, "--manifest", new, "--out", tmp_path / "march.csv")
    assert done.returncode == 0 and "6 patients scored" in done.stdout, done.stderr
    assert "extracting new_patients.csv: 6/6 patients" in done.stdout  # progress, as extract's
    table.assign(pid=[f"april-{i}" for i in range(6)], age="").to_csv(new, index=False)
    done = run_fedmets(*predict, "--manifest", new, "--out", tmp_path / "april.csv")
    assert done.returncode == 1 and "no patient in" in done.stderr, done.stdout
    assert "quarantined: april-0: new_patients.csv line 2: age:" in done.stderr
    assert not (tmp_path / "april.csv").exists()
    table.head(0).to_csv(new, index=False)  # the header alone
    done = run_fedmets(*predict, "--manifest", new, "--out", tmp_path / "may.csv")
    assert done.returncode == 1 and "new_patients.csv: no patient rows" in done.stderr
    done = run_fedmets(*predict, "--out", tmp_path)  # a folder: said first, in one line
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"--out: cannot write {tmp_path}: a folder, not a file\n"
    gone = site / "june.csv"  # a list that is not there: said first, in one line
    done = run_fedmets(*predict, "--manifest", gone, "--out", tmp_path / "june.csv")
    assert done.returncode == 1 and done.stderr == f"--manifest: {gone}: not found\n"


def _held_out_config(name: str, **sections) -> FederationConfig:
    """The held-out tests' federation: 2 folds, 3 fusion rounds, 8 radiomics features."""
    data = {
        "run": {"name": name, "seed": 2},
        "cv": {"folds": 2},
        "stages": {"fusion_rounds": 3, "fusion_local_epochs": 2},
        "selection": {"top_k": 8, "rf_trees": 20},
    }
    return FederationConfig.model_validate(data | sections)


@pytest.mark.slow
def test_held_out_sites_are_scored_by_the_model_trained_without_them(tmp_path):
    """--holdout / --loso: the final model trained on the other sites, each held-out site's
    release (grouped histograms, confusion counts, Brier sum, calibration fit) giving its
    metrics; nothing of a held-out site enters the training run."""
    tomls = write_feature_sites(tmp_path / "sites", [70, 60, 50], seed=6, folds=2)
    configs = [load_site_config(t) for t in tomls]
    fed = _held_out_config("held")
    summary, replies = held_out_validation(configs, fed, ["site_002"], tmp_path / "holdout")
    assert typed(HeldOut, to_jsonable(summary))
    assert summary["training_sites"] == ["site_000", "site_001"]
    assert summary["cross_validated"]["n"] == 130  # the training sites' patients only
    held = summary["per_site"]["site_002"]
    assert held["n"] == 50 and summary["pooled"]["n"] == 50
    assert {"calibration_slope", "calibration_intercept"} <= set(held)
    assert not (tmp_path / "holdout" / "state" / "site_002").exists()  # never asked anything
    # the release gives the site's accuracy on its score groups and, to the grouping, its AUC
    predicted = predict_site(configs[2], tmp_path / "holdout" / "model", recalibrated=False)
    labels = pd.read_parquet(configs[2].paths.output / "features.parquet")["label"].to_numpy()
    threshold = load_bundle(tmp_path / "holdout" / "model").manifest["thresholds"]
    main = summary["main_model"]
    tp, fn, tn, fp = ScoreGroups(labels, predicted[f"risk:{main}"], 5).confusion(threshold[main])
    assert held["acc"] == pytest.approx((tp + tn) / 50)
    exact = float((predicted["dm_predicted"] == labels).mean())
    assert abs(held["acc"] - exact) <= 9 / 50  # one group (5 to 9 patients) straddles the cut
    assert held["auc"] == pytest.approx(roc_auc_score(labels, predicted["risk"]), abs=0.05)
    assert set(replies["site_002"]) >= {f"hist_pos:{summary['main_model']}", "n"}
    with pytest.raises(ValueError, match="not in the cohort"):
        held_out_validation(configs, fed, ["site_009"], tmp_path / "bad")

    loso = leave_one_site_out(configs, fed, tmp_path / "loso", log=lambda m: None)
    assert typed(LeaveOneSiteOut, to_jsonable(loso))
    assert set(loso["per_site"]) == {"site_000", "site_001", "site_002"}
    assert loso["pooled"]["n"] == 180
    assert loso["runs"]["site_000"]["training_sites"] == ["site_001", "site_002"]


def test_a_deployed_held_out_site_trains_nothing_and_evaluates_the_bundle(tmp_path):
    """[federation] held_out: the site takes the census, is asked nothing until it keeps the
    final bundle, then answers query.bundle_evaluation through its gate with what an in-process
    held-out evaluation releases."""
    tomls = write_feature_sites(tmp_path / "sites", [70, 60, 50], seed=6, folds=2)
    configs = {load_site_config(t).site_id: load_site_config(t) for t in tomls}
    fed = _held_out_config("held-deployed", federation={"held_out": ["site_002"]})
    link = InProcessLink({s: SiteWorker([c]) for s, c in configs.items()})
    said: list[str] = []
    result = FederatedProtocol(link, fed, "held-deployed", said.append).run_all()
    assert sorted(result["census"]) == ["site_000", "site_001"]
    assert result["models"][result["main_model"]]["pooled"]["n"] == 130
    routes = [
        json.loads(line)["route"]
        for line in site_audit_path(configs["site_002"]).read_text().splitlines()
    ]
    assert routes == ["query.census"]  # nothing else before the bundle
    bundle = write_bundle(tmp_path / "model", result, fed)
    assert deliver_bundle(link, bundle, "held-deployed", said.append)["site_002"] == "stored"
    summary = evaluate_held_out(link, bundle, result, fed, said.append)
    assert typed(HeldOut, to_jsonable(summary))
    assert summary["training_sites"] == ["site_000", "site_001"]
    assert summary["held_out"] == ["site_002"] and summary["pooled"]["n"] == 50
    direct = evaluate_bundle(configs["site_002"], bundle, fed.evaluation.histogram_bins)
    bins = fed.evaluation.histogram_bins
    expected = held_out_metrics({"site_002": direct}, result["main_model"], bins)
    assert summary["per_site"] == expected["per_site"]
    last = json.loads(site_audit_path(configs["site_002"]).read_text().splitlines()[-1])
    assert (last["route"], last["sent"], last["patients"]) == ("query.bundle_evaluation", True, 50)
    assert any(line.startswith("held-out site site_002: AUC") for line in said)
    with pytest.raises(ValueError, match="held-out sites evaluate the final model"):
        FederationConfig.model_validate(
            {
                "run": {"name": "bad-held"},
                "federation": {"held_out": ["site_002"]},
                "stages": {"final_model": False},
            }
        )


@pytest.mark.slow
def test_a_site_recalibrates_the_bundle_to_its_own_patients(tmp_path):
    """`fedmets site recalibrate`: the slope and intercept on the main model's log-odds, fitted
    on the site's labelled patients, are applied by `site predict` to that bundle only; the
    recalibrated risk ranks and classes the patients as the bundle did, and a site with too
    few events is refused. The site trained the bundle, so its patients' bundle risks are
    in-sample: the fit is on the run's out-of-fold risks it kept (calibrated there: slope 1,
    intercept 0), not on the bundle's."""
    tomls = write_feature_sites(tmp_path / "sites", [120, 40], seed=8, folds=2)
    configs = {load_site_config(t).site_id: load_site_config(t) for t in tomls}
    fed = FederationConfig.model_validate(
        {"run": {"name": "recal", "seed": 1}, "cv": {"folds": 2}, "stages": {"fusion_rounds": 3}}
    )
    _run(configs, fed, "recal", tmp_path)
    large, small = configs["site_000"], configs["site_001"]
    done = run_fedmets(
        "site", "recalibrate", "--config", large.source, "--model", tmp_path / "model"
    )
    assert done.returncode == 0, done.stderr
    assert "recalibrated (cross-validated)" in done.stdout
    fitted = json.loads((large.paths.output / "recalibration.json").read_text())
    assert fitted["bundle_sha256"] == load_bundle(tmp_path / "model").digest()
    assert fitted["fitted_on"] == "out-of-fold recal"
    predicted = predict_site(large, tmp_path / "model")
    assert predicted["recalibrated"].all()
    worker = SiteWorker([large])
    fold, oof = worker.out_of_fold("recal", [fitted["model"]], 2)
    assert (fold >= 0).all()
    recalibrated = apply(oof[fitted["model"]], fitted["slope"], fitted["intercept"])
    slope, intercept = calibration_slope_intercept(worker.data.labels, recalibrated)
    assert slope == pytest.approx(1.0, abs=5e-3) and intercept == pytest.approx(0.0, abs=5e-3)
    in_sample = calibration_slope_intercept(worker.data.labels, predicted["risk_bundle"])
    assert abs(in_sample[0] - fitted["slope"]) > 0.05  # what a fit on the bundle's risks gives
    assert (predicted["risk"].rank() == predicted["risk_bundle"].rank()).all()
    threshold = predicted["threshold"].iloc[0]
    assert (predicted["dm_predicted"] == (predicted["risk_bundle"] >= threshold)).all()
    with pytest.raises(ValueError, match="needs at least 10 events"):
        recalibrate(small, tmp_path / "model")
    # another bundle: the site's recalibration is not applied to it
    other = load_bundle(tmp_path / "model")
    save_bundle(tmp_path / "model", {**other.manifest, "run": "other"}, other.arrays)
    assert not predict_site(large, tmp_path / "model")["recalibrated"].any()
