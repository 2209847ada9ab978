"""Binary-classification metrics for DM prediction, on raw scores and from score histograms.

Scores are predicted probabilities of DM in [0, 1]; labels are 0/1 (1 = DM). A patient is
predicted positive when ``score >= threshold`` (scikit-learn's ``roc_curve`` convention). Pick
the threshold on training scores (:func:`youden_from_histograms`) and apply it to test scores.

Metrics that need both classes (AUC; sensitivity needs positives, specificity negatives) are
``None`` on a subset that lacks them, with ``auc_note`` saying why, so per-site or per-fold
evaluation of a small subset never fails.

The federated protocol pools evaluation without sharing scores: each site sends
:func:`score_histograms` (counts per class over fixed bins on [0, 1]), the server adds them and
calls :func:`metrics_from_histograms` (and :func:`roc_from_histograms` for the curve).

Two models scored on the same patients are compared with :func:`delong_paired_test` (the
difference of their AUCs, its interval and p value, from DeLong's paired variance).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

ArrayLike = np.ndarray | list[float] | list[int]


def _binary_inputs(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(n,) int 0/1 labels and (n,) float scores, or a ValueError."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or y.shape != s.shape or y.size == 0:
        raise ValueError(f"y_true and scores must be equal-length 1-D, got {y.shape}, {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must be 0/1, got values {np.unique(y).tolist()}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(int), s


def _single_class_note(y: np.ndarray) -> str | None:
    """Why an AUC cannot be computed on labels ``y``, or None when it can."""
    positives = int(y.sum())
    if positives in (0, y.size):
        return f"AUC undefined: only {'positives' if positives else 'negatives'} ({y.size})"
    return None


def _structural_components(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components by the fast midrank algorithm (Sun & Xu, IEEE
    SPL 2014): per positive (m,) the share of negatives scored below it, per negative (n,) the
    share of positives scored above it (ties count half); needs >= 2 patients of each class."""
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs >= 2 positives and >= 2 negatives, got {m} and {n}")
    tz = rankdata(np.concatenate([pos, neg]))  # midranks: ties count half
    tx, ty = rankdata(pos), rankdata(neg)
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    return float(auc), (tz[:m] - tx) / n, 1.0 - (tz[m:] - ty) / m


def delong_auc_variance(y_true: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """AUC and its DeLong variance; needs at least 2 patients of each class."""
    y, s = _binary_inputs(y_true, scores)
    auc, v10, v01 = _structural_components(y, s)
    return auc, float(v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size)


def delong_paired_test(
    y_true: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike, level: float = 0.95
) -> dict[str, Any]:
    """DeLong's test of two correlated AUCs (two models scored on the same patients): the
    difference ``auc_difference`` = AUC(a) - AUC(b), its two-sided ``level`` interval ``ci``
    (not clipped) and the two-sided ``p`` value of "no difference" (1.0 when the two score
    the patients identically); needs >= 2 patients of each class."""
    y, a = _binary_inputs(y_true, scores_a)
    _, b = _binary_inputs(y_true, scores_b)
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b differ in shape: {a.shape} vs {b.shape}")
    auc_a, v10_a, v01_a = _structural_components(y, a)
    auc_b, v10_b, v01_b = _structural_components(y, b)
    difference = auc_a - auc_b
    variance = float(
        (v10_a - v10_b).var(ddof=1) / v10_a.size + (v01_a - v01_b).var(ddof=1) / v01_a.size
    )
    sd = np.sqrt(max(variance, 0.0))
    half = norm.ppf(0.5 + level / 2) * sd
    p = float(2 * norm.sf(abs(difference) / sd)) if sd > 0 else float(difference == 0)
    return {
        "auc_difference": float(difference),
        "ci": (float(difference - half), float(difference + half)),
        "p": p,
    }


def binary_metrics(
    y_true: ArrayLike, scores: ArrayLike, threshold: float, level: float = 0.95
) -> dict[str, Any]:
    """Metrics of probabilities ``scores`` (n,) against labels ``y_true`` (n,):

    ``n``, ``positives``; ``auc`` with ``auc_ci`` (two-sided ``level`` DeLong interval,
    clipped to [0, 1]; None under 2 patients of a class) and ``auc_note`` (why either is None);
    at ``threshold``: ``acc``, ``sen`` (None without positives), ``spe`` (None without
    negatives); ``brier`` (mean squared error of the probabilities)."""
    y, s = _binary_inputs(y_true, scores)
    positives = int(y.sum())
    tn, fp, fn, tp = confusion_matrix(y, (s >= threshold).astype(int), labels=[0, 1]).ravel()
    result: dict[str, Any] = {
        "n": int(y.size),
        "positives": positives,
        "auc": None,
        "auc_ci": None,
        "auc_note": _single_class_note(y),
        "threshold": float(threshold),
        "acc": float((tp + tn) / y.size),
        "sen": float(tp / (tp + fn)) if positives else None,
        "spe": float(tn / (tn + fp)) if positives < y.size else None,
        "brier": float(brier_score_loss(y, s, labels=[0, 1])),
    }
    if result["auc_note"] is None:
        result["auc"] = float(roc_auc_score(y, s))
        if min(positives, y.size - positives) < 2:
            result["auc_note"] = "AUC interval undefined: fewer than 2 patients of a class"
        else:
            auc, variance = delong_auc_variance(y, s)
            half = norm.ppf(0.5 + level / 2) * np.sqrt(variance)
            result["auc_ci"] = (float(max(0.0, auc - half)), float(min(1.0, auc + half)))
    return result


def calibration(y_true: ArrayLike, prob: ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """Reliability curve over ``n_bins`` equal-width bins on [0, 1] (scikit-learn's
    ``calibration_curve``; bin i holds (e_i, e_i+1], the first also 0): per non-empty bin the
    observed DM rate ``prob_true``, the mean probability ``prob_pred`` and the patient count
    ``counts``; ``edges`` (n_bins + 1,)."""
    y, p = _binary_inputs(y_true, prob)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    return {
        "prob_true": prob_true,
        "prob_pred": prob_pred,
        "counts": counts[counts > 0],
        "edges": edges,
    }


class ScoreHistograms(NamedTuple):
    """Per-class counts of scores over fixed bins: ``pos_counts``, ``neg_counts`` (bins,) int;
    ``edges`` (bins + 1,) from 0 to 1. Bin i holds [e_i, e_i+1), the last also 1."""

    pos_counts: np.ndarray
    neg_counts: np.ndarray
    edges: np.ndarray


def score_histograms(
    y_true: ArrayLike, scores: ArrayLike, bins: int | ArrayLike = 1000
) -> ScoreHistograms:
    """Histogram ``scores`` in [0, 1] per class over ``bins`` equal-width bins (or the given
    increasing edges from 0 to 1). Counts from several sites with the same edges add up to the
    pooled counts."""
    y, s = _binary_inputs(y_true, scores)
    if s.min() < 0 or s.max() > 1:
        raise ValueError("scores must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1) if np.isscalar(bins) else np.asarray(bins, float)
    if edges[0] != 0 or edges[-1] != 1 or np.any(np.diff(edges) <= 0):
        raise ValueError("bin edges must increase from 0 to 1")
    pos_counts, _ = np.histogram(s[y == 1], bins=edges)
    neg_counts, _ = np.histogram(s[y == 0], bins=edges)
    return ScoreHistograms(pos_counts, neg_counts, edges)


def metrics_from_histograms(
    pos_counts: ArrayLike, neg_counts: ArrayLike, edges: ArrayLike, threshold: float
) -> dict[str, Any]:
    """``auc``, ``acc``, ``sen``, ``spe`` (None where undefined, ``auc_note`` why) from
    per-class score counts over bins ``edges``.

    AUC is the Mann-Whitney probability that a positive outscores a negative, a pair in the
    same bin counting half; it approaches the exact AUC as bins narrow. At ``threshold`` the
    bins from the edge nearest to it upwards count as positive (``threshold_used``): exact for
    a threshold on a bin edge, otherwise off by under one bin width."""
    pos = np.asarray(pos_counts, dtype=float)
    neg = np.asarray(neg_counts, dtype=float)
    edges = np.asarray(edges, dtype=float)
    if pos.shape != neg.shape or edges.shape != (pos.size + 1,):
        raise ValueError(
            f"need bins counts per class and bins + 1 edges, got "
            f"{pos.shape}, {neg.shape}, {edges.shape}"
        )
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos + n_neg == 0:
        raise ValueError("the histograms are empty")
    first = int(np.argmin(np.abs(edges[:-1] - threshold)))
    tp, fp = pos[first:].sum(), neg[first:].sum()
    auc, note = None, None
    if n_pos and n_neg:
        below = np.cumsum(neg) - neg  # negatives in lower bins
        auc = float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))
    else:
        note = f"AUC undefined: only {'positives' if n_pos else 'negatives'}"
    return {
        "n": int(n_pos + n_neg),
        "positives": int(n_pos),
        "auc": auc,
        "auc_note": note,
        "threshold_used": float(edges[first]),
        "acc": float((tp + n_neg - fp) / (n_pos + n_neg)),
        "sen": float(tp / n_pos) if n_pos else None,
        "spe": float((n_neg - fp) / n_neg) if n_neg else None,
    }


def youden_from_histograms(pos_counts: ArrayLike, neg_counts: ArrayLike, edges: ArrayLike) -> float:
    """The bin edge maximising Youden's J when every bin from it upwards counts as positive
    (the highest such edge on ties): Youden's threshold on the scores' histograms, exact on
    the edges. Needs both classes."""
    pos = np.asarray(pos_counts, dtype=float)
    neg = np.asarray(neg_counts, dtype=float)
    if not pos.sum() or not neg.sum():
        raise ValueError("youden_from_histograms needs both classes")
    tpr = pos[::-1].cumsum()[::-1] / pos.sum()  # share of positives in bins >= i
    fpr = neg[::-1].cumsum()[::-1] / neg.sum()
    j = tpr - fpr
    best = len(j) - 1 - int(np.argmax(j[::-1]))
    return float(np.asarray(edges, dtype=float)[best])


def auc_ci_from_histograms(
    pos_counts: ArrayLike, neg_counts: ArrayLike, level: float = 0.95
) -> tuple[float, float] | None:
    """Two-sided ``level`` DeLong interval of the histogram AUC (clipped to [0, 1]); every
    patient of a bin has the same placement value, so DeLong's structural components follow
    from the counts. None under 2 patients of a class."""
    pos = np.asarray(pos_counts, dtype=float)
    neg = np.asarray(neg_counts, dtype=float)
    m, n = pos.sum(), neg.sum()
    if m < 2 or n < 2:
        return None
    v10 = (np.cumsum(neg) - neg + 0.5 * neg) / n  # per bin: share of negatives below a positive
    v01 = 1.0 - (np.cumsum(pos) - 0.5 * pos) / m  # per bin: share of positives above a negative
    auc = float((pos * v10).sum() / m)
    var10 = (pos * (v10 - auc) ** 2).sum() / (m - 1)
    var01 = (neg * (v01 - auc) ** 2).sum() / (n - 1)
    half = norm.ppf(0.5 + level / 2) * np.sqrt(var10 / m + var01 / n)
    return float(max(0.0, auc - half)), float(min(1.0, auc + half))


class RocCurve(NamedTuple):
    """ROC points ``fpr``, ``tpr`` (points,) float, non-decreasing from (0, 0) to (1, 1), and
    ``area`` under the full-resolution curve."""

    fpr: np.ndarray
    tpr: np.ndarray
    area: float


def roc_from_histograms(
    pos_counts: ArrayLike, neg_counts: ArrayLike, max_points: int = 150
) -> RocCurve:
    """ROC curve of per-class score counts (bins,) over the same bins: one point per bin edge
    used as threshold (every bin from it upwards positive), from the top edge (0, 0) to the
    bottom one (1, 1). Patients of one bin are tied, so the curve crosses a bin on a straight
    segment and ``area`` (trapezoids) equals the histogram AUC of
    :func:`metrics_from_histograms`.

    Points only: empty bins and points on a straight line between their neighbours are dropped
    (lossless); if more than ``max_points`` remain, only the first point at or past each of
    ``max_points`` positions evenly spaced along the curve's length is kept, (0, 0) and (1, 1)
    always. Needs both classes."""
    pos = np.asarray(pos_counts, dtype=float)[::-1]  # top bin first
    neg = np.asarray(neg_counts, dtype=float)[::-1]
    if pos.ndim != 1 or pos.shape != neg.shape:
        raise ValueError(f"need equal-length 1-D counts per class, got {pos.shape}, {neg.shape}")
    if not pos.sum() or not neg.sum():
        raise ValueError("roc_from_histograms needs both classes")
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])  # point k: the top k bins positive
    fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
    area = float(np.trapezoid(tpr, fpr))
    steps = np.flatnonzero(pos + neg)  # bin j leads from point j to point j + 1
    turns = pos[steps[:-1]] * neg[steps[1:]] != pos[steps[1:]] * neg[steps[:-1]]
    keep = np.concatenate([[0], steps[:-1][turns] + 1, [steps[-1] + 1]])
    if keep.size > max_points:
        length = np.concatenate([[0.0], np.hypot(np.diff(fpr[keep]), np.diff(tpr[keep])).cumsum()])
        keep = keep[np.unique(np.searchsorted(length, np.linspace(0.0, length[-1], max_points)))]
    return RocCurve(fpr[keep], tpr[keep], area)


def calibration_from_histograms(
    pos_counts: ArrayLike, neg_counts: ArrayLike, edges: ArrayLike, n_bins: int = 10
) -> dict[str, list[float]]:
    """Reliability curve from fine per-class histograms, merged into ``n_bins`` equal-width
    bins: per non-empty bin the observed DM rate ``prob_true``, the mean of the fine bins'
    centres ``prob_pred`` (within half a fine bin of the true mean) and ``counts``."""
    pos = np.asarray(pos_counts, dtype=float)
    neg = np.asarray(neg_counts, dtype=float)
    edges = np.asarray(edges, dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    coarse = np.minimum((centres * n_bins).astype(int), n_bins - 1)
    total = np.bincount(coarse, pos + neg, n_bins)
    positives = np.bincount(coarse, pos, n_bins)
    weighted = np.bincount(coarse, (pos + neg) * centres, n_bins)
    keep = total > 0
    return {
        "prob_true": (positives[keep] / total[keep]).tolist(),
        "prob_pred": (weighted[keep] / total[keep]).tolist(),
        "counts": total[keep].astype(int).tolist(),
    }


def logit(p: ArrayLike) -> np.ndarray:
    """Log-odds of probabilities ``p`` (clipped to [1e-7, 1 - 1e-7], as the scores are fused)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def calibration_slope_intercept(
    y_true: ArrayLike, prob: ArrayLike, weights: ArrayLike | None = None
) -> tuple[float, float] | None:
    """Calibration slope and intercept of probabilities ``prob`` (n,) against 0/1 ``y_true``:
    the coefficients of a logistic regression of the labels on logit(prob) (probabilities
    clipped to [1e-7, 1 - 1e-7]), each row counted ``weights`` (n,) times (default once); a
    perfectly calibrated model has slope 1 and intercept 0. None with one class (weighted)."""
    from sklearn.linear_model import LogisticRegression

    y, p = _binary_inputs(y_true, prob)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    keep = w > 0
    y, p, w = y[keep], p[keep], w[keep]
    if y.size == 0 or _single_class_note(y) is not None:
        return None
    p = np.clip(p, 1e-7, 1 - 1e-7)
    fit = LogisticRegression(C=np.inf).fit(np.log(p / (1 - p))[:, None], y, sample_weight=w)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])
