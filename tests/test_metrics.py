import numpy as np
import pytest
from scipy.stats import bootstrap, rankdata
from sklearn.metrics import accuracy_score, brier_score_loss, recall_score, roc_auc_score, roc_curve

from fedmets.shared.metrics import (
    binary_metrics,
    calibration,
    delong_auc_variance,
    delong_paired_test,
    metrics_from_histograms,
    roc_from_histograms,
    score_histograms,
)


def _cohort(n: int, seed: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels (about 30% positive) and probabilities separated by ``shift`` logits."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, 1.0 / (1.0 + np.exp(-(shift * y + rng.normal(size=n) - 0.8)))


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.7, 0.8], 1.0),  # perfect separation
        ([0.8, 0.7, 0.6, 0.2, 0.1], 0.0),  # reversed
        ([0.5] * 5, 0.5),  # all tied
        ([0.2, 0.4, 0.6, 0.4, 0.8], 0.75),  # 4.5 of 6 pairs, one tie counted half
    ],
)
def test_auc_by_hand(scores: list[float], expected: float) -> None:
    y = [0, 0, 0, 1, 1]
    assert binary_metrics(y, scores, 0.5)["auc"] == pytest.approx(expected)
    assert delong_auc_variance(y, scores)[0] == pytest.approx(expected)
    hist = score_histograms(y, scores, bins=10)
    assert metrics_from_histograms(*hist, 0.5)["auc"] == pytest.approx(expected)


def _auc(y: np.ndarray, scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """The AUC of each row of ``scores`` against the row's labels ``y`` (Mann-Whitney: the
    positives' mean rank, ties at their average rank, as roc_auc_score counts a tie half):
    every bootstrap resample at once."""
    y, ranks = np.moveaxis(y, axis, -1), rankdata(np.moveaxis(scores, axis, -1), axis=-1)
    positives, n = y.sum(-1), y.shape[-1]
    return ((ranks * y).sum(-1) - positives * (positives + 1) / 2) / (positives * (n - positives))


def _auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return _auc(y, a, axis) - _auc(y, b, axis)


def _assert_like_the_paired_bootstrap(interval, statistic, samples, seed: int) -> None:
    """``interval`` (lo, hi) holds the centre of the 2000-resample percentile bootstrap
    interval of ``statistic`` (vectorised over resamples) over the paired ``samples`` and is
    within 30% of its width."""
    boot = bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=2000,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    (lo, hi), (b_lo, b_hi) = interval, boot.confidence_interval
    assert lo < (b_lo + b_hi) / 2 < hi
    assert abs((hi - lo) / (b_hi - b_lo) - 1) < 0.3


def test_delong_matches_sklearn_auc_with_ties_and_the_bootstrap_interval() -> None:
    y, s = _cohort(400, seed=1)
    rounded = np.round(s, 1)  # many ties
    assert delong_auc_variance(y, rounded)[0] == pytest.approx(roc_auc_score(y, rounded))
    assert _auc(y, rounded) == pytest.approx(roc_auc_score(y, rounded))  # the bootstrap's
    interval = binary_metrics(y, s, 0.5)["auc_ci"]
    _assert_like_the_paired_bootstrap(interval, _auc, (y, s), seed=2)


def test_paired_delong_matches_the_paired_bootstrap_and_tells_models_apart() -> None:
    """Two models on the same patients sharing most of their noise: the paired interval of the
    AUC difference matches a paired bootstrap's, is far narrower than two unpaired intervals
    would suggest, and a weaker model is told apart (p < 0.01) while a model against itself
    gives difference 0, p 1."""
    rng = np.random.default_rng(5)
    y = (rng.random(500) < 0.3).astype(int)
    shared_noise = rng.normal(size=500)
    strong = 1.2 * y + shared_noise + 0.3 * rng.normal(size=500)
    weak = 0.9 * y + shared_noise + 0.3 * rng.normal(size=500)
    test = delong_paired_test(y, strong, weak)
    expected = roc_auc_score(y, strong) - roc_auc_score(y, weak)
    assert test["auc_difference"] == pytest.approx(expected)
    lo, hi = test["ci"]
    _assert_like_the_paired_bootstrap((lo, hi), _auc_difference, (y, strong, weak), seed=6)
    unpaired = sum(np.sqrt(delong_auc_variance(y, s)[1]) for s in (strong, weak))
    assert hi - lo < 0.5 * 2 * 1.96 * unpaired
    assert 0 < test["p"] < 0.01
    reverse = delong_paired_test(y, weak, strong)
    assert reverse["auc_difference"] == pytest.approx(-expected)
    assert reverse["p"] == pytest.approx(test["p"])
    assert delong_paired_test(y, weak, weak) == {"auc_difference": 0.0, "ci": (0.0, 0.0), "p": 1.0}


def test_delong_interval_narrows_with_more_patients() -> None:
    small = binary_metrics(*_cohort(100, seed=3), 0.5)["auc_ci"]
    large = binary_metrics(*_cohort(1600, seed=3), 0.5)["auc_ci"]
    assert large[1] - large[0] < 0.5 * (small[1] - small[0])


def test_threshold_metrics_match_sklearn() -> None:
    y, s = _cohort(300, seed=4)
    for threshold in (0.2, 0.45, float(s[7])):  # s[7] itself: a score on the threshold
        pred = (s >= threshold).astype(int)
        got = binary_metrics(y, s, threshold)
        assert got["acc"] == pytest.approx(accuracy_score(y, pred))
        assert got["sen"] == pytest.approx(recall_score(y, pred, pos_label=1))
        assert got["spe"] == pytest.approx(recall_score(y, pred, pos_label=0))
    got = binary_metrics(y, s, 0.5)
    assert got["brier"] == pytest.approx(brier_score_loss(y, s))
    assert got["brier"] == pytest.approx(np.mean((s - y) ** 2))
    assert (got["n"], got["positives"]) == (300, int(y.sum()))


def test_single_class_subset_is_handled() -> None:
    only_neg = binary_metrics([0, 0, 0], [0.1, 0.6, 0.3], 0.5)
    assert only_neg["auc"] is None and only_neg["auc_ci"] is None
    assert "only negatives" in only_neg["auc_note"]
    assert only_neg["sen"] is None and only_neg["spe"] == pytest.approx(2 / 3)
    only_pos = binary_metrics([1, 1], [0.9, 0.2], 0.5)
    assert only_pos["auc"] is None and only_pos["spe"] is None and only_pos["sen"] == 0.5
    one_pos = binary_metrics([0, 0, 1], [0.1, 0.2, 0.9], 0.5)
    assert one_pos["auc"] == 1.0 and one_pos["auc_ci"] is None and one_pos["auc_note"]
    hist = metrics_from_histograms(*score_histograms([1, 1], [0.9, 0.2], 10), 0.5)
    assert hist["auc"] is None and hist["spe"] is None and hist["sen"] == 0.5
    calib = calibration([0, 0, 0], [0.1, 0.6, 0.3], n_bins=5)
    assert calib["prob_true"].tolist() == [0.0, 0.0, 0.0]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="0/1"):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="equal-length"):
        binary_metrics([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_histograms([0, 1], [0.1, 1.2], 10)


def test_calibration_counts_follow_sklearn_bins() -> None:
    y, s = _cohort(500, seed=6)
    s[:9] = np.linspace(0.1, 0.9, 9)  # scores on bin edges
    got = calibration(y, s, n_bins=10)
    assert got["counts"].sum() == 500
    assert got["counts"].shape == got["prob_true"].shape == got["prob_pred"].shape
    assert (got["prob_pred"] * got["counts"]).sum() == pytest.approx(s.sum())
    assert (got["prob_true"] * got["counts"]).sum() == pytest.approx(y.sum())


def test_histogram_auc_matches_exact_auc_at_fine_bins() -> None:
    for seed in range(5):
        y, s = _cohort(2000, seed=10 + seed, shift=0.5 + seed / 2)
        hist = score_histograms(y, s, bins=10_000)
        got = metrics_from_histograms(*hist, threshold=0.5)
        assert got["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-3)


def test_site_histograms_add_up_to_the_pooled_one_and_give_the_pooled_metrics() -> None:
    y, s = _cohort(900, seed=7)
    sites = np.random.default_rng(8).integers(0, 3, y.size)
    parts = [score_histograms(y[sites == k], s[sites == k], bins=100) for k in range(3)]
    pooled = score_histograms(y, s, bins=100)
    np.testing.assert_array_equal(sum(p.pos_counts for p in parts), pooled.pos_counts)
    np.testing.assert_array_equal(sum(p.neg_counts for p in parts), pooled.neg_counts)
    threshold = pooled.edges[37]  # a threshold on a bin edge: exact threshold metrics
    got = metrics_from_histograms(pooled.pos_counts, pooled.neg_counts, pooled.edges, threshold)
    exact = binary_metrics(y, s, threshold)
    assert got["threshold_used"] == threshold
    for key in ("acc", "sen", "spe", "n", "positives"):
        assert got[key] == pytest.approx(exact[key])
    off_edge = metrics_from_histograms(*pooled, threshold + 0.004)
    assert off_edge["threshold_used"] == threshold


def test_histogram_roc_by_hand() -> None:
    """Negatives at 0.2, 0.4, 0.6 and positives at 0.4, 0.8: the tie at 0.4 is a diagonal."""
    hist = score_histograms([0, 0, 0, 1, 1], [0.2, 0.4, 0.6, 0.4, 0.8], bins=10)
    fpr, tpr, area = roc_from_histograms(hist.pos_counts, hist.neg_counts)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert area == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both classes"):
        roc_from_histograms([0, 2, 0], [0, 0, 0])


def test_histogram_roc_points_lie_on_the_exact_roc_of_bin_centred_scores() -> None:
    """Scores at bin centres (ties within a bin are real ties): every lossless histogram point
    is a point of scikit-learn's ROC, and the area is its AUC."""
    y, s = _cohort(300, seed=3)
    centred = (np.floor(s * 50) + 0.5) / 50
    hist = score_histograms(y, centred, bins=50)
    fpr, tpr, area = roc_from_histograms(hist.pos_counts, hist.neg_counts, max_points=10**6)
    exact_fpr, exact_tpr, _ = roc_curve(y, centred, drop_intermediate=False)
    exact = set(zip(np.round(exact_fpr, 12), np.round(exact_tpr, 12), strict=True))
    assert set(zip(np.round(fpr, 12), np.round(tpr, 12), strict=True)) <= exact
    assert area == pytest.approx(roc_auc_score(y, centred), abs=1e-12)


def test_histogram_roc_area_is_the_histogram_auc_and_its_points_are_decimated() -> None:
    for seed in range(3):
        y, s = _cohort(5000, seed=20 + seed, shift=0.5 + seed)
        hist = score_histograms(y, s, bins=10_000)
        full = roc_from_histograms(hist.pos_counts, hist.neg_counts, max_points=10**6)
        fpr, tpr, area = roc_from_histograms(hist.pos_counts, hist.neg_counts, max_points=120)
        assert area == full.area
        assert area == pytest.approx(metrics_from_histograms(*hist, 0.5)["auc"], abs=1e-12)
        assert area == pytest.approx(roc_auc_score(y, s), abs=1e-3)
        assert full.fpr.size > 120 >= fpr.size > 50  # straight stretches need no points
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
        vertices = set(zip(full.fpr, full.tpr, strict=True))
        assert set(zip(fpr, tpr, strict=True)) <= vertices  # a subset of the curve's corners
        assert np.trapezoid(tpr, fpr) == pytest.approx(area, abs=2e-3)  # the shape is kept
