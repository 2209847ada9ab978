"""The federated protocol in process: federated selection equals the pooled one, nothing of a
test fold is used, the histogram evaluation matches the pooled scores, sites that disagree are
refused, dropouts are recorded and bounded, results repeat under a seed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from fedmets.client.approval import planned_epsilon
from fedmets.client.policy import ScoreGroups
from fedmets.client.release import site_audit_path
from fedmets.client.site_worker import SiteWorker, assign_folds
from fedmets.server.checkpoints import load_checkpoint
from fedmets.server.fold_lanes import fold_lanes
from fedmets.server.protocol import FederatedProtocol, ProtocolError, _most_chosen
from fedmets.shared import wire
from fedmets.shared.clinical import encoded_columns
from fedmets.shared.config import FederationConfig, load_site_config
from fedmets.shared.metrics import metrics_from_histograms
from fedmets.shared.selection import correlation_filter
from fedmets.simulation.in_process import InProcessLink
from fedmets.simulation.site_files import write_site_config

SITES = {"site_a": (70, 0.3), "site_b": (50, 0.2), "site_c": (36, 0.25)}  # patients, prevalence
P = 24


def _features(n: int, prevalence: float, rng: np.random.Generator, prefix: str) -> pd.DataFrame:
    """A features.parquet table: 24 radiomics columns (pairs of near-duplicates, one
    constant, a few NaN), encoded clinical columns, labels from a latent factor."""
    latent = rng.normal(size=(n, 4))
    label = latent[:, 0] + 0.5 * rng.normal(size=n) > np.quantile(latent[:, 0], 1 - prevalence)
    columns = {}
    for j in range(P):
        base = (latent[:, j % 4] + rng.normal(scale=0.5 + j / 8, size=n)) * (1 + j)
        columns[f"tumour_original_f{j:02d}"] = base * 1e3 + 5e4  # large values: centring matters
    columns["tumour_original_f05"] = columns["tumour_original_f01"] * 1.001 + 0.01
    columns["tumour_original_f07"] = np.full(n, 3.0)  # constant
    radiomics = pd.DataFrame(columns)
    radiomics.iloc[rng.choice(n, 3, replace=False), 2] = np.nan
    clinical = pd.DataFrame(0.0, index=range(n), columns=encoded_columns())
    clinical["age"] = rng.normal(62, 9, n) + 4 * label
    clinical["sex_male"] = rng.random(n) < 0.75
    table = pd.concat(
        [
            pd.DataFrame({"patient_id": [f"{prefix}-{i:03d}" for i in range(n)], "label": label}),
            radiomics,
            clinical,
        ],
        axis=1,
    )
    return table.astype({"label": float})


def write_sites(root: Path, folds: int = 3) -> dict[str, Path]:
    """Three tabular sites with features.parquet ready under ``root``, cross-validating with
    ``folds`` folds: site id -> site.toml."""
    rng = np.random.default_rng(5)
    tables = {site: _features(n, p, rng, site) for site, (n, p) in SITES.items()}
    return write_table_sites(root, tables, folds)


def write_table_sites(root: Path, tables: dict[str, pd.DataFrame], folds: int) -> dict[str, Path]:
    """A tabular site per features table (``patient_id``, ``label``, radiomics, encoded
    clinical) under ``root``, its features.parquet ready, seed 1, ``folds`` folds: site id ->
    site.toml."""
    paths = {}
    for site, table in tables.items():
        folder = root / site
        (folder / "output").mkdir(parents=True)
        table.to_parquet(folder / "output" / "features.parquet")
        (folder / "features.csv").write_text("unused\n")
        paths[site] = write_site_config(
            folder,
            site,
            mode="tabular",
            modalities=["radiomics_table", "clinical"],
            seed=1,
            manifest="features.csv",
            policy={"folds": folds},
        )
    return paths


@pytest.fixture()
def sites(tmp_path: Path) -> dict[str, Path]:
    return write_sites(tmp_path)


def _cfg(**sections) -> FederationConfig:
    """The protocol tests' federation: 3 folds, 4 fusion rounds, no final model (trained and
    checked in test_bundle, test_simulate and test_secure_aggregation)."""
    data = {
        "run": {"name": "test-run", "seed": 3},
        "cv": {"folds": 3},
        "stages": {"fusion_rounds": 4, "fusion_local_epochs": 2, "final_model": False},
        "selection": {"top_k": 6, "rf_trees": 20},
        "model": {"fusion_hidden": [8], "fusion_lr": 1e-2},
        "evaluation": {"histogram_bins": 100},
        "federation": {"min_sites": 2, "min_patients": 5},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return FederationConfig.model_validate(data)


def _link(sites: dict[str, Path]) -> InProcessLink:
    return InProcessLink({s: SiteWorker([load_site_config(p)]) for s, p in sites.items()})


def test_assign_folds_is_stratified_and_inner_validation_is_inside_training() -> None:
    labels = np.array([1] * 7 + [0] * 23)
    fold, val = assign_folds(labels, 5, 0.2, seed=0)
    assert sorted(np.bincount(fold)) == [6, 6, 6, 6, 6]
    assert set(np.bincount(fold[labels == 1], minlength=5)) <= {1, 2}
    for f in range(5):
        assert not (val[f] & (fold == f)).any()
        assert val[f].sum() == round(0.2 * (fold != f).sum())
    # small cohorts: the row added to reach the rounded-up count never takes a class's last
    # fitting row (10 patients, 7 DM+, 2 folds, 45 %: it took the last negative)
    for n, positives, folds, fraction in [(4, 1, 2, 0.2), (10, 7, 2, 0.45), (10, 6, 3, 0.35)]:
        labels = np.array([1] * positives + [0] * (n - positives))
        for seed in range(5):
            fold, val = assign_folds(labels, folds, fraction, seed=seed)
            for f in range(folds):
                if len(set(labels[fold != f])) < 2:
                    continue
                fitting = (fold != f) & ~val[f]
                assert set(labels[fitting]) == {0, 1}, (n, positives, seed, f)


def _pooled_training_rows(
    sites: dict[str, Path], fold: int, within: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pooled reference of a fold's selection: every site's training rows' radiomics
    (mean-imputed) and labels, the varying columns and those the 0.9 filter keeps
    (np.corrcoef); ``within``: the rows and labels of those sites only (imputed at every
    site's mean, as the protocol does)."""
    rows = {}
    for site, path in sites.items():
        cfg_site = load_site_config(path)
        table = pd.read_parquet(cfg_site.paths.output / "features.parquet")
        stored = np.load(cfg_site.paths.cache / "federated" / "test-run" / "folds.npz")
        rows[site] = table[stored["fold"] != fold]
    pooled = pd.concat(rows.values())
    columns = [c for c in pooled if c.startswith("tumour_")]
    mean = np.nanmean(pooled[columns].to_numpy(), axis=0)
    X = np.where(np.isnan(pooled[columns].to_numpy()), mean, pooled[columns].to_numpy())
    varying = np.flatnonzero(X.std(axis=0) > 0)
    kept = varying[correlation_filter(np.corrcoef(X[:, varying].T), 0.9)]
    if within is not None:
        pooled = pd.concat([rows[site] for site in within])
        X = np.where(np.isnan(pooled[columns].to_numpy()), mean, pooled[columns].to_numpy())
    return X, pooled["label"].to_numpy(), varying, kept


def test_federated_selection_equals_the_pooled_filter(sites) -> None:
    cfg = _cfg()
    protocol = FederatedProtocol(_link(sites), cfg, "test-run")
    protocol.census()
    protocol.folds()
    standardise, _, selection, _ = protocol.select(1, {"fold": 1})

    X, _, varying, kept = _pooled_training_rows(sites, fold=1)
    assert selection["varying"] == P - 1  # the constant column is gone
    assert selection["after_correlation_filter"] == len(kept) < P - 1  # near-duplicates too
    assert set(standardise["radiomics_columns"]) <= set(kept)
    assert len(standardise["radiomics_columns"]) == cfg.selection.top_k
    np.testing.assert_allclose(
        standardise["radiomics_mean"], X.mean(axis=0)[standardise["radiomics_columns"]], rtol=1e-9
    )


def test_federated_correlation_ranking_equals_the_pooled_ranking(sites) -> None:
    """The correlation ranking is exactly |r| on the pooled training rows of the sites that
    release their sums over DM+ patients: a site does only when each class holds its floor
    of patients in every one of its folds (else one fold's few DM+ patients' sum is the
    difference of two releases). Here site_a (21 DM+ in 3 folds); site_b and site_c (10 and
    9) are left out."""
    cfg = _cfg(selection={"ranking": "correlation"})
    protocol = FederatedProtocol(_link(sites), cfg, "test-run")
    protocol.census()
    protocol.folds()
    standardise, _, selection, _ = protocol.select(2, {"fold": 2})

    released = []
    for site, path in sites.items():
        cfg_site = load_site_config(path)
        labels = pd.read_parquet(cfg_site.paths.output / "features.parquet")["label"]
        fold = np.load(cfg_site.paths.cache / "federated" / "test-run" / "folds.npz")["fold"]
        counts = [np.bincount(fold[labels == c], minlength=3) for c in (0, 1)]
        if min(np.min(c) for c in counts) >= cfg_site.policy.min_patients:
            released.append(site)
    assert selection["ranked_by"] == released == ["site_a"]
    X, y, _, kept = _pooled_training_rows(sites, fold=2, within=released)
    r = np.abs([np.corrcoef(X[:, j], y)[0, 1] for j in kept])
    order = np.argsort(-r, kind="stable")[: cfg.selection.top_k]
    assert selection["ranking"] == "correlation"
    assert standardise["radiomics_columns"].tolist() == kept[order].tolist()
    np.testing.assert_allclose(selection["importance"], r[order], atol=1e-6)
    # Without a site that releases them, the fold is ranked by the forest, and says so.
    small = {site: sites[site] for site in ("site_b", "site_c")}
    protocol = FederatedProtocol(_link(small), cfg, "test-run")
    protocol.census()
    protocol.folds()
    _, _, selection, _ = protocol.select(2, {"fold": 2})
    assert selection["ranking"] == "forest" and selection["ranked_by"] == list(small)


def test_stability_ranking_orders_by_how_often_a_column_is_in_a_resamples_top_k(
    sites, tmp_path
) -> None:
    """Each site's forests on random halves of its training rows; the centre's order is by
    the patient-weighted share of halves that put a column in their top_k (ties by the mean
    importance). The planted columns (those of the label's latent factor) lead; the same run
    repeats; a site whose halves would hold fewer patients than its floor sends no
    frequencies."""
    cfg = _cfg(selection={"ranking": "stability", "stability_resamples": 6})
    protocol = FederatedProtocol(_link(sites), cfg, "test-run")
    protocol.census()
    protocol.folds()
    standardise, _, selection, _ = protocol.select(0, {"fold": 0})
    frequency = np.array(selection["selection_frequency"])
    assert selection["ranking"] == "stability" and len(frequency) == cfg.selection.top_k
    assert ((0 <= frequency) & (frequency <= 1)).all()
    assert (np.diff(frequency) <= 0).all()  # most often chosen first
    planted = {j for j in range(P) if j % 4 == 0}  # f00, f04, ...: the label's latent factor
    assert int(standardise["radiomics_columns"][0]) in planted
    again = FederatedProtocol(_link(sites), cfg, "test-run")
    again.census()
    again.folds()
    assert again.select(0, {"fold": 0})[2]["selected"] == selection["selected"]
    # 36 patients in 2 folds: 18 training rows, halves of 9, under a floor of 13 that the
    # folds and the training rows hold (with 3 or more folds a half is at least a fold)
    two = write_sites(tmp_path / "two-folds", folds=2)
    worker = SiteWorker([load_site_config(two["site_c"])])
    worker.handle("query.folds", {**protocol.base, "folds": 2})
    request = {
        **protocol.base,
        "min_patients": 13,
        "fold": 0,
        "radiomics_columns": np.arange(4),
        "radiomics_mean": np.zeros(4),
        "radiomics_scale": np.ones(4),
        "trees": 10,
        "seed": 1,
        "resamples": 4,
        "top_k": 2,
    }
    reply = worker.handle("query.importance", request)
    assert "importances" in reply and "selection_frequency" not in reply


def test_selection_never_reads_a_test_fold_row(sites) -> None:
    """Scrambling the features of every test-fold row of fold 0 at every site leaves fold 0's
    selection and standardisation unchanged (labels stay: the sites stratify folds on them)."""
    first = FederatedProtocol(_link(sites), _cfg(), "test-run")
    first.census()
    first.folds()
    before = first.select(0, {"fold": 0})[0]
    rng = np.random.default_rng(0)
    for path in sites.values():
        cfg_site = load_site_config(path)
        stored = np.load(cfg_site.paths.cache / "federated" / "test-run" / "folds.npz")
        features = cfg_site.paths.output / "features.parquet"
        table = pd.read_parquet(features)
        test = stored["fold"] == 0
        radiomics = [c for c in table if c.startswith("tumour_")]
        table.loc[test, radiomics] = rng.normal(size=(test.sum(), len(radiomics))) * 1e6
        table.loc[test, "age"] = rng.uniform(18, 100, test.sum())
        table.to_parquet(features)
    second = FederatedProtocol(_link(sites), _cfg(), "test-run")
    second.census()
    second.folds()  # same seed: the same folds
    after = second.select(0, {"fold": 0})[0]
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)


@pytest.mark.slow
def test_full_run_histogram_metrics_match_the_pooled_scores(sites) -> None:
    cfg = _cfg(stages={"fusion_rounds": 10})
    result = FederatedProtocol(_link(sites), cfg, "test-run").run_all()
    assert result["main_model"] == "none/radiomics+clinical"
    assert set(result["models"]) == {"none/radiomics", "none/clinical", "none/radiomics+clinical"}
    scores, labels, decisions = [], [], []
    released_pos, released_neg, confusion, brier = 0, 0, 0, 0.0
    bins = cfg.evaluation.histogram_bins
    for site, path in sites.items():
        cfg_site = load_site_config(path)
        table = pd.read_parquet(cfg_site.paths.output / "features.parquet")
        site_scores, site_labels, site_thresholds = [], [], []
        for fold in range(cfg.cv.folds):
            state = cfg_site.paths.cache / "federated" / "test-run" / f"scores-fold{fold}.npz"
            with np.load(state) as stored:
                s = stored["none_radiomics_clinical"]
                site_scores.append(s)
                site_labels.append(table["label"].to_numpy()[stored["rows"]])
                threshold = result["folds"][fold]["thresholds"]["none/radiomics+clinical"]
                site_thresholds.append(np.full(len(s), threshold))
                decisions.append(s >= threshold)
        assert result["models"]["none/radiomics+clinical"]["per_site"][site]["n"] == len(table)
        site_y, site_s = np.concatenate(site_labels), np.concatenate(site_scores)
        groups = ScoreGroups(site_y, site_s, 5)  # the site's policy
        pos, neg = groups.histograms(bins)
        released_pos, released_neg = released_pos + pos, released_neg + neg
        confusion = confusion + groups.confusion(np.concatenate(site_thresholds))
        brier += groups.brier_sum()
        scores += site_scores
        labels += site_labels
    y, s, d = np.concatenate(labels), np.concatenate(scores), np.concatenate(decisions)
    pooled = result["models"]["none/radiomics+clinical"]["pooled"]
    edges = np.linspace(0, 1, bins + 1)
    from_released = metrics_from_histograms(released_pos, released_neg, edges, 0.5)["auc"]
    assert pooled["auc"] == pytest.approx(from_released, abs=1e-12)  # what the sites released
    assert abs(pooled["auc"] - roc_auc_score(y, s)) < 0.01  # the cost of coarsened histograms
    tp, fn, tn, fp = confusion  # every patient at its score group's mean, as released
    assert pooled["acc"] == pytest.approx((tp + tn) / len(y), abs=1e-12)
    assert pooled["sen"] == pytest.approx(tp / (tp + fn), abs=1e-12)
    assert pooled["brier"] == pytest.approx(brier / len(y), rel=1e-9)
    # the cost of the groups: a group straddling its threshold is called as a whole
    assert abs(pooled["acc"] - (d == y).mean()) <= 0.05
    assert abs(pooled["brier"] - ((s - y) ** 2).mean()) < 0.01
    assert pooled["auc_ci"][0] < pooled["auc"] < pooled["auc_ci"][1]
    assert pooled["auc"] > 0.7  # the latent factor drives both radiomics and labels
    points = np.column_stack([pooled["roc"]["fpr"], pooled["roc"]["tpr"]])
    assert np.trapezoid(points[:, 1], points[:, 0]) == pytest.approx(pooled["auc"], abs=1e-3)
    for site_result in result["models"]["none/radiomics+clinical"]["per_site"].values():
        roc = site_result["roc"]
        assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(site_result["auc"], abs=1e-3)
    assert "roc" not in result["models"]["none/radiomics"]["pooled"]  # the main model only
    blocks = [b["name"] for b in result["importance"]["blocks"]]
    assert "clinical:age" in blocks and all(
        b.startswith(("radiomics:tumour_original_f", "clinical:")) for b in blocks
    )
    top = blocks[0].removeprefix("radiomics:tumour_original_f")
    assert blocks[0] == "clinical:age" or int(top) % 4 == 0  # a column of the label's factor


@pytest.mark.slow
@pytest.mark.parametrize("monitor", ["auc", "loss"])
def test_each_network_keeps_its_round_of_best_pooled_validation_score(sites, monitor) -> None:
    cfg = _cfg(model={"fusion_monitor": monitor}, stages={"fusion_rounds": 6})
    result = FederatedProtocol(_link(sites), cfg, f"monitor-{monitor}").run_all()
    for fold in result["folds"]:
        for model, curves in fold["fusion"].items():
            aucs, losses = curves["val_auc"], curves["val_loss"]
            assert len(aucs) == len(losses) == 6
            if monitor == "auc":  # pooled from the sites' validation histograms
                assert all(0 <= auc <= 1 for auc in aucs)
                assert curves["best_round"] == 1 + int(np.argmax(aucs))  # ties: earlier round
                if "radiomics" in model:  # the latent factor drives radiomics and labels
                    assert max(aucs) > 0.7, (model, aucs)
            else:
                assert aucs == [None] * 6
                assert curves["best_round"] == 1 + int(np.argmin(losses))


def test_when_no_site_can_validate_the_log_says_why_and_the_last_round_is_kept(sites) -> None:
    """A floor above every site's inner-validation rows: no validation loss is released, the
    server log says why (not "nan") and each network keeps its last round."""
    cfg = _cfg(federation={"min_patients": 12}, stages={"fusion_rounds": 3})
    said: list[str] = []
    protocol = FederatedProtocol(_link(sites), cfg, "no-validation", log=said.append)
    protocol.census()
    protocol.folds()
    record, _ = protocol.fit(0, ["none/radiomics"], ["none/radiomics"], images=False)
    curves = record["fusion"]["none/radiomics"]
    assert np.isnan(curves["val_loss"]).all() and curves["best_round"] == 3
    rounds = [line for line in said if "fusion round 3/3" in line]
    assert rounds and "no validation loss: no site's inner-validation rows reached" in rounds[0]
    assert not any("nan" in line for line in said)


def test_the_final_model_keeps_the_network_chosen_most_often() -> None:
    """``[model] main_*``: the final model's network is the one the folds chose most often;
    a tie goes to the better mean inner-validation figure over the folds."""

    def fold(chosen: str, a: float, b: float) -> dict:
        return {"main_network": chosen, "main_candidates": {"a": a, "b": b}}

    twice = [fold("a", 1.0, 0.9), fold("b", 1.2, 0.8), fold("a", 0.7, 0.9)]
    assert _most_chosen(twice, ["a", "b"], higher_is_better=False) == "a"
    tie = [fold("a", 1.0, 0.9), fold("b", 1.2, 0.8)]  # mean loss: a 1.1, b 0.85
    assert _most_chosen(tie, ["a", "b"], higher_is_better=False) == "b"
    assert _most_chosen(tie, ["a", "b"], higher_is_better=True) == "a"  # as AUCs


@pytest.mark.slow
def test_same_seed_same_results(sites) -> None:
    first = FederatedProtocol(_link(sites), _cfg(), "run-one").run_all()
    second = FederatedProtocol(_link(sites), _cfg(), "run-two").run_all()
    for model in first["models"]:
        assert first["models"][model]["pooled"] == second["models"][model]["pooled"]


class _BatchCountingLink(InProcessLink):
    """Counts the items of every batch it sends to each site, and the routes of every
    message (a batch's items, or a request alone)."""

    def __init__(self, workers) -> None:
        super().__init__(workers)
        self.batches: list[int] = []
        self.routes: Counter[str] = Counter()

    def ask(self, route, requests):
        self.routes[route] += 1
        return super().ask(route, requests)

    def ask_batch(self, items):
        self.batches += [len(batch) for batch in items.values()]
        self.routes.update(route for route, _ in next(iter(items.values())))
        return super().ask_batch(items)


@pytest.mark.slow
def test_folds_at_once_reach_the_sites_in_batches_and_give_the_sequential_results(
    sites, tmp_path
) -> None:
    """``[federation] parallel_folds``: the three folds run at once, their requests reach each
    site in batches (``fedmets.server.fold_lanes``), and the run gives the results of the
    folds run one after another."""
    sequential = FederatedProtocol(_link(sites), _cfg(), "one-by-one").run_all()
    cfg = _cfg(federation={"parallel_folds": 3})
    link = _BatchCountingLink({s: SiteWorker([load_site_config(p)]) for s, p in sites.items()})
    heard: list[str] = []
    runner = fold_lanes(link, cfg, "at-once", tmp_path / "checkpoints", None, heard.append)
    at_once = FederatedProtocol(
        link, cfg, "at-once", checkpoints=tmp_path / "checkpoints", fold_runner=runner
    ).run_all()
    assert max(link.batches) == 3 and len(link.batches) > 3 * 10  # every step of every fold
    # the folds start from the run's census: asked once, as the folds' sizes
    assert link.routes["query.census"] == link.routes["query.folds"] == 1
    assert {f"fold {k}: done" for k in (1, 2, 3)} <= {line.split(" in ")[0] for line in heard}
    for model in sequential["models"]:
        assert at_once["models"][model]["pooled"] == sequential["models"][model]["pooled"]
    for one, other in zip(sequential["folds"], at_once["folds"], strict=True):
        assert one["thresholds"] == other["thresholds"]


class _RoundTripLink(_BatchCountingLink):
    """A link whose message rounds cost time (``batch_validation``, as Flower's; ``paired``),
    or not, counting its messages; it stops (like a server that stops) at its
    ``stop_at``-th message, if given."""

    def __init__(self, workers, paired: bool = True, stop_at: int | None = None) -> None:
        super().__init__(workers)
        self.batch_validation = paired
        self.messages, self.stop_at = 0, stop_at

    def _count(self) -> None:
        self.messages += 1
        if self.messages == self.stop_at:
            raise KeyboardInterrupt(f"stopped at message {self.messages}")

    def ask(self, route, requests):
        self._count()
        return super().ask(route, requests)

    def ask_batch(self, items):
        self._count()
        return super().ask_batch(items)


@pytest.mark.parametrize("parallel_folds", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_a_rounds_validation_rides_with_the_next_rounds_training(
    sites, tmp_path, parallel_folds
) -> None:
    """Over a link whose message rounds cost time, each round's validation reaches the sites
    with the next round's training in one message (the last round's alone): the same curves,
    kept rounds and results as asking one by one, in fewer message rounds; folds at once
    batch these pairs too."""
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    plain = _RoundTripLink(workers, paired=False)
    cfg = _cfg(federation={"parallel_folds": parallel_folds})
    one_by_one = FederatedProtocol(plain, _cfg(), "one-by-one").run_all()
    link = _RoundTripLink(workers)
    runner = None
    if parallel_folds > 1:
        runner = fold_lanes(link, cfg, "paired", tmp_path / "checkpoints", None, lambda _: None)
    paired = FederatedProtocol(
        link, cfg, "paired", checkpoints=tmp_path / "checkpoints", fold_runner=runner
    ).run_all()
    rounds = _cfg().stages.fusion_rounds
    assert plain.routes["query.validate"] == plain.routes["train.fusion"] == 3 * rounds
    assert link.routes["query.validate"] == link.routes["train.fusion"] == 3 * rounds
    if parallel_folds == 1:  # every round but the first carries the round before's validation
        assert link.batches == [2] * (len(workers) * 3 * (rounds - 1))
        assert link.messages == plain.messages - 3 * (rounds - 1)
    else:  # and the folds' pairs go together
        assert max(link.batches) == 6 and link.messages < plain.messages / 2
    for one, other in zip(one_by_one["folds"], paired["folds"], strict=True):
        assert one["fusion"] == other["fusion"]  # losses, AUCs and kept rounds per network
        assert one["thresholds"] == other["thresholds"]
    for model in one_by_one["models"]:
        assert paired["models"][model]["pooled"] == one_by_one["models"][model]["pooled"]


STOP_AT = 8
"""The message a paired run stops at: fold 1's third fusion round, with the second round's
validation (census, folds, moments, covariance, importance, round 1, then round 2 with round 1's
validation: its checkpoint holds round 2's models, their validation still to come)."""


@pytest.mark.slow
def test_a_paired_run_stopped_mid_rounds_resumes_to_the_same_result(sites, tmp_path) -> None:
    """A run stopped while a round's validation waits for the next round's training resumes
    from its checkpoint to the uninterrupted result, paired again or one by one."""
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    reference = FederatedProtocol(InProcessLink(workers), _cfg(), "uninterrupted").run_all()
    for resumed_over in (_RoundTripLink(workers), InProcessLink(workers)):
        checkpoints = tmp_path / type(resumed_over).__name__
        with pytest.raises(KeyboardInterrupt):  # mid-way through fold 1's fusion rounds
            FederatedProtocol(
                _RoundTripLink(workers, stop_at=STOP_AT), _cfg(), "resumed", None, checkpoints
            ).run_all()
        rounds = load_checkpoint(checkpoints / "fold0-fusion-rounds.npz")["value"]
        curves = next(iter(rounds[3].values()))
        assert len(curves["train_loss"]) == len(curves["val_loss"]) + 1  # one validation waits
        resumed = FederatedProtocol(resumed_over, _cfg(), "resumed", None, checkpoints).run_all()
        for model in reference["models"]:
            assert resumed["models"][model]["pooled"] == reference["models"][model]["pooled"]
        assert resumed["folds"][0]["fusion"] == reference["folds"][0]["fusion"]


def test_folds_at_once_need_dp_off_and_no_secure_aggregation() -> None:
    with pytest.raises(ValueError, match="folds at once need dp.mode 'off'"):
        _cfg(federation={"parallel_folds": 2}, dp={"mode": "sample", "epsilon": 8.0})
    with pytest.raises(ValueError, match="folds at once need"):
        _cfg(federation={"parallel_folds": 2}, strategy={"secure_aggregation": True})


def test_census_refuses_sites_with_another_schema(sites) -> None:
    cfg_site = load_site_config(sites["site_b"])
    features = cfg_site.paths.output / "features.parquet"
    pd.read_parquet(features).rename(columns={"tumour_original_f03": "tumour_other"}).to_parquet(
        features
    )
    with pytest.raises(ProtocolError, match=r"site_b differ from site_a in their feature schema"):
        FederatedProtocol(_link(sites), _cfg(), "test-run").census()


class _DroppingLink(InProcessLink):
    """Loses one site's replies from a given route on (a site gone mid-run), batches too."""

    def __init__(self, workers, lost: str, from_route: str) -> None:
        super().__init__(workers)
        self.lost, self.from_route, self.gone = lost, from_route, False

    def ask(self, route, requests):
        self.gone = self.gone or route == self.from_route
        return {
            s: r
            for s, r in super().ask(route, requests).items()
            if not (self.gone and s == self.lost)
        }

    def ask_batch(self, items):
        routes = {route for batch in items.values() for route, _ in batch}
        self.gone = self.gone or self.from_route in routes
        replies = super().ask_batch(items)
        return {s: r for s, r in replies.items() if not (self.gone and s == self.lost)}


def test_a_dropped_site_is_recorded_and_too_few_sites_stop_the_run(sites) -> None:
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    result = FederatedProtocol(
        _DroppingLink(workers, "site_c", "train.fusion"), _cfg(), "test-run"
    ).run_all()
    assert {d["site"] for d in result["dropouts"]} == {"site_c"}
    assert result["models"]["none/radiomics+clinical"]["pooled"]["n"] == sum(
        n for s, (n, _) in SITES.items() if s != "site_c"
    )
    with pytest.raises(ProtocolError, match=r"train.fusion: 2 of 3 sites answered .* min_sites"):
        FederatedProtocol(
            _DroppingLink(workers, "site_c", "train.fusion"),
            _cfg(federation={"min_sites": 3}),
            "test-run",
        ).run_all()


def test_a_site_lost_while_folds_run_at_once_is_a_dropout_of_every_fold(sites, tmp_path) -> None:
    """Each fold at once saves its own dropouts in its checkpoints; the run's record holds
    them all, as it holds every dropout the run said."""
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    cfg = _cfg(federation={"parallel_folds": 3})
    link = _DroppingLink(workers, "site_c", "train.fusion")
    said: list[str] = []
    runner = fold_lanes(link, cfg, "lost", tmp_path / "checkpoints", None, said.append)
    result = FederatedProtocol(
        link, cfg, "lost", said.append, tmp_path / "checkpoints", fold_runner=runner
    ).run_all()
    lost_in_training = {d["fold"] for d in result["dropouts"] if d["route"] == "train.fusion"}
    assert lost_in_training == {0, 1, 2}  # one batch carried every fold's training
    assert len(result["dropouts"]) == sum("site_c did not answer" in line for line in said)


class _FaultyUpdateLink(InProcessLink):
    """``site``'s training replies come back broken by ``fault`` (a faulty or hostile site)."""

    def __init__(self, workers, site: str, fault: str) -> None:
        super().__init__(workers)
        self.site, self.fault = site, fault

    def ask(self, route, requests):
        replies = super().ask(route, requests)
        reply = replies.get(self.site)
        if route == "train.fusion" and reply is not None and len(reply) > 1:
            states = [v for k, v in reply.items() if k.startswith(wire.WEIGHTS_PREFIX)]
            name = sorted(states[0])[0]
            if self.fault == "nan":
                states[0][name] = np.full_like(states[0][name], np.nan)
            elif self.fault == "shape":
                states[0][name] = states[0][name][..., :1]
            elif self.fault == "norm":
                states[0][name] = states[0][name] + 100.0
            elif self.fault == "dtype":  # FedAvg would copy an integer tensor, not average it
                states[0][name] = states[0][name].astype(np.int64)
            else:  # a weight larger than the site's census count
                reply["n"] = 10_000
        return replies


INVALID = "1 of 3 sites sent an invalid update"


@pytest.mark.parametrize(
    ("fault", "rule", "too_few"),
    [
        # a value that is not finite: the reply is not usable (wire.check_reply)
        ("nan", "reply", "2 of 3 sites answered"),
        ("shape", "update.shape", INVALID),
        ("norm", "update.norm", INVALID),
        ("dtype", "update.dtype", INVALID),
        ("n", "update.n", INVALID),
    ],
)
def test_a_site_sending_an_invalid_update_is_left_out_of_the_round(
    sites, fault, rule, too_few
) -> None:
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    cfg = _cfg(cv={"folds": 3}, stages={"fusion_rounds": 2}, federation={"max_update_norm": 50.0})
    protocol = FederatedProtocol(_FaultyUpdateLink(workers, "site_c", fault), cfg, "faulty")
    protocol.census()
    protocol.folds()
    record, _ = protocol.fit(0, ["none/clinical"], ["none/clinical"], images=False)
    left_out = [d for d in protocol.record.dropouts if d.get("rule") == rule]
    assert [(d["site"], d["round"]) for d in left_out] == [("site_c", 1), ("site_c", 2)]
    assert record["fusion"]["none/clinical"]["sites"] == [["site_a", "site_b"]] * 2
    strict = _cfg(cv={"folds": 3}, federation={"min_sites": 3, "max_update_norm": 50.0})
    protocol = FederatedProtocol(_FaultyUpdateLink(workers, "site_c", fault), strict, "faulty")
    protocol.census()
    protocol.folds()
    with pytest.raises(ProtocolError, match=too_few):
        protocol.fit(0, ["none/clinical"], ["none/clinical"], images=False)


DROP = object()
"""A _FaultyReplyLink value: the field left out."""


class _FaultyReplyLink(InProcessLink):
    """``site``'s replies on ``route`` come back with ``field`` set to ``value`` (or left out:
    ``DROP``)."""

    def __init__(self, workers, site: str, route: str, field: str, value) -> None:
        super().__init__(workers)
        self.site, self.route, self.field, self.value = site, route, field, value

    def ask(self, route, requests):
        replies = super().ask(route, requests)
        if route == self.route and self.site in replies:
            reply = replies[self.site]
            key = next(k for k in sorted(reply) if k.split(":")[0] == self.field)
            if self.value is DROP:
                del reply[key]
            else:
                reply[key] = self.value(reply[key]) if callable(self.value) else self.value
        return replies


@pytest.mark.parametrize(
    ("route", "field", "value", "problem"),
    [
        ("query.validate", "val_loss_sum", float("nan"), "not finite"),
        ("query.evaluation", "confusion", lambda c: c[:3], "3 counts, not (TP, FN, TN, FP)"),
        ("query.moments", "n", 100_000, "more than its census"),
        ("query.census", "folds", DROP, "it lacks folds"),
        ("query.census", "n", -3, "n: not a count of patients"),
    ],
)
def test_a_site_whose_reply_is_not_usable_is_left_out_of_that_request(
    sites, route, field, value, problem
) -> None:
    """A faulty or hostile site's reply that no honest site sends (a NaN loss, a confusion
    matrix of three counts, more patients than its census, a census without a field) would
    otherwise pick the kept round, stop the run or weigh the pooled statistics; it is left
    out, its site, route and field named (each rule: ``tests/test_wire.py``)."""
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    said: list[str] = []
    cfg = _cfg(stages={"fusion_rounds": 1})
    link = _FaultyReplyLink(workers, "site_c", route, field, value)
    result = FederatedProtocol(link, cfg, "faulty-reply", said.append).run_all()
    left_out = [d for d in result["dropouts"] if d.get("rule") == "reply"]
    assert left_out and {(d["route"], d["site"]) for d in left_out} == {(route, "site_c")}
    assert any(f"site site_c left out of {route}" in s and problem in s for s in said), said
    assert all(np.isfinite(m["pooled"]["auc"]) for m in result["models"].values())


def test_folds_that_do_not_add_up_to_the_census_stop_the_run(sites) -> None:
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    link = _FaultyReplyLink(workers, "site_c", "query.census", "n", 1_000_000)
    protocol = FederatedProtocol(link, _cfg(), "inflated")
    protocol.census()
    with pytest.raises(ProtocolError, match="site site_c: its 3 folds hold 36 patients, its "):
        protocol.folds()


class _FailingLink(InProcessLink):
    """Breaks (like a server that stops) at the n-th request."""

    def __init__(self, workers, fail_at: int) -> None:
        super().__init__(workers)
        self.fail_at, self.asked = fail_at, 0

    def ask(self, route, requests):
        self.asked += 1
        if self.asked == self.fail_at:
            raise KeyboardInterrupt(f"stopped at {route}")
        return super().ask(route, requests)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_stopped_run_resumes_from_its_checkpoints_to_the_same_result(
    sites, tmp_path, strategy
) -> None:
    cfg = _cfg(strategy={"name": strategy, "server_learning_rate": 0.05})
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in sites.items()}
    reference = FederatedProtocol(InProcessLink(workers), cfg, "uninterrupted").run_all()
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):  # mid-way through fold 2's fusion rounds
        FederatedProtocol(_FailingLink(workers, 22), cfg, "resumed", None, checkpoints).run_all()
    assert (checkpoints / "fold1-fusion-rounds.npz").is_file()
    assert not (checkpoints / "fold1-fusion.npz").exists()
    said: list[str] = []
    resumed = FederatedProtocol(
        InProcessLink(workers), cfg, "resumed", said.append, checkpoints
    ).run_all()
    assert "  resumed fold0-thresholds from its checkpoint" in said
    assert any(line.startswith("  fusion: resuming at round") for line in said)
    for model in reference["models"]:
        assert resumed["models"][model]["pooled"] == reference["models"][model]["pooled"]


@pytest.mark.slow  # DP-SGD over every fold
@pytest.mark.parametrize("mode", ["sample", "client"])
def test_a_private_run_completes_and_its_ledger_is_reported(sites, mode) -> None:
    if mode == "sample":  # sites that require DP answer every request of a DP run
        for toml in sites.values():
            with toml.open("a") as policy:  # into [policy], the file's last table
                policy.write("require_dp = true\nepsilon_budget = 100.0\n")
    cfg = _cfg(dp={"mode": mode, "epsilon": 8.0}, stages={"fusion_rounds": 2})
    result = FederatedProtocol(_link(sites), cfg, f"dp-{mode}").run_all()
    for toml in sites.values():
        audit = site_audit_path(load_site_config(toml)).read_text().splitlines()
        assert all(json.loads(line)["sent"] for line in audit)
    privacy = result["privacy"]
    assert privacy["mode"] == mode
    assert set(privacy["sites"]) == set(SITES)
    if mode == "sample":  # every site's patients: DP-SGD over all folds, rounds and networks
        for site in SITES:  # at most what `fedmets site approve` told the site: 8
            assert 4.0 < privacy["sites"][site]["epsilon"] <= planned_epsilon(cfg) + 1e-6
            assert "fusion" in privacy["sites"][site]["stages"]
        assert privacy["server"] is None
    else:  # each site's contribution to the global models
        assert 4.0 < privacy["server"]["epsilon"] <= 8.0 + 1e-6
    assert "selection" in privacy["sites"]["site_a"]["not_covered"]  # statistics: listed
    assert list(result["models"]) == ["none/radiomics+clinical"]  # no ablation networks
    for fold in result["folds"]:  # no round chosen on validation losses: the last one kept
        curves = fold["fusion"]["none/radiomics+clinical"]
        assert curves["best_round"] == 2 and np.isnan(curves["val_loss"]).all()
    assert result["models"]["none/radiomics+clinical"]["pooled"]["auc"] is not None


@pytest.mark.slow  # DP-SGD over every fold
@pytest.mark.parametrize("mode", ["sample", "client"])
def test_epsilon_per_fold_composes_over_the_folds_in_the_ledger(sites, mode) -> None:
    dp = {"mode": mode, "epsilon": 4.0, "epsilon_scope": "fold", "ablation": True}
    cfg = _cfg(dp=dp, stages={"fusion_rounds": 1, "fusion_local_epochs": 1})
    result = FederatedProtocol(_link(sites), cfg, f"dp-per-fold-{mode}").run_all()
    assert len(result["models"]) == 3  # the ablation networks too
    privacy = result["privacy"]  # each fold's trainings end at 4; the ledger holds them all
    spent = [privacy["sites"][s]["epsilon"] for s in SITES] if mode == "sample" else []
    most = planned_epsilon(cfg)  # what `fedmets site approve` tells a site: 4 x 3
    for epsilon in spent or [privacy["server"]["epsilon"]]:
        assert 4.0 * 1.2 < epsilon < most


def test_a_site_over_its_budget_refuses_to_train(sites) -> None:
    from fedmets.shared.privacy import PrivacyBudgetExceeded

    with sites["site_b"].open("a") as toml:
        toml.write("epsilon_budget = 2.0\n")  # into [policy], the file's last table
    with pytest.raises(PrivacyBudgetExceeded, match="site_b"):
        FederatedProtocol(
            _link(sites),
            _cfg(dp={"mode": "sample", "epsilon": 8.0}, stages={"fusion_rounds": 2}),
            "over-budget",
        ).run_all()


class _ReplyingGrid:
    """The part of a Flower Grid that ``FlowerLink`` uses: nodes that answer every message with
    their fixed ``replies`` content."""

    def __init__(self, replies: dict[int, object]) -> None:
        self.replies = replies
        self.pushed: list = []

    def get_node_ids(self) -> list[int]:
        return list(self.replies)

    def push_messages(self, messages) -> list[str]:
        self.pushed = list(messages)
        return [message.object_id for message in self.pushed]

    def pull_messages(self, message_ids) -> list:
        from flwr.app import Message

        pushed, self.pushed = self.pushed, []
        return [Message(self.replies[m.metadata.dst_node_id], reply_to=m) for m in pushed]


def test_a_reply_the_server_cannot_read_drops_that_site_alone(tmp_path, monkeypatch) -> None:
    """A reply whose packed arrays do not fit their layout (another wire version, or crafted)
    leaves that site out of the round; the other sites' replies are kept."""
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fedmets.server.server_app import FlowerLink

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    reply = {"n": 10, "positives": 3, "radiomics_sum": np.ones(4), "radiomics_count": np.ones(4)}
    bad = wire.to_records("query.moments", reply, reply=True)
    bad["arrays"] = ArrayRecord(array_dict={"arrays": Array(np.zeros(8, np.uint8))})
    grid = _ReplyingGrid({1: wire.to_records("query.moments", reply, reply=True), 2: bad})
    said: list[str] = []
    cfg = _cfg(federation={"round_timeout_s": 0.2})
    link = FlowerLink(grid, cfg, lambda text, *level: said.append(text), tmp_path / "r.jsonl")
    request = {"run": "test-run", "fold": 0, "min_patients": 5}
    replies = link.ask("query.moments", {"node-1": request, "node-2": request})
    assert list(replies) == ["node-1"] and replies["node-1"]["n"] == 10
    assert any("node-2: query.moments reply not readable" in line for line in said), said
