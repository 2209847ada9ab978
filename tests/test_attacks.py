"""A curious coordinating centre against one site: each attack of docs/privacy.md's threat table,
scripted as requests the centre chooses, sent to the real site worker through the real release
gate (``fedmets.client.release.answer``: the site's policy, the worker, the wire rules, the
audit log). Each attack is refused with the policy rule that refuses it (and the refusal is in
the site's audit log), or what the centre can reconstruct from what was released is measured
and shown to miss."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmets.client.policy import DifferencingGuard, PolicyRefused, ScoreGroups
from fedmets.client.release import BUDGET_RULE, RequestFailed, answer, site_audit_path
from fedmets.client.scoring import image_config
from fedmets.client.site_worker import SiteWorker
from fedmets.client.training import get_state
from fedmets.server.protocol import FederatedProtocol
from fedmets.shared import wire
from fedmets.shared.bundle import BUNDLE_FORMAT
from fedmets.shared.clinical import encoded_columns
from fedmets.shared.config import ConfigError, FederationConfig, load_site_config
from fedmets.shared.files import exclusive
from fedmets.shared.harmonisation import BatchAdjustment, covariate_columns
from fedmets.shared.metrics import logit
from fedmets.shared.models import FusionNet
from fedmets.shared.privacy import PrivacyBudgetExceeded
from fedmets.simulation.feature_sites import feature_table
from fedmets.simulation.in_process import InProcessLink
from fedmets.simulation.site_files import write_site_config

FLOOR = 5  # the sites' [policy] min_patients (the default)
SUBSITES = {"oropharynx": 40, "larynx": 24, "oral_cavity": 4, "hypopharynx": 4}
IMAGE_SETTINGS = {"backbone": "resnet3d", "image_preset": "cpu-small", "mask_channel": "ring"}


def make_site(root: Path, name: str = "chus", policy: dict | None = None) -> SiteWorker:
    """A tabular site of 72 patients (the real table's CHUS centre has 72) with four subsites,
    two of them small, ready to answer (``output/features.parquet``)."""
    rng = np.random.default_rng(3)
    folder = root / name
    (folder / "output").mkdir(parents=True)
    table = feature_table(72, 0.2, 12, rng, name)
    subsite = np.repeat(list(SUBSITES), list(SUBSITES.values()))
    for group in SUBSITES:
        table[f"subsite_{group}"] = (subsite == group).astype(float)
    table.to_parquet(folder / "output" / "features.parquet")
    (folder / "features.csv").write_text("features are in output/features.parquet\n")
    toml = write_site_config(
        folder,
        name,
        mode="tabular",
        modalities=["radiomics_table", "clinical"],
        seed=4,
        manifest="features.csv",
        policy=policy,
    )
    return SiteWorker([load_site_config(toml)])


def ask(worker: SiteWorker, route: str, **fields) -> dict:
    """One request of the centre's choosing through the site's gate (run ``attack`` unless
    given)."""
    return answer(worker, route, {"run": "attack", "min_patients": 1, **fields})


def audit(worker: SiteWorker) -> list[dict]:
    path = site_audit_path(worker.configs[0])
    return [json.loads(line) for line in path.read_text().splitlines()]


def refused(worker: SiteWorker, route: str, rule: str, **fields) -> str:
    """Ask, expect a refusal by ``rule``, check the audit logged it; the refusal's message."""
    with pytest.raises(PolicyRefused) as caught:
        ask(worker, route, **fields)
    assert caught.value.rule == rule, str(caught.value)
    entry = audit(worker)[-1]
    assert (entry["route"], entry["sent"], entry["rule"]) == (route, False, rule)
    assert entry["request"]  # what was asked is logged with the refusal
    return str(caught.value)


def fusion_request(worker: SiteWorker, hidden: list[int] | None = None) -> dict:
    """A scoring request the centre crafts itself: every radiomics column standardised with
    made-up statistics, clinical as is, a fresh fusion network's weights."""
    p = worker.data.radiomics.shape[1]
    q = worker.data.clinical.shape[1]
    torch.manual_seed(11)  # the same network whatever ran before in this process
    net = FusionNet({"radiomics": p, "clinical": q}, hidden or [], 0.0)
    return {
        "radiomics_columns": np.arange(p),
        "radiomics_mean": np.zeros(p),
        "radiomics_scale": np.full(p, 100.0),
        "clinical_mean": np.zeros(q),
        "clinical_scale": np.ones(q),
        "hidden": np.array(hidden or [], dtype=np.int64),
        "dropout": 0.0,
        "group_dropout": 0.0,
        wire.WEIGHTS_PREFIX + "none/radiomics+clinical": get_state(net),
    }


@pytest.fixture
def site(tmp_path: Path) -> SiteWorker:
    return make_site(tmp_path)


# ---- fold differencing -------------------------------------------------------------------------


def test_fold_differencing_within_a_run(site) -> None:
    """The attack: ``folds = n`` (one patient per fold), then moments of fold f (all but one
    patient) minus moments of all patients = that patient's row and label."""
    refused(site, "query.folds", "wire.declaration", folds=72)  # over the protocol's 64
    message = refused(site, "query.folds", "policy.folds", folds=60)
    assert "its own 5 folds" in message
    refused(site, "query.folds", "wire.declaration", folds=5, seed=123)  # no centre's seed
    replies = ask(site, "query.folds", folds=5)
    assert sum(replies["fold_sizes"]) == 72
    refused(site, "query.moments", "wire.declaration", fold=-2)
    refused(site, "query.moments", "policy.folds", fold=5)
    # What the folds allow: the difference of two training sets' sums covers two test folds,
    # and the final model's (every patient, fold -1) minus a fold's training set one test fold.
    sums = {f: ask(site, "query.moments", fold=f) for f in (*range(5), -1)}
    assert sums[-1]["n"] == 72
    rows = site.data.radiomics.to_numpy()
    labels = site.data.labels
    best = np.inf  # the closest any difference of two releases comes to one patient's row
    for a in (-1, *range(5)):
        for b in range(a + 1, 5):
            difference = sums[a]["radiomics_sum"] - sums[b]["radiomics_sum"]
            positives = sums[a]["positives"] - sums[b]["positives"]
            for i in range(72):
                for sign in (1, -1):
                    error = np.abs(sign * difference - rows[i]).max() / np.abs(rows[i]).max()
                    if positives == sign * labels[i]:
                        best = min(best, error)
    assert best > 0.5  # no difference of releases is any single patient's row


def test_fold_differencing_across_runs_and_cohorts(site, tmp_path) -> None:
    """Other runs get the same folds (no re-partitioning); a cohort one patient smaller does
    not release what differs from the earlier releases by that patient."""
    ask(site, "query.folds", folds=5)
    first = ask(site, "query.census", protocol=wire.PROTOCOL_VERSION)
    assert first["positives"] == site.data.labels.sum()
    ask(site, "query.moments", fold=0)
    ask(site, "query.folds", folds=5, run="attack-2")
    folds = [np.load(site.state_root / run / "folds.npz")["fold"] for run in ("attack", "attack-2")]
    assert np.array_equal(*folds)  # the site's folds, whatever the run
    # One patient leaves the cohort (or the centre persuades the site to drop one).
    features = site.configs[0].paths.output / "features.parquet"
    table = pd.read_parquet(features)
    gone = 7
    table.drop(index=gone).to_parquet(features)
    smaller = SiteWorker(site.configs)
    census = ask(smaller, "query.census", protocol=wire.PROTOCOL_VERSION, run="attack-3")
    assert "positives" not in census  # the whole cohort minus one: withheld
    entry = audit(smaller)[-1]
    assert entry["rule"] == "policy.difference" and "positives" in entry["withheld"]
    ask(smaller, "query.folds", folds=5, run="attack-3")
    for fold in range(5):
        reply = ask(smaller, "query.moments", fold=fold, run="attack-3")
        if "radiomics_sum" not in reply:
            assert audit(smaller)[-1]["rule"] == "policy.difference"
    # Whatever was released on the two cohorts: the sets each statistic was released on
    # differ by 0 or >= 5 patients.
    known = json.loads((site.policy_folder() / "released-sets.json").read_text())
    assert {"query.census", "query.moments", "labels"} <= set(known)
    for family in known.values():
        sets = [set(members) for members in family.values()]
        for a in range(len(sets)):
            for b in range(a + 1, len(sets)):
                assert len(sets[a] ^ sets[b]) >= FLOOR


def _relabel(worker: SiteWorker, **columns: np.ndarray) -> SiteWorker:
    """The site with its features table's ``columns`` replaced (labels, clinical indicators)."""
    features = worker.configs[0].paths.output / "features.parquet"
    table = pd.read_parquet(features)
    for name, values in columns.items():
        table[name] = values
    table.to_parquet(features)
    return SiteWorker(worker.configs)


def test_a_cohort_one_patient_apart_releases_no_sum_over_its_folds(site) -> None:
    """The attack: on a cohort one patient smaller the census withholds its positives, but
    its folds' positives add up to them; and the k folds' training sums add up to k - 1
    times the cohort's sums, whatever new folds the new cohort gets (no two sets one
    patient apart). Run 1 on the cohort, run 2 without one DM+ patient: the label and the
    radiomics row of that patient are the differences. The site withholds every sum over
    the new cohort's folds (they make the cohort known, one patient from the first), in
    moments and in the covariance alike (the same sums)."""
    gone = int(np.flatnonzero(site.data.labels == 1)[3])
    ask(site, "query.census", protocol=wire.PROTOCOL_VERSION, run="run-1")
    assert "fold_positives" in ask(site, "query.folds", folds=5, run="run-1")
    before = [ask(site, "query.moments", fold=f, run="run-1") for f in range(5)]
    assert all("radiomics_sum" in reply for reply in before)
    features = site.configs[0].paths.output / "features.parquet"
    pd.read_parquet(features).drop(index=gone).to_parquet(features)
    smaller = SiteWorker(site.configs)
    assert "positives" not in ask(smaller, "query.census", protocol=wire.PROTOCOL_VERSION)
    assert "fold_positives" not in ask(smaller, "query.folds", folds=5)
    for fold in range(5):
        assert "radiomics_sum" not in ask(smaller, "query.moments", fold=fold)
        assert audit(smaller)[-1]["rule"] == "policy.difference"
    mean = np.zeros(smaller.data.radiomics.shape[1])
    assert "centred_sum" not in ask(smaller, "query.covariance", fold=0, radiomics_mean=mean)


def test_a_cohort_one_patient_apart_releases_nothing_fold_wise(site) -> None:
    """The attack: any route's release over each fold's rows adds up to one over the cohort:
    the forest ranking's training positives, the training-score histograms, the permutation's
    loss sum of a constant network (log 2 x (n + positives) at pos_weight 2). On a cohort one
    patient smaller than an earlier census's, the folds' sum is its positives and the
    difference the label of the patient who left. Every fold-wise release is admitted with
    the run's cohort and folds: all withheld (all released without the rule)."""
    ask(site, "query.census", protocol=wire.PROTOCOL_VERSION, run="run-1")
    features = site.configs[0].paths.output / "features.parquet"
    pd.read_parquet(features).drop(index=int(np.flatnonzero(site.data.labels)[0])).to_parquet(
        features
    )
    smaller = SiteWorker(site.configs)
    ask(smaller, "query.folds", folds=5)
    p = smaller.data.radiomics.shape[1]
    scoring = {**fusion_request(smaller), "dp_mode": "off"}
    for fold in range(5):
        forest = ask(
            smaller,
            "query.importance",
            fold=fold,
            radiomics_columns=np.arange(p),
            radiomics_mean=np.zeros(p),
            radiomics_scale=np.ones(p),
            trees=10,
            seed=1,
        )
        scores = ask(smaller, "query.train_scores", fold=fold, bins=10, **scoring)
        losses = ask(
            smaller, "query.permutation", fold=fold, pos_weight=2.0, repeats=1, seed=0, **scoring
        )
        assert "positives" not in forest and f"hist_pos:{MAIN}" not in scores
        assert "base_loss_sum" not in losses
        assert audit(smaller)[-1]["rule"] == "policy.difference"


def test_a_crafted_combat_effect_sets_no_level_apart(site) -> None:
    """The attack: harmonise with covariate effects the centre crafts (zero but on the 4
    hypopharynx patients' level, in one feature), then ask the covariance of the harmonised
    rows: against the raw covariance, that level's sum comes out (exactly, with two such
    requests). Every release over harmonised values is admitted with the ComBat fit's
    groups: withheld, as the ComBat statistics on that level are."""
    ask(site, "query.folds", folds=5)
    p = site.data.radiomics.shape[1]
    columns = covariate_columns(["subsite"])
    effects = np.zeros((len(columns), p))
    effects[columns.index("subsite_hypopharynx"), 0] = 1e3
    X = site.data.radiomics.to_numpy()
    crafted = {
        "fold": -1,
        "radiomics_mean": np.zeros(p),
        "covariates": ["subsite"],
        "covariate_effects": effects,
        "grand_mean": X.mean(axis=0),
        "pooled_variance": X.var(axis=0),
    }
    ask(site, "query.combat_apply", **crafted)
    assert (site.state_root / "attack" / "harmonised-fold-1.npy").is_file()  # harmonised
    reply = ask(site, "query.covariance", fold=-1, radiomics_mean=np.zeros(p))
    assert "centred_sum" not in reply and audit(site)[-1]["rule"] == "policy.min_patients"


def test_label_products_leave_only_when_each_class_holds_the_floor_in_every_fold(site) -> None:
    """The attack: the correlation ranking's sums of centred values over each fold's DM+
    training patients. The folds' sums add up to k - 1 times the cohort's, so the cohort's
    minus one fold's is the sum over that fold's DM+ patients: with one DM+ in a fold, a row
    known to be DM+. With 5 DM+ (one a fold) the site withholds them, and sends the rest of
    the covariance; with 35 (7 a fold) it sends them."""
    labels = site.data.labels.astype(float)
    few = _relabel(site, label=np.where(np.cumsum(labels) <= 5, labels, 0.0))
    mean = np.zeros(few.data.radiomics.shape[1])
    assert ask(few, "query.folds", folds=5)["fold_positives"].tolist() == [1] * 5
    for fold in (-1, *range(5)):
        reply = ask(few, "query.covariance", fold=fold, radiomics_mean=mean, label_products=True)
        assert "centred_sum" in reply and "label_products" not in reply
    many = _relabel(few, label=(np.arange(72) % 2 == 0).astype(float))
    assert min(ask(many, "query.folds", folds=5, run="many")["fold_positives"]) >= FLOOR
    reply = ask(
        many, "query.covariance", fold=-1, radiomics_mean=mean, label_products=True, run="many"
    )
    X, y = many.data.radiomics.to_numpy(), many.data.labels
    np.testing.assert_allclose(reply["label_products"], np.nansum(X[y == 1], axis=0), rtol=1e-9)


def test_combat_releases_no_covariate_group_under_the_floor(site, tmp_path) -> None:
    """The attacks: (a) ``combat_variance`` with covariate effects the centre crafts (+1,
    then -1, on one indicator: the two residual sums of squares differ by four times that
    indicator's patients' sum) gives the 4 hypopharynx patients' sum, which
    ``combat_statistics`` withholds; (b) ``combat_statistics``' batch sum minus its levels'
    sums is the reference level's: one T1 patient among T2-T4 gives its row. Both routes
    admit every level, the reference level and each fold's share of them: withheld."""
    ask(site, "query.folds", folds=5)
    p = site.data.radiomics.shape[1]
    columns = covariate_columns(["subsite"])
    effects = np.zeros((len(columns), p))
    effects[columns.index("subsite_hypopharynx")] = 1.0
    crafted = {
        "radiomics_mean": np.zeros(p),
        "covariates": ["subsite"],
        "batch_intercepts": np.zeros((1, p)),
        "covariate_effects": effects,
    }
    assert "residual_sumsq" not in ask(site, "query.combat_variance", fold=-1, **crafted)
    assert audit(site)[-1]["rule"] == "policy.min_patients"
    two = make_site(tmp_path / "two-folds", policy={"folds": 2})  # 36 patients a fold
    ask(two, "query.folds", folds=2)
    fold = np.load(two.state_root / "attack" / "folds.npz")["fold"]
    stage = np.empty(72, dtype=object)  # T2, T3 and T4 in turn within each fold: 12 each
    stage[np.argsort(fold, kind="stable")] = np.array(["t2", "t3", "t4"])[np.arange(72) % 3]
    stage[10] = "t1"  # and one T1 patient
    indicators = {f"t_stage_{s}": (stage == s).astype(float) for s in ("t1", "t2", "t3", "t4")}
    staged = _relabel(two, **indicators)
    ask(staged, "query.folds", folds=2, run="staged")
    request = {"radiomics_mean": np.zeros(p), "covariates": ["t_stage", "age"], "run": "staged"}
    assert "covariate_response" not in ask(staged, "query.combat_statistics", fold=-1, **request)
    assert "covariate_response" in ask(
        staged, "query.combat_statistics", fold=-1, **{**request, "covariates": ["age"]}
    )


def test_three_covariate_levels_no_two_close_are_not_combined_into_one_patient(tmp_path) -> None:
    """The attack: ComBat's statistics over three category covariates the centre names, whose
    levels at this site are A = U1 + {p} (male), B = U1 + U2 (HPV's reference level:
    positive) and C = U2 (alcohol's reference level: yes), U1 and U2 ten patients each, half in
    each fold: every level and each fold's share of it holds the floor, no two sets the guard
    is given differ by fewer than 5 (the pairwise rule admits them all), and A - B + C is p's
    radiomics row, exact. The guard also looks for combinations of every set a statistic was
    released on (``fedmets.client.combined_sets``): withheld; two of the three covariates are
    released as before."""
    two = make_site(tmp_path, policy={"folds": 2})
    ask(two, "query.folds", folds=2)
    fold = np.load(two.state_root / "attack" / "folds.npz")["fold"]
    first, second = np.flatnonzero(fold == 0), np.flatnonzero(fold == 1)
    u1, u2, p = np.r_[first[:5], second[:5]], np.r_[first[5:10], second[5:10]], second[10]
    a, b, c = (np.isin(np.arange(72), rows).astype(float) for rows in ([*u1, p], [*u1, *u2], u2))
    assert np.array_equal(a - b + c, np.eye(72)[p])  # the combination is p alone
    levels = _relabel(
        two,
        sex_male=a,
        hpv_positive=b,
        hpv_negative=1 - b,
        hpv_missing=0 * b,
        alcohol_yes=c,
        alcohol_no=1 - c,
        alcohol_missing=0 * c,
    )
    ask(levels, "query.folds", folds=2, run="levels")
    k = levels.data.radiomics.shape[1]
    request = {"radiomics_mean": np.zeros(k), "run": "levels", "fold": -1}
    reply = ask(levels, "query.combat_statistics", covariates=["sex", "hpv", "alcohol"], **request)
    assert "covariate_response" not in reply
    entry = audit(levels)[-1]
    assert entry["rule"] == "policy.difference" and "a combination" in entry["withheld"]
    assert "covariate_response" in ask(
        levels, "query.combat_statistics", covariates=["hpv", "alcohol"], **request
    )


def test_levels_apart_by_patients_who_lack_a_column_are_not_a_sum_over_the_rest(tmp_path) -> None:
    """The attack (a review, 2026-12-07): ComBat's statistics over two levels L1 = U + {p} + M
    and L2 = U, ten patients in U, where the four patients M lack six radiomics columns: the
    sets differ by 5 (admitted), but a missing value sits at the column's mean, which the
    reply gives, so for those columns L1 - L2 - 4 x mean is p's value alone (exact before this
    rule). The guard now takes a feature sum as one over each pattern of present columns'
    patients too: L1's and L2's shares of them differ by p alone: withheld."""
    two = make_site(tmp_path, policy={"folds": 2})
    ask(two, "query.folds", folds=2)
    fold = np.load(two.state_root / "attack" / "folds.npz")["fold"]
    first, second = np.flatnonzero(fold == 0), np.flatnonzero(fold == 1)
    u, lacking, p = np.r_[first[:5], second[:5]], second[5:9], second[9]
    l1 = np.isin(np.arange(72), [*u, *lacking, p]).astype(float)
    l2 = np.isin(np.arange(72), u).astype(float)
    columns = {}
    for name in two.data.radiomics.columns[:6]:
        values = two.data.radiomics[name].to_numpy().copy()
        values[lacking] = np.nan
        columns[name] = values
    levels = _relabel(
        two, sex_male=l1, hpv_positive=l2, hpv_negative=1 - l2, hpv_missing=0 * l2, **columns
    )
    ask(levels, "query.folds", folds=2, run="levels")
    k = levels.data.radiomics.shape[1]
    request = {"radiomics_mean": np.zeros(k), "run": "levels", "fold": -1}
    reply = ask(levels, "query.combat_statistics", covariates=["sex", "hpv"], **request)
    assert "covariate_response" not in reply
    entry = audit(levels)[-1]
    assert entry["rule"] == "policy.difference" and entry["withheld"].startswith("features@")
    assert "covariate_response" in ask(  # one level alone: released as before
        levels, "query.combat_statistics", covariates=["hpv"], **request
    )


# ---- histograms and subsites -------------------------------------------------------------------


def test_fine_histograms_are_refused_and_released_ones_are_coarse(site) -> None:
    """The attack: 10,000-bin class-conditional histograms of a small set give each patient's
    (score, label)."""
    ask(site, "query.folds", folds=5)
    request = {**fusion_request(site), "fold": 0, "dp_mode": "off"}
    refused(site, "query.train_scores", "policy.max_bins", bins=10_000, **request)
    reply = ask(site, "query.train_scores", bins=100, **request)
    pos = reply["hist_pos:none/radiomics+clinical"]
    neg = reply["hist_neg:none/radiomics+clinical"]
    assert pos.sum() + neg.sum() == reply["n"]
    occupied = (pos + neg)[(pos + neg) > 0]
    assert occupied.min() >= site.policy.min_bin_count  # no bin pins down a few patients
    single = ((pos + neg) == 1).sum()
    assert single == 0  # no (score range, label) pair of one patient


def test_histograms_on_other_grids_cannot_be_differenced(site) -> None:
    """The attack: the same scores asked on several grids; where two grids group the patients
    differently, subtracting their cumulative counts isolates a patient (score range, label).
    Measured: every grid's cumulative patient count at every bin edge is a multiple of the
    bin floor (or the whole set), with one cumulative positive count per cumulative total over
    all grids: the grids agree on one grouping, and the finest set any difference leaves is a
    whole group of min_bin_count patients."""
    ask(site, "query.folds", folds=5)
    request = {**fusion_request(site), "fold": 0, "dp_mode": "off"}
    k = site.policy.min_bin_count
    positives_at: dict[int, int] = {}
    for bins in (97, 100, 331, 1000):
        reply = ask(site, "query.train_scores", bins=bins, **request)
        pos = reply["hist_pos:none/radiomics+clinical"]
        neg = reply["hist_neg:none/radiomics+clinical"]
        for total, positives in zip(np.cumsum(pos + neg), np.cumsum(pos), strict=True):
            assert total % k == 0 or total == reply["n"], (bins, total)
            assert positives_at.setdefault(int(total), int(positives)) == positives, bins
    assert len(positives_at) > 3  # the grids did resolve several groups


def test_subsite_subtraction_leaves_no_small_group(site) -> None:
    """The attack: the whole site's evaluation minus every released subsite gives the
    suppressed subsite's histograms, confusion counts and Brier sum."""
    ask(site, "query.folds", folds=5)
    request = fusion_request(site)
    for fold in range(5):
        ask(site, "query.train_scores", bins=100, fold=fold, dp_mode="off", **request)
    thresholds = {"thresholds:none/radiomics+clinical": np.full(5, 0.5)}
    reply = ask(site, "query.evaluation", bins=100, dp_mode="off", **thresholds)
    released = {k.split(":", 1)[1]: v for k, v in reply.items() if k.startswith("group_n:")}
    # oral cavity (4) alone under the floor; hypopharynx (4) suppressed beside it
    assert set(released) == {"oropharynx", "larynx"}
    hidden = reply["n"] - sum(released.values())
    assert hidden == 0 or hidden >= FLOOR  # the whole minus the groups: no small group
    assert reply["suppressed"] == 2


def test_a_subsite_the_guard_withholds_is_not_the_whole_minus_the_rest(tmp_path) -> None:
    """The attack: run 1 evaluates every fold; run 2 scores all folds but the one holding a
    lone hypopharynx patient, so its hypopharynx group is run 1's but that patient. The guard
    withholds it, but the whole minus the released subsites was that group again, and the
    two runs' positive counts differed by that patient's label. The whole minus the released
    groups is a release too: the guard's check of it suppresses one more group."""
    site = make_site(tmp_path)
    subsite = np.repeat(["oropharynx", "larynx", "hypopharynx"], [30, 34, 8])
    site = _relabel(site, **{f"subsite_{s}": (subsite == s).astype(float) for s in SUBSITES})
    for run in ("run-1", "run-2"):
        ask(site, "query.folds", folds=5, run=run)
    fold = np.load(site.state_root / "run-1" / "folds.npz")["fold"]
    lone = next(f for f in range(5) if ((subsite == "hypopharynx") & (fold == f)).sum() == 1)
    request, thresholds = fusion_request(site), {f"thresholds:{MAIN}": np.full(5, 0.5)}
    for f in range(5):
        for run in ("run-1", "run-2") if f != lone else ("run-1",):
            ask(site, "query.train_scores", bins=10, fold=f, dp_mode="off", run=run, **request)
    first = ask(site, "query.evaluation", bins=10, dp_mode="off", run="run-1", **thresholds)
    second = ask(site, "query.evaluation", bins=10, dp_mode="off", run="run-2", **thresholds)
    assert first["group_n:hypopharynx"] == 8 and "group_n:hypopharynx" not in second
    released = [k.split(":", 1)[1] for k in second if k.startswith("group_n:")]
    rest = second["n"] - sum(second[f"group_n:{s}"] for s in released)
    assert rest != 7  # not the hypopharynx group of run 2 (without the suppression: 7)
    known = json.loads((site.policy_folder() / "released-sets.json").read_text())
    sets = [set(members) for members in known["query.evaluation"].values()]
    assert all(len(a ^ b) in (0,) or len(a ^ b) >= FLOOR for a in sets for b in sets)


# ---- crafted scores: one patient apart ----------------------------------------------------------

MAIN = "none/radiomics+clinical"


def isolating_request(worker: SiteWorker) -> tuple[dict, np.ndarray]:
    """Crafted fusion weights (a linear network) under which one patient scores 0.9 and every
    other at most 0.1: the patient furthest along a direction the centre drew, which a centre
    with side knowledge of that patient's features can aim at. Returns the request and the
    patients' rows in order of that direction, the isolated one first."""
    request = fusion_request(worker)
    p, q = worker.data.radiomics.shape[1], worker.data.clinical.shape[1]
    along = (worker.data.radiomics.to_numpy() / 100.0) @ np.random.default_rng(5).normal(size=p)
    order = np.argsort(-along)
    first, second = along[order[0]], along[order[1]]
    steep = (logit(0.9) - logit(0.1)) / (first - second)
    weight = np.zeros((1, p + q), np.float32)
    weight[0, :p] = steep * np.random.default_rng(5).normal(size=p)
    key = wire.WEIGHTS_PREFIX + MAIN
    state = {**request[key], "net.0.weight": weight}
    state["net.0.bias"] = np.array([logit(0.9) - steep * first], np.float32)
    return {**request, key: state}, order


def test_score_groups_release_group_counts_only() -> None:
    """Every statistic of scores and labels a site releases (histograms, confusion counts at
    per-patient thresholds, Brier and loss sums, calibration) comes from its score groups:
    shuffling the labels within each group changes none of them, and a score that sets one
    patient apart still lands it in a group of ``min_bin_count``."""
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 72), rng.uniform(size=72)
    thresholds = rng.choice([0.3, 0.5, 0.6], 72)
    groups = ScoreGroups(y, s, 5)
    shuffled = y.copy()
    for members in groups.members:
        shuffled[members] = rng.permutation(y[members])
    assert not np.array_equal(shuffled, y)
    other = ScoreGroups(shuffled, s, 5)
    for a, b in [(groups.histograms(20), other.histograms(20))]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(groups.confusion(thresholds), other.confusion(thresholds))
    assert groups.brier_sum() == other.brier_sum()
    assert groups.loss_sum(2.0) == other.loss_sum(2.0)
    assert groups.calibration() == pytest.approx(other.calibration())
    apart = np.where(np.arange(72) == 7, 0.9, 0.05)  # patient 7 alone above 0.5
    tp, fn, tn, fp = ScoreGroups(y, apart, 5).confusion(0.5)
    assert tp + fp in (0, 5)  # called with its group, never alone (exactly: 1)


def test_a_crafted_model_cannot_single_out_a_patients_label(tmp_path) -> None:
    """The attack: a network that scores one patient 0.9 and every other at most 0.1, then the
    evaluation at threshold 0.5 (exactly: TP + FP = 1 and TP = that patient's label) and its
    Brier sum (exactly: a fraction of 0.01 or 0.81 for that patient). Measured on two cohorts
    that differ only in that patient's label, swapped with a group mate's (one of the four
    patients scored next to it): the site-wide release is the same for both, while the exact
    statistics of the scores the site kept tell them apart. (Subsite groups are other groups
    of the same scores: docs/privacy.md, residual risks.)"""
    released, exact = [], []
    for world in ("as is", "swapped"):
        site = make_site(tmp_path / world.replace(" ", "-"))
        request, order = isolating_request(site)
        if world == "swapped":
            labels = site.data.labels
            mate = next(r for r in order[1:5] if labels[r] != labels[order[0]])
            features = site.configs[0].paths.output / "features.parquet"
            table = pd.read_parquet(features)
            table.loc[[order[0], mate], "label"] = table.loc[[mate, order[0]], "label"].to_numpy()
            table.to_parquet(features)
            site = SiteWorker(site.configs)
        ask(site, "query.folds", folds=5)
        for fold in range(5):
            ask(site, "query.train_scores", bins=100, fold=fold, dp_mode="off", **request)
        thresholds = {f"thresholds:{MAIN}": np.full(5, 0.5)}
        reply = ask(site, "query.evaluation", bins=100, dp_mode="off", **thresholds)
        released.append({k: v for k, v in reply.items() if k.endswith(MAIN)})
        _, scores = site.out_of_fold("attack", [MAIN], 5)
        s, y = scores[MAIN], site.data.labels
        assert (s >= 0.5).sum() == 1 and s[order[0]] >= 0.5  # the crafting worked
        exact.append((int(((s >= 0.5) & (y == 1)).sum()), float(((s - y) ** 2).sum())))
    assert exact[0][0] != exact[1][0] and exact[0][1] != exact[1][1]  # without the groups
    assert released[0].keys() == released[1].keys() and len(released[0]) == 4
    for key, value in released[0].items():
        np.testing.assert_array_equal(value, released[1][key], err_msg=key)


# ---- crafted training requests -----------------------------------------------------------------


def test_crafted_training_requests_are_refused(site) -> None:
    """The attack: a batch of one patient with crafted weights returns that patient's
    gradient; a very long or very fast training, or a huge network, memorises rows."""
    ask(site, "query.folds", folds=5)
    base = {
        **fusion_request(site),
        "fold": 0,
        "round": 1,
        "epochs": 1,
        "lr": 1e-3,
        "batch": 16,
        "weight_decay": 0.0,
        "proximal_mu": 0.0,
        "pos_weight": 1.0,
        "seed": 0,
        "dp_mode": "off",
    }
    refused(site, "train.fusion", "policy.min_batch", **{**base, "batch": 1})
    refused(site, "train.fusion", "policy.max_epochs", **{**base, "epochs": 500})
    refused(site, "train.fusion", "policy.lr", **{**base, "lr": 5.0})
    wide = {**base, **fusion_request(site, hidden=[1024])}
    refused(site, "train.fusion", "policy.network", **wide)
    weights = base[wire.WEIGHTS_PREFIX + MAIN]  # a variant network declares its own widths
    variant = {**base, wire.WEIGHTS_PREFIX + MAIN + "#r4#h1024": weights}
    assert "#r4#h1024 hidden [1024]" in refused(site, "train.fusion", "policy.network", **variant)
    malformed = {**base, wire.WEIGHTS_PREFIX + MAIN + "#x": weights}
    refused(site, "train.fusion", "wire.declaration", **malformed)
    reply = ask(site, "train.fusion", **base)  # within the bounds: trained and sent
    assert reply["n"] >= FLOOR and wire.WEIGHTS_PREFIX + "none/radiomics+clinical" in reply


def test_a_training_reply_is_computed_on_every_row_it_is_released_on(site) -> None:
    """The attack: with ``n % batch == 1`` the site's loader dropped its lone last patient, yet
    the reply was admitted on all n fit rows. A constant network (every score 0.5, so the
    score groups change nothing) at ``pos_weight`` 1000 has the loss sum log 2 x (1000 P + N):
    batch n minus batch n - 1 gave that one patient's label (and, from the weights, its row;
    the centre names the patient by replaying the public shuffle seed)."""
    ask(site, "query.folds", folds=5)
    request = fusion_request(site)
    zero = {k: np.zeros_like(v) for k, v in request[wire.WEIGHTS_PREFIX + MAIN].items()}
    request |= {
        wire.WEIGHTS_PREFIX + MAIN: zero,
        **{"fold": wire.FINAL_FOLD, "round": 1, "epochs": 1, "lr": 0.1, "weight_decay": 0.0},
        **{"proximal_mu": 0.0, "pos_weight": 1000.0, "dp_mode": "off"},
    }
    n = len(site.data.labels)
    positives, negatives = int(site.data.labels.sum()), n - int(site.data.labels.sum())
    expected = np.log(2) * (1000 * positives + negatives)
    for batch, seed in [(n, 0), (n - 1, 1), (n - 1, 2)]:  # one step each; n % batch: 0, 1, 1
        reply = ask(site, "train.fusion", **request, batch=batch, seed=seed)
        assert reply["n"] == n
        assert reply[f"train_loss_sum:{MAIN}"] == pytest.approx(expected, rel=1e-6), batch


def _class_sum_request(site: SiteWorker) -> dict:
    """A crafted training round: a linear network scoring ~0 for everyone (bias -40), one full
    batch, inputs scaled by 1e9 so that AdamW's first step is linear in the gradient: each
    input weight's step is the DM+ fit rows' sum of that input (known scale)."""
    p, q = site.data.radiomics.shape[1], site.data.clinical.shape[1]
    request = fusion_request(site)
    state = {k: np.zeros_like(v) for k, v in request[wire.WEIGHTS_PREFIX + MAIN].items()}
    state["net.0.bias"][:] = -40.0
    return request | {
        wire.WEIGHTS_PREFIX + MAIN: state,
        **{"radiomics_scale": np.full(p, 1e9), "clinical_scale": np.full(q, 1e9)},
        **{"round": 1, "epochs": 1, "lr": 0.1, "batch": 1000, "weight_decay": 0.0},
        **{"proximal_mu": 0.0, "pos_weight": 1.0, "seed": 0, "dp_mode": "off"},
    }


def _dm_sum(reply: dict) -> np.ndarray:
    """The DM+ fit rows' sum of every input, from the weights of :func:`_class_sum_request`
    (AdamW's first step u = -lr g / (|g| + eps), g = -(1/n) sum over the DM+ rows of z)."""
    u = reply[wire.WEIGHTS_PREFIX + MAIN]["net.0.weight"].astype(np.float64).ravel()
    return u * 1e-8 / (0.1 - np.abs(u)) * reply["n"] * 1e9


def test_training_weights_can_be_admitted_as_class_sums(tmp_path) -> None:
    """The attack (docs/privacy.md, "Training weights of a crafted network are class sums"):
    the crafted round's weights give the DM+ fit rows' sum exactly, so the final model's reply
    minus fold f's (at ``dp_mode = "client"``: every training row) is the sum over fold f's DM+
    patients, here one a fold. With ``[policy] training_classes`` a training reply leaves only
    when each class holds the floor in its fit rows, the cohort and every fold."""
    site = make_site(tmp_path / "open")
    labels = site.data.labels
    few = _relabel(site, label=np.where(np.cumsum(labels) <= 5, labels, 0.0))  # one DM+ a fold
    ask(few, "query.folds", folds=5)
    request = _class_sum_request(few)
    everyone = _dm_sum(ask(few, "train.fusion", **request, fold=wire.FINAL_FOLD))
    fold_0 = _dm_sum(ask(few, "train.fusion", **(request | {"dp_mode": "client"}), fold=0))
    folds = np.load(few.state_root / "attack" / "folds.npz")["fold"]
    X = np.c_[few.data.radiomics.to_numpy(), few.data.clinical.to_numpy()]
    (patient,) = X[(folds == 0) & (few.data.labels == 1)]  # the default policy lets it out
    np.testing.assert_allclose(everyone - fold_0, patient, rtol=1e-4, atol=1e-3)

    guarded = make_site(tmp_path / "guarded", policy={"training_classes": True})
    few = _relabel(guarded, label=np.where(np.cumsum(labels) <= 5, labels, 0.0))
    ask(few, "query.folds", folds=5)
    for fold, mode in [(wire.FINAL_FOLD, "off"), (0, "client"), (0, "off")]:
        reply = ask(few, "train.fusion", **(request | {"dp_mode": mode}), fold=fold)
        assert set(reply) == {"n"}, (fold, mode)  # withheld: its count alone
    many = _relabel(guarded, label=(np.arange(72) % 2).astype(float))  # 7 DM+ a fold
    ask(many, "query.folds", folds=5)
    assert wire.WEIGHTS_PREFIX + MAIN in ask(many, "train.fusion", **request, fold=wire.FINAL_FOLD)


def _validation_counts(n: int, positives: int, r: int, fraction: float = 0.2) -> list[int]:
    """Each fold's inner-validation rows as ``assign_folds`` drew them before this rule, from
    public numbers: the positives dealt first, round-robin from fold ``r``; ``fraction`` of
    each class of a fold's training rows, rounded class by class."""
    fold, i = (np.arange(n) + r) % 5, np.arange(n)
    counts = []
    for f in range(5):
        p, t = ((fold != f) & (i < positives)).sum(), (fold != f).sum()
        counts.append(int(round(fraction * p)) + int(round(fraction * (t - p))))
    return counts


def test_the_counts_of_a_cohort_one_patient_apart_carry_no_label(site) -> None:
    """The attack: after a patient left, the guard withholds every label statistic of the
    new cohort (the census' positives among them), but each reply still carries its count,
    and the inner-validation rows were ``val_fraction`` of each class of a fold's training
    rows, rounded class by class: their number (``query.validate``'s ``n``, or the training
    rows' minus it) depended on the positives. With the fold sizes (which give the fold the
    round-robin started at), the centre predicts the counts for the positives the census
    gave before, and for one fewer: only one fits, the leaver's label (here 18 DM+ of 72; so
    for about 2 in 3 positives counts of a 71-patient cohort). Each fold now validates on
    ``val_fraction`` of its training rows, the positives' share stratified: the counts depend
    on the fold's size alone (a fifth of its training rows, rounded up), whatever the label."""
    labels = (np.arange(72) % 4 == 0).astype(float)  # 18 DM+
    site = _relabel(site, label=labels)
    assert ask(site, "query.census")["positives"] == 18
    features = site.configs[0].paths.output / "features.parquet"
    table = pd.read_parquet(features)
    request = {k: v for k, v in fusion_request(site).items() if k != "group_dropout"}
    for leaver in (0, 1):  # a DM+ patient, then a DM- one
        table.drop(index=leaver).to_parquet(features)
        worker = SiteWorker(site.configs)
        run = f"left{leaver}"
        assert "positives" not in ask(worker, "query.census", run=run)  # withheld
        folds = ask(worker, "query.folds", folds=5, run=run)
        n, sizes = folds["n"], folds["fold_sizes"].tolist()
        starts = [r for r in range(5) if np.bincount((np.arange(n) + r) % 5).tolist() == sizes]
        scoring = {"stage": "fusion", "pos_weight": 1.0, "run": run, **request}
        counts = [ask(worker, "query.validate", fold=f, **scoring)["n"] for f in range(5)]
        # class by class, the counts of the two possible cohorts differ (only the leaver's
        # label fitted the site's counts before this rule) ...
        assert all(_validation_counts(n, 18, r) != _validation_counts(n, 17, r) for r in starts)
        # ... and now they depend on the fold sizes alone: the same whatever the label
        assert counts == [math.ceil(round(0.2 * (n - size), 9)) for size in sizes]


def test_a_cohort_one_patient_apart_gets_no_training_weights(site) -> None:
    """The attack: census and moments of the cohort (run 1); a DM+ patient leaves; run 2 asks
    only crafted training rounds of the final model (:func:`_class_sum_request`, the bias at
    -40 and at +40, and at ``pos_weight`` 1e-6 for the bias's step): the weights give the new
    cohort's DM+ and DM- sums and its positives, so the moments' sum minus them is the row of
    the patient who left and the census's positives minus them its label (both exact to
    3e-4 before this rule: the guard compared a training reply's cohort with the earlier
    training replies' alone). Every release's cohort is now a set of feature sums and label
    counts to the guard, whatever its route: withheld."""
    ask(site, "query.folds", folds=5, run="run-1")
    assert "positives" in ask(site, "query.census", protocol=wire.PROTOCOL_VERSION, run="run-1")
    assert "radiomics_sum" in ask(site, "query.moments", fold=wire.FINAL_FOLD, run="run-1")
    gone = int(np.flatnonzero(site.data.labels == 1)[3])
    features = site.configs[0].paths.output / "features.parquet"
    pd.read_parquet(features).drop(index=gone).to_parquet(features)
    smaller = SiteWorker(site.configs)
    ask(smaller, "query.folds", folds=5, run="run-2")
    request = _class_sum_request(smaller) | {"fold": wire.FINAL_FOLD, "run": "run-2"}
    for bias, pos_weight in [(-40.0, 1.0), (40.0, 1.0), (-40.0, 1e-6)]:
        weights = {k: v.copy() for k, v in request[wire.WEIGHTS_PREFIX + MAIN].items()}
        weights["net.0.bias"][:] = bias
        crafted = request | {wire.WEIGHTS_PREFIX + MAIN: weights, "pos_weight": pos_weight}
        reply = answer(smaller, "train.fusion", {"min_patients": 1, **crafted})
        assert set(reply) == {"n"}, bias  # withheld: its count alone
        entry = audit(smaller)[-1]
        assert entry["rule"] == "policy.difference" and "features" in entry["withheld"]


def _combat_bundle(site: SiteWorker, census: dict, column: str, helper: str) -> dict:
    """A bundle the centre crafts: one linear network on radiomics ``column``, harmonised by
    ComBat without covariates (a held-out site fits its own batch: mean and scale), with a
    ``helper`` column of far mean and huge variance beside it, so that the empirical Bayes
    priors shrink nothing."""
    q = census["clinical_columns"]
    manifest = {
        "format": BUNDLE_FORMAT,
        "run": "attack",
        "radiomics_features": [column, helper],
        "image": None,
        "params_hash": census["params_hash"],
        "clinical_columns": [f"c{i}" for i in range(q)],
        "main_model": "none/radiomics",
        "models": ["none/radiomics"],
        "thresholds": {"none/radiomics": 0.5},
        "fusion": {
            **{"hidden": [], "dropout": 0.0, "group_dropout": 0.0, "mode": "joint"},
            "networks": ["none/radiomics"],
        },
        "harmonisation": {"method": "combat", "covariates": []},
        "cohort": {"patients": 0, "sites": 0, "events": 0},
        "versions": {},
        "config_fingerprint": "0" * 64,
        "threshold_rule": "crafted",
        "rounds": {},
    }
    sd, sd_helper = (float(site.data.radiomics[c].std()) for c in (column, helper))
    arrays = {
        "radiomics_mean": np.zeros(2),
        "radiomics_scale": np.array([sd, 1e12]),
        "clinical_mean": np.zeros(q),
        "clinical_scale": np.ones(q),
        "fusion/none/radiomics/net.0.weight": np.array([[1.0, 0.0]], dtype=np.float32),
        "fusion/none/radiomics/net.0.bias": np.zeros(1, dtype=np.float32),
        "combat_grand_mean": np.array([0.0, -1e8 * sd_helper]),
        "combat_effects": np.zeros((0, 2)),
        "combat_variance": np.array([sd**2, (1e4 * sd_helper) ** 2]),
        "combat_mean": np.zeros(2),
    }
    return {"manifest": json.dumps(manifest), "weights:bundle": arrays}


def test_a_held_out_evaluation_is_computed_on_the_labelled_patients_alone(site) -> None:
    """The attack: a crafted ComBat bundle makes a held-out site fit its own batch's location
    on every extracted patient, labelled or not, so the Brier sums of two crafted networks
    solve for that mean: minus the labelled patients' sum (query.moments), an unlabelled
    patient's value (a review script read all 12 columns to 1e-4 SD). The evaluation is now
    computed on the labelled patients alone: the replies are the same whatever the unlabelled
    patient's values."""
    features = site.configs[0].paths.output / "features.parquet"
    table = pd.read_parquet(features)
    column, helper = [c for c in table.columns if c.startswith("tumour_")][:2]
    replies = []
    for value in (0.0, 1e4):  # the new patient, extracted, label not known yet
        new = table.iloc[[0]].assign(patient_id="chus-new", label=np.nan, **{column: value})
        pd.concat([table, new], ignore_index=True).to_parquet(features)
        worker = SiteWorker(site.configs)
        census = ask(worker, "query.census")
        assert census["unlabelled"] == 1
        ask(worker, "query.model_bundle", **_combat_bundle(worker, census, column, helper))
        replies.append(ask(worker, "query.bundle_evaluation", bins=100))
    assert replies[0]["n"] == len(table)
    assert replies[0]["brier_sum:none/radiomics"] == replies[1]["brier_sum:none/radiomics"]


FLT_MAX = float(np.finfo(np.float32).max)


def _above(site: SiteWorker, column: int, t: float) -> dict:
    """A scoring request whose network scores NaN exactly for the patients whose radiomics
    ``column`` is above ``t``: the column standardised with a tiny scale (+/- the largest
    input) and a constant input, weighted +/- 3e38 (inf - inf above t, -inf below)."""
    p = site.data.radiomics.shape[1]
    request = fusion_request(site)
    request["radiomics_columns"] = np.r_[column, column, np.arange(2, p)]
    request["radiomics_mean"] = np.r_[t, -1e30, np.zeros(p - 2)]
    request["radiomics_scale"] = np.r_[1e-30, 1e-30, np.ones(p - 2)]
    weights = {k: np.zeros_like(v) for k, v in request[wire.WEIGHTS_PREFIX + MAIN].items()}
    weights["net.0.weight"][0, :2] = [3e38, -3e38]
    return request | {wire.WEIGHTS_PREFIX + MAIN: weights}


def test_a_failure_answers_few_questions_about_the_patients(site) -> None:
    """The attack: a request that fails for some patients' values answers "is any patient's
    value past t?", and bisecting t gives one patient's value. (1) A scale of D / FLT_MAX made
    the standardised inputs overflow float32 for the patients past t and the forest raise: the
    inputs are now bounded, and the request is answered. (2) A network crafted to score NaN
    past t still fails, but a failure reaches the centre as its error type alone and a run
    gets ``max_failures`` (3) of them, then is refused: 3 bits a run, where the bisection of
    one value takes about 40."""
    ask(site, "query.folds", folds=5)
    X = site.data.radiomics.to_numpy()[:, 0]
    top = float(X.max())
    for t in (top - 1e-3, top + 1e-3):  # (1): answered on either side of the largest value
        reply = ask(
            site,
            "query.importance",
            fold=wire.FINAL_FOLD,
            radiomics_columns=np.array([0]),
            radiomics_mean=np.array([t - 1.0]),
            radiomics_scale=np.array([1.0 / FLT_MAX]),
            trees=1,
            seed=0,
        )
        assert reply["n"] == len(X)
    scores = {"fold": 0, "bins": 10}
    ask(site, "query.train_scores", **_above(site, 0, top + 1.0), **scores)  # nobody past t
    for failure in (1, 2, 3):
        with pytest.raises(RequestFailed) as failed:
            ask(site, "query.train_scores", **_above(site, 0, top - 1e-3), **scores)
        assert f"failure {failure} of run 'attack'" in str(failed.value)
        assert "ValueError" in str(failed.value) and "NaN" not in str(failed.value)
        entry = audit(site)[-1]
        assert (entry["rule"], entry["sent"]) == ("failed", False) and entry["problems"]
    refused(site, "query.train_scores", "policy.max_failures", **_above(site, 0, top), **scores)
    refused(site, "query.moments", "policy.max_failures", fold=0)  # the whole run
    ask(site, "query.folds", folds=5, run="another")
    assert ask(site, "query.moments", fold=0, run="another")["n"] > 0  # approval bounds runs


def test_failures_at_once_answer_no_more_questions(site) -> None:
    """The attack: a batch of requests that fail for some patients' values, answered at once
    by the site's lanes (``[compute] parallel_folds``): each checked the run's failures before
    any of them had failed, so all of them failed, each a yes/no answer (8 at once: 5 or more
    failures of a run that gets 3; no other request of the run was answered after them). A
    request that ends after the run used up its failures is now refused, failed or answered:
    at most ``max_failures`` failures reach the centre, as when the requests come one by one."""
    ask(site, "query.folds", folds=5)
    top = float(site.data.radiomics.to_numpy()[:, 0].max())
    lanes = [SiteWorker(site.configs) for _ in range(8)]  # eight processes' workers, one site
    start = threading.Barrier(len(lanes))
    outcomes: list[str] = []
    refusals: set[str] = set()

    def fail(lane: SiteWorker) -> None:
        start.wait()
        try:
            ask(lane, "query.train_scores", **_above(lane, 0, top - 1e-3), fold=0, bins=10)
            outcomes.append("answered")
        except RequestFailed:
            outcomes.append("failed")
        except PolicyRefused as refusal:
            outcomes.append(refusal.rule)
            refusals.add(refusal.message)

    threads = [threading.Thread(target=fail, args=(lane,)) for lane in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(outcomes) == len(lanes)
    assert outcomes.count("failed") == site.policy.max_failures, outcomes  # (5-8 before)
    assert set(outcomes) == {"failed", "policy.max_failures"}
    assert len(refusals) == 1  # the same words whether the refused request failed or not
    refused(site, "query.moments", "policy.max_failures", fold=0)


def test_a_network_that_fails_on_some_patients_gets_a_failure_not_a_nan(site) -> None:
    """The attack: the network of :func:`_above` scores NaN for the patients past t; a loss
    sum (validation, permutation importance) or a training round's weights over rows holding
    one of them came back NaN, answered and not counted as a failure: "is any of these
    patients past t?", a bit a request, as many requests as the run made (a default site
    answers every validation round). Scores that are not finite now fail the request
    (``ScoreGroups``) and a reply holding a value that is not finite does not leave
    (``wire.check_reply``): each is one of the run's ``max_failures``."""
    ask(site, "query.folds", folds=5)
    X = site.data.radiomics.to_numpy()[:, 0]
    scoring = {"fold": 0, "pos_weight": 1.0}
    training = {**scoring, "round": 1, "epochs": 1, "lr": 1e-3, "batch": 16}
    training.update(weight_decay=0.0, proximal_mu=0.0, seed=0, dp_mode="off")
    asked = [
        ("query.validate", {**scoring, "stage": "fusion"}),
        ("query.permutation", {**scoring, "repeats": 1, "seed": 0}),
        ("train.fusion", training),
    ]
    for route, settings in asked:  # nobody past t: answered, every value finite
        reply = ask(site, route, **_above(site, 0, X.max() + 1.0), **settings)
        assert all(wire.all_finite(v) for v in reply.values()), route
    for failure, (route, settings) in enumerate(asked, 1):  # everybody past t
        with pytest.raises(RequestFailed) as failed:
            ask(site, route, **_above(site, 0, X.min() - 1.0), **settings)
        assert f"failure {failure} of run 'attack'" in str(failed.value)
        entry = audit(site)[-1]
        assert (entry["route"], entry["rule"], entry["sent"]) == (route, "failed", False)
    refused(site, "query.validate", "policy.max_failures", **_above(site, 0, 0.0), **asked[0][1])


def test_a_dp_training_says_nothing_exact_of_the_patients_a_network_fails_on(tmp_path) -> None:
    """The attack: under DP-SGD the same network (NaN for the patients past t) made every
    per-sample gradient of those patients NaN, so the noisy sum and every weight of the reply
    were NaN exactly when one of them was in the round's rows, whatever the noise: an exact
    bit a training at a site with ``require_dp``, at the budget's price of noise that hid
    nothing. A sample whose gradient is not finite now adds zero
    (``fedmets.client.privacy``): the reply is finite and a DP release like any other."""
    worker = make_site(tmp_path, policy={"require_dp": True, "epsilon_budget": 100.0})
    ask(worker, "query.folds", folds=5)
    X = worker.data.radiomics.to_numpy()[:, 0]
    for t in (X.max() + 1.0, X.min() - 1.0):  # nobody past t, then everybody
        reply = ask(worker, "train.fusion", **_above(worker, 0, t), **_dp_settings())
        assert set(reply) == {"n", wire.WEIGHTS_PREFIX + MAIN}
        assert wire.all_finite(reply[wire.WEIGHTS_PREFIX + MAIN]), t
    assert [e["sent"] for e in audit(worker)[-2:]] == [True, True]


def test_a_forest_cannot_be_made_a_threshold_on_one_column(site) -> None:
    """The attack: ``query.importance`` of one column standardised with a scale of 1e-300
    around t: every value below t is clipped to -10^6 SD, every value above to +10^6 SD
    (``INPUT_BOUND``), so the forest can split the rows only when some patient is past t, and
    the column's importance is 0 exactly when none is; bisecting t on the same training rows
    (the guard admits the same set again) gives the largest value of the column, one
    patient's (before the rule: 4049.710278670486, exact to 1e-16, in 62 requests). The site
    brings the centre's mean and scale within 300 of its own SD of the column
    (``policy.forest_standardisation``): a forest sees its inputs only through their order,
    so every threshold now gets the reply of the honest standardisation."""
    ask(site, "query.folds", folds=5)
    column = 3
    X = site.data.radiomics.to_numpy()[:, column]

    def importances(mean: float, scale: float) -> np.ndarray:
        return ask(
            site,
            "query.importance",
            fold=wire.FINAL_FOLD,
            radiomics_columns=np.array([column, 0]),
            radiomics_mean=np.array([mean, 0.0]),
            radiomics_scale=np.array([scale, 1e-300]),  # column 0 at one value: no split
            trees=20,
            seed=1,
        )["importances"]

    honest = importances(X.mean(), X.std())
    assert honest[0] > 0
    lo, hi = X.mean(), X.mean() + 1e3 * X.std()  # the centre knows the mean (query.moments)
    for _ in range(45):
        mid = (lo + hi) / 2
        reply = importances(mid, 1e-300)
        assert np.array_equal(reply, honest)  # the same, whatever the threshold
        lo, hi = (mid, hi) if reply[0] > 0 else (lo, mid)
    assert np.abs(X - lo).min() > X.std()  # the bisection ends on no patient's value


def test_a_missing_value_is_not_placed_where_the_centre_chooses(site) -> None:
    """The attack: a forest's missing values were imputed at the request's mean (standardised
    0), a point the centre chooses (anywhere within 300 SD of the site's mean: all of the
    column's values), so the patients with a missing value were a probe it could slide: the
    forest's splits, and the importances, changed exactly when that point crossed another
    patient's value. A scan of ``query.importance`` over the mean, then bisection where the
    reply changes, gave the column's values one by one (before the rule: each to 1.5e-4, the
    1e-7 SD of sklearn's tie threshold, in about 50 requests). A missing value now takes the
    column's own mean on the forest's rows (``policy.forest_standardisation``): every mean the
    centre sends gets the same importances."""
    column = 3
    name = site.data.radiomics.columns[column]
    values = site.data.radiomics[name].to_numpy().copy()
    values[[5, 40]] = np.nan  # two patients without this feature
    site = _relabel(site, **{name: values})
    ask(site, "query.folds", folds=5)
    other = site.data.radiomics.to_numpy()[:, 1]
    present = np.sort(values[np.isfinite(values)])

    def importances(mean: float) -> np.ndarray:
        return ask(
            site,
            "query.importance",
            fold=wire.FINAL_FOLD,
            radiomics_columns=np.array([column, 1]),
            radiomics_mean=np.array([mean, other.mean()]),
            radiomics_scale=np.array([np.nanstd(values), other.std()]),
            trees=20,
            seed=1,
        )["importances"]

    honest = importances(np.nanmean(values))
    for t in (present[15:55:2] + present[16:56:2]) / 2:  # between two patients' values
        assert np.array_equal(importances(t), honest)  # (16 of 20 differed before)


def test_a_missing_value_does_not_stay_put_while_the_centre_moves_the_mean(site) -> None:
    """The attack: a sum route placed a missing value at the request's mean, so it stayed at 0
    (centred) while the centre moved every present value of that column by choosing its mean.
    With one patient lacking column k, two ``query.covariance`` requests (the mean of k at 0,
    then 1) differ in ``cross_products[:, k]`` by the sum of each other column over the
    patients that have k: added to ``centred_sum``, the lacking patient's whole row (to 7e-11
    before this rule); in ``label_products[k]`` by the positives among them: its label. The
    ComBat statistics at two means differ, in ``covariate_response[:, k]``, by its clinical
    values (its age). A missing value now takes the column's own mean on the rows the
    sums are over (``policy.missing_fill``): the two replies differ as for a site where every
    patient has k, and the ComBat statistics do not depend on the request's mean at all."""
    k, lone = 3, 40
    name = site.data.radiomics.columns[k]
    values = site.data.radiomics[name].to_numpy().copy()
    values[lone] = np.nan  # one patient without feature k
    labels = (np.arange(72) % 2 == 0).astype(float)  # 7 of each class a fold: products leave
    site = _relabel(site, **{name: values}, label=labels)
    assert site.data.labels[lone] == 1
    ask(site, "query.folds", folds=5)
    p = site.data.radiomics.shape[1]
    X = site.data.radiomics.to_numpy()
    others = np.arange(p) != k

    def at(mean_k: float) -> np.ndarray:
        return np.where(np.arange(p) == k, mean_k, 0.0)

    low, high = (
        ask(site, "query.covariance", fold=-1, radiomics_mean=at(m), label_products=True)
        for m in (0.0, 1.0)
    )
    row = low["centred_sum"] + high["cross_products"][:, k] - low["cross_products"][:, k]
    error = np.abs(row[others] - X[lone, others]) / np.abs(X[lone, others])
    label = low["positives"] - (low["label_products"][k] - high["label_products"][k])
    assert error.min() > 0.5, error  # every column of the row missed (7e-11 before)
    assert label == 0 != site.data.labels[lone]  # the positives of all, not of those with k
    covariates = {"covariates": ["age"], "fold": -1}
    low, high = (
        ask(site, "query.combat_statistics", radiomics_mean=at(m), **covariates) for m in (0, 1e3)
    )
    assert "covariate_response" in low  # released: the lone patient's age, before the rule
    np.testing.assert_array_equal(low["covariate_response"], high["covariate_response"])
    np.testing.assert_array_equal(low["batch_response_sum"], high["batch_response_sum"])


@pytest.mark.slow
def test_a_request_cannot_make_the_site_work_without_bound(site) -> None:
    """The attack: a few kB of request that keep the site busy for hours or take its memory.
    ``covariates`` repeated: each name's levels give patient sets, and the cost grows with the
    square of the list (400 names in ~3 kB took 8.9 s, 4,000 would take ~15 min, during which
    the site service answers nothing else); ``radiomics_columns`` repeated: each index is a
    column of every patient's values, several copies of them (10^6 one-byte indices, 1 MB,
    took 2.5 GB at this 72-patient site). Both are bounded by the site's data: at most the
    clinical schema's columns of covariates, at most the site's radiomics columns of indices
    (``policy.size``); an honest request is within both. ``query.importance``'s
    ``resamples`` (<= 200) forests of ``trees`` (<= max_trees, 1000) each on halves: 1000 x
    201 trees took ~3.5 min at this 72-patient, 12-column site (1.06 s per 1000 trees), more
    at a site of more patients and columns; at most ``max_forest_trees`` (20,000) now.
    ``query.evaluation``'s ``thresholds:<model>``: the site looked for a fold's scores for
    each entry (10^6 one-byte entries, 1 MB, took 7.9 s), and any name the site's model key
    maps to in its score file (``_safe``: every non-alphanumeric character to ``_``) was a
    model of its own (2,000 such aliases, ~100 kB, got a 96 MB reply of 1000-bin histograms):
    thresholds are one for each of the site's folds, under a model key, now. ``weights:*``:
    each network (an ensemble member ``<model>~<m>``, any m) is trained for ``epochs``, ~0.06 s
    for 164 bytes of a linear network's weights (10^4 members, ~2 MB: ~10 min): at most
    ``max_networks`` (256) now."""
    ask(site, "query.folds", folds=5)
    p = site.data.radiomics.shape[1]
    message = refused(
        site,
        "query.combat_statistics",
        "policy.size",
        fold=0,
        radiomics_mean=np.zeros(p),
        covariates=["sex"] * 200,
    )
    assert "200 covariates" in message
    refused(
        site,
        "query.importance",
        "policy.size",
        fold=0,
        radiomics_columns=np.zeros(10**5, dtype=np.uint8),
        radiomics_mean=np.zeros(1),
        radiomics_scale=np.ones(1),
        trees=1,
        seed=1,
    )
    scores = {**fusion_request(site), "fold": 0, "bins": 10}
    scores["radiomics_columns"] = np.r_[np.arange(p - 1), p]  # no column p
    refused(site, "query.train_scores", "policy.size", **scores)
    honest = {"radiomics_columns": np.arange(p), "radiomics_mean": np.zeros(p)}
    reply = ask(
        site, "query.importance", fold=0, **honest, radiomics_scale=np.ones(p), trees=1, seed=1
    )
    assert "importances" in reply
    stability = {"fold": 0, **honest, "radiomics_scale": np.ones(p), "seed": 1, "top_k": 5}
    # 1000 trees x 201 forests: ~3.5 min of this site's time for ~100 bytes
    refused(site, "query.importance", "policy.size", **stability, trees=1000, resamples=200)
    # the default run's stability ranking: 200 trees x 21 forests
    ask(site, "query.importance", **stability, trees=200, resamples=20)
    for fold in range(5):
        ask(site, "query.train_scores", **fusion_request(site), fold=fold, bins=10)
    long = {"thresholds:" + MAIN: np.zeros(10**6, dtype=np.int8)}  # 1 MB: 7.9 s before
    refused(site, "query.evaluation", "policy.size", bins=10, **long)
    aliases = {
        f"thresholds:none{chr(0x4E00 + i)}radiomics+clinical": np.full(5, 0.5) for i in range(2)
    }
    refused(site, "query.evaluation", "policy.size", bins=1000, **aliases)
    reply = ask(site, "query.evaluation", bins=1000, **{"thresholds:" + MAIN: np.full(5, 0.5)})
    assert f"brier_sum:{MAIN}" in reply
    training = {"round": 1, "epochs": 20, "lr": 0.01, "batch": 8, "pos_weight": 1.0, "seed": 1}
    training |= {"weight_decay": 0.0, "proximal_mu": 0.0, "fold": 0}
    request = fusion_request(site)
    state = request.pop(wire.WEIGHTS_PREFIX + MAIN)
    members = {f"{wire.WEIGHTS_PREFIX}{MAIN}~{m}": state for m in range(1, 300)}
    refused(site, "train.fusion", "policy.size", **request, **training, **members)
    reply = ask(site, "train.fusion", **fusion_request(site), **training)
    assert wire.WEIGHTS_PREFIX + MAIN in reply
    covariates = ["age", "sex", "t_stage"]  # the default [harmonisation] covariates
    ask(site, "query.combat_statistics", fold=0, radiomics_mean=np.zeros(p), covariates=covariates)


def test_a_harmonised_sum_keeps_every_patient_in_the_covariate_shift(site) -> None:
    """The attack: ``query.combat_apply`` with a covariate effect the centre crafts (a large
    one of ``age`` on column k, which one patient lacks), then the harmonised moments of
    column k. A missing value stayed missing after harmonisation, outside the age shift that
    every present value took, so the harmonised sum was one over the patients with k: the
    centre replicates the site's empirical-Bayes fit from the ComBat statistics (per column
    the first two moments of the standardised values), and the sum less that fit's part is
    the effect times their summed ages: the lone patient's age (to 1e-12 before this rule;
    with an indicator, its stage or sex). A missing value is now harmonised at its imputed
    value with the patient's own covariates and kept: the sum is over every patient, and is
    the one the centre predicts from the cohort's aggregates alone."""
    k, lone = 3, 40
    name = site.data.radiomics.columns[k]
    values = site.data.radiomics[name].to_numpy().copy()
    values[lone] = np.nan
    site = _relabel(site, **{name: values})
    ask(site, "query.folds", folds=5)
    n, p = site.data.radiomics.shape
    raw = ask(site, "query.moments", fold=-1)
    mean = raw["radiomics_sum"] / raw["radiomics_count"]
    request = {"covariates": ["age"], "fold": -1, "radiomics_mean": mean}
    sums = ask(site, "query.combat_statistics", **request)
    zero = {"batch_intercepts": np.zeros((1, p)), "covariate_effects": np.zeros((1, p))}
    squares = ask(site, "query.combat_variance", **request, **zero)["residual_sumsq"]
    y, age = sums["batch_response_sum"][0], sums["batch_covariate_sum"][0, 0]
    age2, age_y = sums["covariate_gram"][0, 0], sums["covariate_response"][0]
    v = squares / n - (y / n) ** 2
    beta = np.where(np.arange(p) == k, 10 * np.sqrt(v), 0.0)
    # the site's fit, replicated: each column's standardised values' mean and variance
    s1 = (y - n * mean - beta * age) / np.sqrt(v)
    s2 = squares + n * mean**2 + beta**2 * age2 - 2 * mean * y - 2 * beta * age_y
    s2 = (s2 + 2 * mean * beta * age) / v
    z = np.where(np.arange(n) < n // 2, 1.0, -1.0)
    z = (z - z.mean()) / z.std(ddof=1)
    like = s1 / n + np.sqrt((s2 - s1**2 / n) / (n - 1)) * z[:, None]
    fit = BatchAdjustment.fit(like, np.zeros((n, 0)), np.zeros(p), np.zeros((0, p)), np.ones(p))
    gamma, delta = fit.gamma[k], fit.delta[k]
    applied = {"grand_mean": mean, "covariate_effects": beta[None], "pooled_variance": v}
    ask(site, "query.combat_apply", **request, **applied)
    harmonised = ask(site, "query.moments", fold=-1, harmonised=True)

    def summed(rows: float, values: float, ages: float) -> float:  # harmonised, over rows
        scale = 1 / np.sqrt(delta)
        location = rows * (mean[k] * (1 - scale) - gamma * np.sqrt(v[k]) * scale)
        return values * scale + location + beta[k] * ages * (1 - scale)

    have = raw["radiomics_count"][k]  # the patients with column k
    known = summed(have, raw["radiomics_sum"][k], 0.0)
    ages = (harmonised["radiomics_sum"][k] - known) / (beta[k] * (1 - 1 / np.sqrt(delta)))
    assert abs(age - ages - site.data.clinical["age"].iloc[lone]) > 10  # (1e-12 before)
    assert harmonised["radiomics_count"][k] == n
    every = summed(n, n * mean[k], age)  # every patient, the imputed one at the mean
    np.testing.assert_allclose(harmonised["radiomics_sum"][k], every, rtol=1e-9)


def _many_model_bundle(site: SiteWorker, census: dict, names: list[str]) -> dict:
    """A bundle the centre crafts with one linear radiomics network for each model ``names``."""
    crafted = _combat_bundle(site, census, *site.data.radiomics.columns[:2])
    manifest = json.loads(crafted["manifest"])
    fusion = {**manifest["fusion"], "networks": names}
    manifest |= {"models": names, "main_model": names[0], "fusion": fusion}
    manifest |= {"thresholds": dict.fromkeys(names, 0.5), "harmonisation": {"method": "none"}}
    manifest |= {"clinical_columns": [], "radiomics_features": [site.data.radiomics.columns[0]]}
    arrays = {"radiomics_mean": np.zeros(1), "radiomics_scale": np.ones(1)}
    for name in names:
        arrays[f"fusion/{name}/net.0.weight"] = np.ones((1, 1), dtype=np.float32)
        arrays[f"fusion/{name}/net.0.bias"] = np.zeros(1, dtype=np.float32)
    return {"manifest": json.dumps(manifest), "weights:bundle": arrays}


def test_a_bundle_cannot_make_the_held_out_evaluation_work_without_bound(site) -> None:
    """The attack: ``query.model_bundle`` keeps any bundle, and ``query.bundle_evaluation``
    scored every model its manifest lists with all its networks, and replied two histograms of
    ``bins`` for each: 2,000 models named ``m<i>/radiomics`` (any backbone word made a network
    the site would load), a linear network each, ~137 kB, took 34 s of the site's time and got
    a 32 MB reply (200: 2.2 s, 3.2 MB). A bundle's models are now distinct model keys
    (``wire.MODEL_KEY``) and its networks at most ``max_networks`` (``policy.size``), as a
    request's; the run's own bundle is kept and evaluated."""
    census = ask(site, "query.census")
    many = [f"m{i}/radiomics" for i in range(200)]
    refused(site, "query.model_bundle", "policy.size", **_many_model_bundle(site, census, many))
    twice = ["none/radiomics"] * 200
    refused(site, "query.model_bundle", "policy.size", **_many_model_bundle(site, census, twice))
    members = [f"none/radiomics~{m}" for m in range(300)]  # one model, 300 networks
    request = _many_model_bundle(site, census, ["none/radiomics"])
    manifest = json.loads(request["manifest"])
    manifest["fusion"]["networks"] = members
    arrays = {k: v for k, v in request["weights:bundle"].items() if not k.startswith("fusion/")}
    for name in members:
        arrays[f"fusion/{name}/net.0.weight"] = np.ones((1, 1), dtype=np.float32)
        arrays[f"fusion/{name}/net.0.bias"] = np.zeros(1, dtype=np.float32)
    crowded = {"manifest": json.dumps(manifest), "weights:bundle": arrays}
    refused(site, "query.model_bundle", "policy.size", **crowded)
    ask(site, "query.model_bundle", **_many_model_bundle(site, census, ["none/radiomics"]))
    reply = ask(site, "query.bundle_evaluation", bins=1000)
    assert reply["n"] == 72 and reply["hist_pos:none/radiomics"].shape == (1000,)


def test_undeclared_request_fields_are_refused(site) -> None:
    ask(site, "query.folds", folds=5)
    message = refused(site, "query.moments", "wire.declaration", fold=0, rows=np.array([3]))
    assert "rows: not a declared request field of query.moments" in message
    refused(site, "query.moments", "wire.declaration", fold="0")  # a string for an integer


def test_a_site_that_requires_dp_answers_model_routes_only_under_dp(tmp_path) -> None:
    """Every route computed from model outputs, a held-out site's evaluation of the bundle
    included, needs a run under sample-level DP (the held-out evaluation could not say it was
    one, so a held-out site under DP refused every run's before); and the site must set its
    own budget, since each run's epsilon (and so its noise) is the centre's to pick."""
    with pytest.raises(ConfigError, match="epsilon_budget: required when require_dp"):
        make_site(tmp_path / "no-budget", policy={"require_dp": True})
    worker = make_site(tmp_path, policy={"require_dp": True, "epsilon_budget": 8.0})
    ask(worker, "query.folds", folds=5)
    request = {**fusion_request(worker), "fold": 0, "bins": 100}
    refused(worker, "query.train_scores", "policy.require_dp", dp_mode="off", **request)
    refused(worker, "query.train_scores", "policy.require_dp", dp_mode="client", **request)
    refused(worker, "query.bundle_evaluation", "policy.require_dp", bins=100)
    assert ask(worker, "query.train_scores", dp_mode="sample", **request)["n"] > 0
    # a held-out site under DP evaluates a DP run's bundle; one of more models than a DP run
    # scores (7) is not kept
    census = ask(worker, "query.census")
    keys = ["none/radiomics", "none/clinical", "none/radiomics+clinical", "resnet3d/radiomics"]
    keys += ["resnet3d/clinical", "swin3d/radiomics", "swin3d/clinical", "densenet3d/radiomics"]
    refused(
        worker,
        "query.model_bundle",
        "policy.max_scorings",
        **_many_model_bundle(worker, census, keys),
    )
    ask(worker, "query.model_bundle", **_many_model_bundle(worker, census, keys[:1]))
    reply = ask(worker, "query.bundle_evaluation", bins=100, dp_mode="sample")
    assert reply["n"] == 72 and reply["hist_pos:none/radiomics"].sum() > 0


def _bisect_a_folds_largest_value(worker: SiteWorker, column: int, requests: int) -> list[float]:
    """The attack: a linear network reads radiomics ``column`` alone, standardised by the
    centre at mean t and scale 1e-300 (every value then clipped to +-1e6, the weight of 1 a
    step), so each patient scores 0 or 1 by whether its value passes t; whether any score
    group of fold 0's training rows lies above the lowest of 1000 bins says whether the
    largest value there does. ``query.train_scores`` at each midpoint bisects it, under
    sample-level DP (scores are exact there), until the site refuses; the bounds [low, high]
    it got to."""
    p = worker.data.radiomics.shape[1]
    values = worker.data.radiomics.to_numpy()[:, column]
    low, high = values.mean(), values.mean() + 1e3 * values.std()
    request = {**fusion_request(worker), "fold": 0, "bins": 1000, "dp_mode": "sample"}
    weights = {k: np.zeros_like(v) for k, v in request[wire.WEIGHTS_PREFIX + MAIN].items()}
    weights["net.0.weight"][0, column] = 1.0
    request[wire.WEIGHTS_PREFIX + MAIN] = weights
    for _ in range(requests):
        middle = (low + high) / 2
        request["radiomics_mean"] = np.where(np.arange(p) == column, middle, 0.0)
        request["radiomics_scale"] = np.where(np.arange(p) == column, 1e-300, 1.0)
        try:
            reply = ask(worker, "query.train_scores", **request)
        except PolicyRefused:
            break
        above = (reply[f"hist_pos:{MAIN}"] + reply[f"hist_neg:{MAIN}"])[1:].sum() > 0
        low, high = (middle, high) if above else (low, middle)
    return [low, high]


def test_a_dp_site_answers_a_runs_crafted_scorings_a_few_times_a_fold(tmp_path) -> None:
    """Each reply of a crafted network's scores answers a question of the centre's choosing,
    DP or not: the largest value of a column in a fold is bisected to the last bit in ~60
    replies of one run (a review,
    2026-12-07: with a few hundred more, other columns of the patients so picked out and
    their labels). A site with ``require_dp`` gives a run ``max_scorings`` (2) replies of each
    model-output route a fold, what a DP run asks (once), and no validation."""
    budget = {"require_dp": True, "epsilon_budget": 8.0}
    unbounded = make_site(tmp_path / "unbounded", policy={**budget, "max_scorings": 1000})
    bounded = make_site(tmp_path / "bounded", policy=budget)
    column = 3
    largest = {}
    for worker in (unbounded, bounded):
        ask(worker, "query.folds", folds=5)
        train = np.load(worker.state_root / "attack" / "folds.npz")["fold"] != 0
        largest[worker] = worker.data.radiomics.to_numpy()[train, column].max()
    low, high = _bisect_a_folds_largest_value(unbounded, column, 80)
    assert low <= largest[unbounded] <= high
    assert high - low <= 1e-12 * abs(largest[unbounded])  # found, to the last bits
    values = bounded.data.radiomics.to_numpy()[:, column]
    low, high = _bisect_a_folds_largest_value(bounded, column, 80)
    assert low <= largest[bounded] <= high and high - low >= 100 * values.std()  # two halvings
    entry = audit(bounded)[-1]
    assert (entry["route"], entry["sent"], entry["rule"]) == (
        "query.train_scores",
        False,
        "policy.max_scorings",
    )
    other_fold = {**fusion_request(bounded), "fold": 1, "bins": 100, "dp_mode": "sample"}
    assert ask(bounded, "query.train_scores", **other_fold)["n"] > 0  # counted a fold
    ask(bounded, "query.folds", folds=5, run="next")
    assert ask(bounded, "query.train_scores", **{**other_fold, "run": "next"})["n"] > 0
    refused(bounded, "query.validate", "policy.require_dp", stage="fusion", **other_fold)
    # one reply, many questions: a model per subset of the input groups at most (7), what a
    # DP run's ablations score; 8 models (their keys in another order) are refused
    keys = ["none/radiomics", "none/clinical", "none/radiomics+clinical", "none/clinical+radiomics"]
    keys += ["resnet3d/radiomics", "resnet3d/clinical", "swin3d/radiomics", "swin3d/clinical"]
    many = {**other_fold, "run": "many", "models": keys}
    message = refused(bounded, "query.train_scores", "policy.max_scorings", **many)
    assert "8 models scored in one request" in message
    refused(
        bounded,
        "query.evaluation",
        "policy.max_scorings",
        bins=100,
        dp_mode="sample",
        **{f"thresholds:{key}": np.full(5, 0.5) for key in keys},
    )


def test_a_dp_sites_score_sums_say_no_more_than_its_histogram_grid(tmp_path) -> None:
    """A sum over score groups (Brier, a loss) is an exact float: a group of four patients
    whose scores the centre crafted and one it does not know gives that one's score, and two
    networks a hair apart give the difference of their scores. At a site with ``require_dp``
    each group is placed at the centre of its cell of the ``max_bins`` grid, so the sums of
    two networks whose groups share their cells are equal (they differ at a site without)."""
    sums = {}
    for name, policy in {"dp": {"require_dp": True, "epsilon_budget": 8.0}, "open": {}}.items():
        worker = make_site(tmp_path / name, policy=policy)
        ask(worker, "query.folds", folds=5)
        request = {**fusion_request(worker), "fold": 0, "pos_weight": 2.0, "repeats": 1}
        request.update(seed=0, dp_mode="sample" if policy else "off")
        key = wire.WEIGHTS_PREFIX + MAIN
        apart = {k: v * (1 + 1e-6) for k, v in request[key].items()}
        sums[name] = [
            ask(worker, "query.permutation", **{**request, key: weights})["base_loss_sum"]
            for weights in (request[key], apart)
        ]
    assert sums["dp"][0] == sums["dp"][1]
    assert sums["open"][0] != sums["open"][1]
    groups = ScoreGroups(np.r_[np.ones(5), np.zeros(5)], np.linspace(0.1, 0.2, 10), 5, 1000)
    assert np.allclose(groups.mean * 1000 % 1, 0.5)  # each group at its cell's centre


def test_a_fold_that_is_an_array_is_refused_and_logged(site) -> None:
    """A crafted request's layout can decode its fold or round to a numpy value; the gate
    refuses it and its audit line is written (the log's JSON failed on it before: no line,
    no refusal, no failure counted)."""
    ask(site, "query.folds", folds=5)
    request = {**fusion_request(site), "bins": 100, "dp_mode": "off"}
    for fold in (np.array(0), np.int64(0), np.array([0, 1])):
        refused(site, "query.train_scores", "wire.declaration", **{**request, "fold": fold})
    assert audit(site)[-1]["fold"] == [0, 1]


def test_a_secure_sites_permutation_shuffles_are_its_own(tmp_path) -> None:
    """Permutation importance shuffles each input block across the held-out rows; shuffles the
    centre can replay (from the request's seed and the site id) tell it which patients each
    block's loss change compares, so a crafted network turns every block into a question of
    its choosing. A site with ``randomness = "secure"`` draws them itself: the same request
    gets other answers, none of them the replayable shuffles' (what a seeded site, whose
    shuffles are the public ones, answers: twice the same)."""
    replies = {}
    for randomness in ("seeded", "secure"):
        worker = make_site(tmp_path / randomness, policy={"randomness": randomness})
        ask(worker, "query.folds", folds=5)
        request = {**fusion_request(worker, [8]), "fold": 0, "dp_mode": "off"}
        request.update(pos_weight=2.0, repeats=1, seed=0)
        replies[randomness] = [
            ask(worker, "query.permutation", **request)["loss_increase_sum"] for _ in range(2)
        ]
    public, own = replies["seeded"], replies["secure"]
    assert np.array_equal(public[0], public[1])
    assert not np.allclose(own[0], own[1])
    assert not any(np.allclose(reply, public[0]) for reply in own)


def with_crops(worker: SiteWorker, root: Path, voxels: int = 32) -> SiteWorker:
    """``worker`` given an image crop per patient (random CT and tumour, ``voxels``^3), as an
    extracted image site has (``ct``, ``tumour``, ``ring`` in each crop.npz)."""
    rng = np.random.default_rng(5)
    paths = []
    for patient in worker.data.ids:
        path = root / "crops" / f"{patient}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (voxels,) * 3
        tumour = (rng.random(shape) < 0.1).astype(np.uint8)
        ct = rng.integers(-200, 200, shape).astype(np.int16)
        np.savez_compressed(path, ct=ct, tumour=tumour, ring=1 - tumour)
        paths.append(path)
    worker.data = dataclasses.replace(worker.data, crops=paths)
    return worker


@pytest.mark.slow
def test_a_site_under_dp_releases_no_statistic_of_the_deep_features(tmp_path) -> None:
    """The attack: the deep-feature sums are exact whatever network computed them, so an
    image network the centre crafts can pass one patient's image through them (docs/privacy.md,
    the residual risks). Under sample-level DP (what a site with ``require_dp`` answers in) a
    site keeps its deep features and replies their count alone; without DP it releases the
    sums over the fold's training rows."""
    from fedmets.shared.image_models import build_image_model

    torch.manual_seed(0)
    image = build_image_model(image_config(IMAGE_SETTINGS))
    request = {**IMAGE_SETTINGS, "fold": 0, wire.WEIGHTS_PREFIX + "image": get_state(image)}
    private = make_site(tmp_path / "dp", policy={"require_dp": True, "epsilon_budget": 8.0})
    with_crops(private, tmp_path / "dp")
    ask(private, "query.folds", folds=5)
    refused(private, "query.deep_features", "policy.require_dp", dp_mode="off", **request)
    reply = ask(private, "query.deep_features", dp_mode="sample", **request)
    assert set(reply) == {"n"} and reply["n"] > 50
    kept = private._state({"run": "attack"}) / "deep-fold0.npy"
    assert np.load(kept).shape == (72, image.feature_dim)  # every patient's, kept at the site
    cfg = FederationConfig.model_validate(
        {
            "run": {"name": "attack", "seed": 1},
            "federation": {"min_sites": 1},
            "model": {"backbone": "resnet3d", "image_preset": "cpu-small"},
            "dp": {"mode": "sample", "epsilon": 8.0},
        }
    )
    centre = FederatedProtocol(InProcessLink({"chus": private}), cfg, "attack")
    scaling = centre.deep_statistics(1, request[wire.WEIGHTS_PREFIX + "image"])
    assert set(scaling) == {"deep_mean", "deep_scale"}  # no PCA: the features enter as they are
    assert (scaling["deep_mean"] == 0).all() and (scaling["deep_scale"] == 1).all()
    plain = with_crops(make_site(tmp_path / "plain"), tmp_path / "plain")
    ask(plain, "query.folds", folds=5)
    reply = ask(plain, "query.deep_features", dp_mode="off", **request)
    assert reply["deep_sum"].shape == (image.feature_dim,)  # exact sums without DP
    # ... but never a sum that is not finite (a crafted network's failure on some crops)
    weights = {k: v.copy() for k, v in request[wire.WEIGHTS_PREFIX + "image"].items()}
    weights[next(k for k in weights if k.endswith("weight"))][...] = 3e38  # inf - inf: NaN
    with pytest.raises(RequestFailed, match=r"\(ValueError;"):  # as a score that is not finite
        ask(
            plain,
            "query.deep_features",
            dp_mode="off",
            **request | {wire.WEIGHTS_PREFIX + "image": weights},
        )
    entry = audit(plain)[-1]
    assert (entry["route"], entry["rule"], entry["sent"]) == (
        "query.deep_features",
        "failed",
        False,
    )
    assert entry["problems"] == [f"ValueError: {wire.NOT_FINITE}"]


# ---- DP noise ----------------------------------------------------------------------------------


def _dp_settings(epochs: int = 1) -> dict:
    """A sample-level DP training round's settings (fold 0, round 1, epsilon 8 over 10)."""
    return {
        "fold": 0,
        "round": 1,
        "epochs": epochs,
        "lr": 0.05,
        "batch": 16,
        "weight_decay": 0.0,
        "proximal_mu": 0.0,
        "pos_weight": 1.0,
        "seed": 42,
        "dp_mode": "sample",
        "dp_epsilon": 8.0,
        "dp_releases": 10,
        "max_grad_norm": 1.0,
    }


def _private_training(worker: SiteWorker, weights: dict, epochs: int = 1) -> dict[str, np.ndarray]:
    request = {**weights, **_dp_settings(epochs)}
    return ask(worker, "train.fusion", **request)[wire.WEIGHTS_PREFIX + "none/radiomics+clinical"]


def _differ(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_the_centre_cannot_replay_a_secure_sites_dp_noise(tmp_path) -> None:
    """The attack: DP-SGD's noise and sampling seeded from values the centre chose (the
    request's seed, the site id, the fold) can be replayed and subtracted. A site with
    ``randomness = "secure"`` draws them from the OS; the same request twice gives other noise.
    A seeded site (simulations only) gives the same noise twice: replayable."""
    secure = make_site(tmp_path / "a", policy={"randomness": "secure"})
    ask(secure, "query.folds", folds=5)
    request = fusion_request(secure)  # the same request, weights included, twice
    assert _differ(_private_training(secure, request), _private_training(secure, request)) > 1e-4
    seeded = make_site(tmp_path / "b")
    ask(seeded, "query.folds", folds=5)
    again = _differ(_private_training(seeded, request), _private_training(seeded, request))
    assert again == 0.0


def test_a_secure_sites_dp_noise_is_not_found_by_its_seeds_low_32_bits(
    tmp_path, monkeypatch
) -> None:
    """The attack: torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so a
    secure site's 63-bit draw left the centre 2^32 seeds to try (~4 us each in torch: ~5 h on
    one core) to replay DP-SGD's noise. The centre sends a linear network whose radiomics
    inputs are 0 (scale 1e300: their weights' gradients are the noise alone), a batch of all
    the fit rows (q = 1, one step) and a clipping norm of 1e-9 (Adam's first step then linear in
    the noisy gradient: inverted exactly); the seed whose noise fits those weights gives the
    rest of the noise, and the reply minus it is the un-noised sum of clipped gradients. Here
    the site's draws are made to fall in 2^10 low values (high bits random): the search the
    test can afford. The site seeds the generators with every bit of its draw."""
    from fedmets.client import policy as site_policy
    from fedmets.client.privacy import plan_site_noise

    worker = make_site(tmp_path, policy={"randomness": "secure"})
    ask(worker, "query.folds", folds=5)
    p = worker.data.radiomics.shape[1]
    key = wire.WEIGHTS_PREFIX + "none/radiomics+clinical"
    crafted = fusion_request(worker)
    crafted["radiomics_scale"] = np.full(p, 1e300)
    crafted[key] = {k: np.zeros_like(v) for k, v in crafted[key].items()}
    lr, clip, tried = 0.1, 1e-9, 2**10
    draws = np.random.default_rng(0)
    monkeypatch.setattr(
        site_policy.secrets,
        "randbits",
        lambda bits: (int(draws.integers(2**31)) << 32) | int(draws.integers(tried)),
    )
    recovered = []
    for _ in range(2):  # two trainings, two secret draws
        settings = {"epochs": 1, "lr": lr, "batch": 1000, "max_grad_norm": clip}
        reply = ask(worker, "train.fusion", **{**_dp_settings(), **crafted, **settings})
        u = np.concatenate([reply[key]["net.0.weight"].ravel(), reply[key]["net.0.bias"]])
        u = u.astype(np.float64)
        n = reply["n"]
        summed = -np.sign(u) * 1e-8 * np.abs(u) / (lr - np.abs(u)) * n  # Adam's step inverted
        z = plan_site_noise(8.0, 1e-5, n, 1000, 1, 10)  # the site's plan, the centre's to redo
        for seed in range(tried):
            generator = torch.Generator().manual_seed(seed + 1)
            shapes = [(1, len(u) - 1), (1,)]  # Opacus' noise, parameter by parameter
            noise = torch.cat(
                [torch.normal(0, z * clip, s, generator=generator).ravel() for s in shapes]
            )
            noise = noise.double().numpy()
            if np.allclose(noise[:p], summed[:p], rtol=1e-3, atol=0):
                recovered.append(summed - noise)  # the clipped gradients' sum, noise removed
                break
    assert not recovered, "the centre replayed the site's DP noise"


def test_trainings_at_once_cannot_spend_the_budget_twice(tmp_path) -> None:
    """The attack: a batch of two DP trainings (folds at once, answered by two of the site's
    lanes), each of which fits the site's remaining budget alone but not both: checked at the
    same moment, both would pass and train. The site holds its budget from a training's check
    to its record, so the second waits, then finds the first recorded and is refused."""
    scratch = make_site(tmp_path / "scratch")
    ask(scratch, "query.folds", folds=5)
    request = fusion_request(scratch)
    _private_training(scratch, request, epochs=20)  # long enough for both checks to overlap
    ledger = scratch.ledger()
    once, twice = ledger.epsilon(), ledger.epsilon(planned=ledger.history())
    budget = (once + twice) / 2  # one training fits, two do not
    worker = make_site(tmp_path / "site", policy={"epsilon_budget": budget})
    ask(worker, "query.folds", folds=5)
    lanes = [SiteWorker(worker.configs) for _ in range(2)]  # two processes' workers, one site
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def train(lane: SiteWorker) -> None:
        start.wait()
        try:
            _private_training(lane, request, epochs=20)
            outcomes.append("trained")
        except PrivacyBudgetExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=train, args=(lane,)) for lane in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(outcomes) == ["refused", "trained"]
    assert worker.ledger().epsilon() <= budget
    # the hospital reads the refusal in its audit log, as it reads a policy rule's
    (entry,) = [e for e in audit(worker) if e["route"] == "train.fusion" and not e["sent"]]
    assert entry["rule"] == BUDGET_RULE and "budget" in entry["problems"][0]


def test_a_secure_sites_folds_do_not_follow_its_config_seed(tmp_path) -> None:
    folds = []
    for name in ("one", "two"):
        worker = make_site(tmp_path / name, policy={"randomness": "secure"})
        ask(worker, "query.folds", folds=5)
        folds.append(np.load(worker.state_root / "attack" / "folds.npz")["fold"])
        census = ask(worker, "query.census", protocol=wire.PROTOCOL_VERSION)
        assert census["randomness"] == "secure"
    assert not np.array_equal(*folds)  # same cohort, same config seed, other folds


def test_the_audit_holds_each_requests_settings(site) -> None:
    ask(site, "query.folds", folds=5)
    request = fusion_request(site)
    ask(site, "query.train_scores", bins=100, fold=1, dp_mode="off", **request)
    entry = audit(site)[-1]
    assert entry["request"]["bins"] == 100 and entry["request"]["fold"] == 1
    weights = entry["request"]["weights:none/radiomics+clinical"]
    assert set(weights) == {"values", "sha256"} and len(weights["sha256"]) == 64
    assert entry["request"]["radiomics_mean"] == {"shape": [12], "dtype": "float64"}
    assert set(encoded_columns()) >= set(site.data.clinical.columns)


def test_a_pooled_baseline_keeps_each_secure_sites_folds(tmp_path) -> None:
    """The simulation's centralised baseline pools the sites in one worker with its own state:
    it must still see each site's own folds (drawn once from the OS and kept by the site)."""
    site = make_site(tmp_path / "a", policy={"randomness": "secure"})
    ask(site, "query.folds", folds=5)
    own = np.load(site.state_root / "attack" / "folds.npz")["fold"]
    pooled = SiteWorker(
        site.configs, state_root=tmp_path / "pooled", ledger_root=tmp_path / "pooled"
    )
    ask(pooled, "query.folds", folds=5)
    assert np.array_equal(np.load(tmp_path / "pooled" / "attack" / "folds.npz")["fold"], own)


# ---- requests at once --------------------------------------------------------------------------


def _admit_many(folder: str, start: int, families: int, ready) -> None:
    """In a child process: admit one set of patients for each of ``families`` statistics."""
    guard = DifferencingGuard(Path(folder), FLOOR)
    ready.wait()
    for family in range(start, start + families):
        assert guard.admit_together([np.arange(20)], {f"stat{family}"}) is None


def test_requests_at_once_leave_no_release_unrecorded(tmp_path) -> None:
    """Folds run in parallel (or a centre sending requests at once) make processes of one site
    admit releases together. Each read-check-write of the released sets holds the file's lock,
    so none overwrites another's record: a release left out of it could later be differenced
    against unchecked."""
    fork = multiprocessing.get_context("fork")  # no re-import: quick
    ready = fork.Barrier(2)  # both children at the start line before either records
    children = [
        fork.Process(target=_admit_many, args=(str(tmp_path), start, 40, ready))
        for start in (0, 40)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    known = json.loads((tmp_path / "released-sets.json").read_text())
    assert set(known) == {f"stat{family}" for family in range(80)}


def _admit_twenty(folder: str, started) -> None:
    """In a child process: exit 0 when patients 0-19 may be released on, 3 when refused."""
    guard = DifferencingGuard(Path(folder), FLOOR)
    started.set()
    raise SystemExit(3 if guard.admit_together([np.arange(20)], {"stat0"}) else 0)


def test_a_release_waits_for_the_one_under_way(tmp_path) -> None:
    """While one release holds the record, another one's check waits for it (and then sees it),
    so two sets one patient apart cannot both pass the check at the same moment."""
    guard = DifferencingGuard(tmp_path, FLOOR)
    fork = multiprocessing.get_context("fork")  # no re-import: quick
    started = fork.Event()
    with exclusive(guard.path):  # a release under way: its check and record inside the lock
        child = fork.Process(target=_admit_twenty, args=(str(tmp_path), started))
        child.start()
        assert started.wait(60)
        child.join(1.0)
        assert child.is_alive()  # its check waits for the lock
        assert guard._admit_together([np.arange(19)], {"stat0"}) is None
    child.join(60)
    assert child.exitcode == 3  # then it saw that release: one patient apart, refused
