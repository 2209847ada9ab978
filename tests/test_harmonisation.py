"""Federated ComBat (``[harmonisation] method = "combat"``): equal to pooled ``neuroCombat`` on
the same training rows, blind to the held-out rows, and guarded by the site's policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from test_protocol import write_table_sites

from fedmets.client.predict import predict_site
from fedmets.client.site_worker import SiteWorker, Withheld
from fedmets.server.bundle import deliver_bundle, write_bundle
from fedmets.server.protocol import FederatedProtocol
from fedmets.shared.bundle import load_bundle
from fedmets.shared.clinical import encoded_columns
from fedmets.shared.config import FederationConfig, load_site_config
from fedmets.shared.harmonisation import (
    MIN_OWN_BATCH,
    BatchAdjustment,
    covariate_columns,
    design_statistics,
    fit_location,
    pooled_variance,
    residual_sumsq,
)
from fedmets.simulation.feature_sites import write_feature_sites
from fedmets.simulation.in_process import InProcessLink
from fedmets.simulation.site_effect import site_effect

SITES = {"site_a": 96, "site_b": 84, "site_c": 72}  # each T stage >= 5 in every fold
P = 12
COVARIATES = ["age", "sex", "t_stage"]


def _table(site: int, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """A features table whose radiomics carry a site shift and scale, an age and sex effect;
    values representable in float32 (neuroCombat computes from float32 data)."""
    age = rng.integers(40, 85, n).astype(float)
    male = (rng.random(n) < 0.55).astype(float)
    stage = rng.permutation(np.arange(n) % 3)  # T1-T3, groups over the floor
    label = (rng.random(n) < 0.3).astype(float)
    noise = rng.normal(size=(n, P)) * (1.0 + 0.6 * site)
    X = 100 + 20 * site + 0.5 * age[:, None] + 3 * male[:, None] + 2 * stage[:, None] + noise
    X = X * np.linspace(1, 40, P)
    radiomics = pd.DataFrame(
        X.astype(np.float32).astype(np.float64),
        columns=[f"tumour_original_f{j:02d}" for j in range(P)],
    )
    clinical = pd.DataFrame(0.0, index=range(n), columns=encoded_columns())
    clinical["age"], clinical["sex_male"] = age, male
    for k in range(4):
        clinical[f"t_stage_t{k + 1}"] = (stage == k).astype(float)
    ids = pd.DataFrame({"patient_id": [f"p{site}-{i:03d}" for i in range(n)], "label": label})
    return pd.concat([ids, radiomics, clinical], axis=1)


def _write_sites(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(8)
    tables = {site: _table(i, n, rng) for i, (site, n) in enumerate(SITES.items())}
    return write_table_sites(root, tables, folds=3)


def _protocol(sites: dict[str, Path], run: str, covariates=COVARIATES) -> FederatedProtocol:
    cfg = FederationConfig.model_validate(
        {
            "run": {"name": "combat-test", "seed": 3},
            "cv": {"folds": 3},
            "selection": {"top_k": 4, "rf_trees": 10, "ranking": "correlation"},
            "harmonisation": {"method": "combat", "covariates": covariates},
            "federation": {"min_sites": 2, "min_patients": 5},
        }
    )
    link = InProcessLink({s: SiteWorker([load_site_config(p)]) for s, p in sites.items()})
    protocol = FederatedProtocol(link, cfg, run)
    protocol.census()
    protocol.folds()
    return protocol


def _site_rows(path: Path, run: str, fold: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """A site's table, its training mask in ``fold`` and its harmonised radiomics (n, P)."""
    cfg = load_site_config(path)
    state = cfg.paths.cache / "federated" / run
    with np.load(state / "folds.npz") as stored:
        train = stored["fold"] != fold
    table = pd.read_parquet(cfg.paths.output / "features.parquet")
    return table, train, np.load(state / f"harmonised-fold{fold}.npy")


def _neurocombat(tables: list[pd.DataFrame], batches: list[str]) -> np.ndarray:
    pooled = pd.concat(tables, ignore_index=True)
    radiomics = [c for c in pooled if c.startswith("tumour_")]
    design = [c for c in covariate_columns(COVARIATES) if pooled[c].any()]  # no empty stage
    covars = pooled[design].copy()
    covars["batch"] = np.repeat(batches, [len(t) for t in tables])
    result = neuroCombat(pooled[radiomics].T, covars, "batch", continuous_cols=design)
    return result["data"].T


def test_federated_combat_equals_pooled_neurocombat_on_the_training_rows(tmp_path) -> None:
    sites = _write_sites(tmp_path)
    protocol = _protocol(sites, "combat")
    fold = 1
    _, _, selection, combat = protocol.select(fold, {"fold": fold})
    assert selection["harmonisation"] == {
        "method": "combat",
        "covariates": COVARIATES,
        "sites": sorted(SITES),
        "new_batches": [],
    }
    assert set(combat) == {"grand_mean", "effects", "variance", "mean"}
    tables, ours = [], []
    for path in sites.values():
        table, train, harmonised = _site_rows(path, "combat", fold)
        tables.append(table[train])
        ours.append(harmonised[train])
    reference = _neurocombat(tables, list(SITES))
    np.testing.assert_allclose(np.vstack(ours), reference, rtol=0, atol=1e-6)
    raw = np.vstack([t[[c for c in t if c.startswith("tumour_")]].to_numpy() for t in tables])
    assert np.abs(raw - reference).max() > 1.0  # the sites' shifts were there to remove


def test_combat_never_sees_a_held_out_row(tmp_path) -> None:
    """Held-out rows changed beyond recognition: the pooled fit and every training row's
    harmonised values stay the same; the held-out rows are harmonised with the training fit."""
    sites = _write_sites(tmp_path)
    fold = 0
    first = _protocol(sites, "before")
    _, _, _, fit_before = first.select(fold, {"fold": fold})
    before = {s: _site_rows(p, "before", fold) for s, p in sites.items()}
    for path in sites.values():
        table, train, _ = _site_rows(path, "before", fold)
        radiomics = [c for c in table if c.startswith("tumour_")]
        table.loc[~train, radiomics] = table.loc[~train, radiomics] * 1000 + 7
        table.loc[~train, "age"] = 99.0
        table.to_parquet(load_site_config(path).paths.output / "features.parquet")
    second = _protocol(sites, "after")
    _, _, _, fit_after = second.select(fold, {"fold": fold})
    for name in fit_before:
        np.testing.assert_array_equal(fit_before[name], fit_after[name])
    for site, path in sites.items():
        _, train, harmonised = _site_rows(path, "after", fold)
        np.testing.assert_array_equal(harmonised[train], before[site][2][train])
        assert not np.allclose(harmonised[~train], before[site][2][~train])


def test_a_covariate_group_under_the_floor_is_withheld_and_the_fold_keeps_numeric_ones(
    tmp_path,
) -> None:
    """Sums over one covariate group are sums over its patients: a group of 2 is refused
    (without the policy the centre would read 2 patients' mean features); the protocol asks
    again with the numeric covariates only, which every site answers."""
    sites = _write_sites(tmp_path)
    path = sites["site_c"]
    table = pd.read_parquet(load_site_config(path).paths.output / "features.parquet")
    table["smoking_ex"] = 0.0
    table.loc[:1, "smoking_ex"] = 1.0
    table.to_parquet(load_site_config(path).paths.output / "features.parquet")
    protocol = _protocol(sites, "small-group", covariates=["age", "smoking"])
    worker = protocol.link.workers["site_c"]
    request = {
        **protocol.base,
        "fold": 0,
        "radiomics_mean": np.zeros(P),
        "covariates": ["age", "smoking"],
    }
    with pytest.raises(Withheld, match="min_patients"):
        worker.handle("query.combat_statistics", request)
    _, _, selection, _ = protocol.select(0, {"fold": 0})
    record = selection["harmonisation"]
    assert record["covariates"] == ["age"] and record["new_batches"] == []
    assert record["sites"] == sorted(SITES)


def test_a_site_under_its_floor_is_harmonised_as_a_new_batch_of_the_others_fit(tmp_path):
    """A site whose own floor withholds every sum is left out of the pooled fit and fits
    its own batch with it: its training rows equal ComBat's own-batch fit on the other
    sites' pooled location and variance."""
    sites = _write_sites(tmp_path)
    path = sites["site_c"]
    path.write_text(path.read_text().replace("[policy]\n", "[policy]\nmin_patients = 40\n"))
    protocol = _protocol(sites, "new-batch", covariates=["age"])
    _, _, selection, _ = protocol.select(0, {"fold": 0})
    record = selection["harmonisation"]
    assert record["sites"] == ["site_a", "site_b"] and record["new_batches"] == ["site_c"]
    others = [_site_rows(sites[s], "new-batch", 0) for s in ("site_a", "site_b")]
    table = others[0][0]
    radiomics = [c for c in table if c.startswith("tumour_")]
    y = [t.loc[train, radiomics].to_numpy() for t, train, _ in others]
    c = [t.loc[train, ["age"]].to_numpy() for t, train, _ in others]
    location = fit_location(
        [
            design_statistics(yi, ci, np.full(len(yi), "b"), ["b"])
            for yi, ci in zip(y, c, strict=True)
        ]
    )
    sumsq = [
        residual_sumsq(yi, ci, location.intercepts[i], location.effects)
        for i, (yi, ci) in enumerate(zip(y, c, strict=True))
    ]
    variance = pooled_variance(sumsq, sum(len(yi) for yi in y))
    own, train, harmonised = _site_rows(path, "new-batch", 0)
    y_c, c_c = own.loc[train, radiomics].to_numpy(), own.loc[train, ["age"]].to_numpy()
    adjustment = BatchAdjustment.fit(y_c, c_c, location.grand_mean, location.effects, variance)
    expected = adjustment.apply(y_c, c_c, location.grand_mean)
    np.testing.assert_allclose(harmonised[train], expected, rtol=0, atol=1e-6)


def test_a_combat_bundle_scores_the_sites_as_the_run_did_and_a_new_site_fits_its_own(tmp_path):
    """The whole protocol with ComBat, then the bundle: each site's predictions (with its own
    correction from the run, kept beside the bundle) equal the run's final scores; a site that
    was not in the federation harmonises with its own batch fit; without enough patients for
    one it is refused with the reason."""
    tomls = write_feature_sites(tmp_path / "sites", [70, 60, 50, 40], seed=2, folds=2)
    configs = {load_site_config(t).site_id: load_site_config(t) for t in tomls}
    *members, outsider = configs
    for site in members:  # a few missing values: harmonised at the run's fill, in predict too
        path = configs[site].paths.output / "features.parquet"
        table = pd.read_parquet(path)
        radiomics = [c for c in table if c.startswith("tumour_")]
        for row in range(4):
            table.loc[row, radiomics[row::2]] = np.nan
        table.to_parquet(path)
    fed = FederationConfig.model_validate(
        {
            "run": {"name": "final", "seed": 3},
            "cv": {"folds": 2},
            "stages": {"fusion_rounds": 3, "fusion_local_epochs": 2},
            "selection": {"top_k": 6, "rf_trees": 20},
            "harmonisation": {"method": "combat", "covariates": ["age", "sex"]},
        }
    )
    workers = {site: SiteWorker([configs[site]]) for site in members}
    result = FederatedProtocol(InProcessLink(workers), fed, "final").run_all()
    assert all(f["selection"]["harmonisation"]["method"] == "combat" for f in result["folds"])
    write_bundle(tmp_path / "model", result, fed)
    deliver_bundle(InProcessLink(workers), tmp_path / "model", "final", lambda _: None)
    bundle = load_bundle(tmp_path / "model")
    assert bundle.manifest["harmonisation"]["covariates"] == ["age", "sex"]
    assert bundle.arrays["combat_effects"].shape == (2, 6)
    main = bundle.manifest["main_model"]
    for site in members:
        predicted = predict_site(configs[site], tmp_path / "model")
        assert set(predicted["harmonised"]) == {"site"}
        with np.load(workers[site].state_root / "final" / "scores-fold-1.npz") as stored:
            in_run = stored[main.replace("/", "_").replace("+", "_")]
        np.testing.assert_allclose(predicted[f"risk:{main}"], in_run, rtol=0, atol=1e-6)
    new = predict_site(configs[outsider], tmp_path / "model")
    assert set(new["harmonised"]) == {"own-batch"} and len(new) == 40
    assert np.isfinite(new["risk"]).all()
    few = configs[outsider].paths.output / "features.parquet"
    pd.read_parquet(few).head(MIN_OWN_BATCH - 1).to_parquet(few)
    with pytest.raises(ValueError, match="no correction from its run"):
        predict_site(configs[outsider], tmp_path / "model")


def test_the_site_shows_less_in_the_features_after_harmonisation(tmp_path) -> None:
    """The site classifier (simulation.site_effect) on each fold's selected columns: the
    synthetic sites' shifts make the site plain before ComBat, much less so after."""
    sites = _write_sites(tmp_path)
    protocol = _protocol(sites, "effect")
    folds = [{"selection": protocol.select(f, {"fold": f})[2]} for f in range(3)]
    configs = [load_site_config(p) for p in sites.values()]
    effect = site_effect(configs, "effect", folds)
    assert effect["folds"] == 3
    assert effect["before"] > 0.9 and effect["after"] < effect["before"] - 0.2


def test_a_fold_asked_unharmonised_drops_its_kept_values_and_bad_fits_are_refused(tmp_path):
    """``query.moments`` without ``harmonised`` reads the features as extracted and drops a
    harmonisation kept for the fold (a later run of the same name cannot inherit it); a
    pooled variance that is not positive is refused before anything is harmonised."""
    sites = _write_sites(tmp_path)
    protocol = _protocol(sites, "stale")
    protocol.select(0, {"fold": 0})
    worker = protocol.link.workers["site_a"]
    kept = worker.state_root / "stale" / "harmonised-fold0.npy"
    assert kept.is_file()
    raw = worker.handle("query.moments", {**protocol.base, "fold": 0, "harmonised": False})
    assert not kept.is_file()
    radiomics = worker.data.radiomics.to_numpy()
    with np.load(worker.state_root / "stale" / "folds.npz") as stored:
        train = stored["fold"] != 0
    np.testing.assert_allclose(raw["radiomics_sum"], radiomics[train].sum(axis=0))
    bad = {
        **protocol.base,
        "fold": 0,
        "radiomics_mean": np.zeros(P),
        "covariates": ["age"],
        "grand_mean": np.zeros(P),
        "covariate_effects": np.zeros((1, P)),
        "pooled_variance": np.r_[0.0, np.ones(P - 1)],
    }
    with pytest.raises(ValueError, match="pooled_variance must be > 0"):
        worker.handle("query.combat_apply", bad)
    assert not kept.is_file()
