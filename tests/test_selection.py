import copy

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from fedmets.shared.selection import (
    RadiomicsSelector,
    correlation_filter,
    correlation_from_sums,
    rank_by_importance,
    rank_by_label_correlation,
)


def _planted(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """10 informative columns ``inf_i``, 100 noise ``noise_i``, a near-copy ``dup_i`` (r > 0.99)
    of each informative one placed after it, and a constant; labels from the informative ones."""
    rng = np.random.default_rng(seed)
    informative = rng.normal(size=(n, 10))
    logit = informative @ rng.choice([-1.5, 1.5], size=10)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    columns = {f"inf_{i}": informative[:, i] * (i + 1) + 100.0 * i for i in range(10)}
    columns |= {f"dup_{i}": 3.0 * informative[:, i] + 0.05 * rng.normal(size=n) for i in range(10)}
    columns |= {f"noise_{i}": rng.normal(size=n) * 50 for i in range(100)}
    columns["constant"] = np.full(n, 7.0)
    return pd.DataFrame(columns), y


def test_correlation_filter_removes_the_planted_members() -> None:
    rng = np.random.default_rng(1)
    a, b, c = rng.normal(size=(3, 500))
    frame = pd.DataFrame(
        {
            "a": a,
            "b": b,
            "a_copy": a + 0.1 * rng.normal(size=500),
            "a_neg": -2 * a + 0.1 * rng.normal(size=500),  # strong negative correlation
            "c": c,
            "b_copy": 5 * b + 0.2 * rng.normal(size=500),
            "ab_mix": a + b,  # r = 0.71 with each: kept
        }
    )
    kept = correlation_filter(frame.corr().to_numpy(), threshold=0.9)
    assert frame.columns[kept].tolist() == ["a", "b", "c", "ab_mix"]
    assert frame.columns[correlation_filter(frame.corr().to_numpy(), 0.7)].tolist() == [
        "a",
        "b",
        "c",
    ]


def test_correlation_filter_is_greedy_in_column_order() -> None:
    chain = np.array([[1.0, 0.95, 0.5], [0.95, 1.0, 0.95], [0.5, 0.95, 1.0]])
    assert correlation_filter(chain, 0.9).tolist() == [0, 2]  # 2 meets only the dropped 1
    assert correlation_filter(chain[::-1, ::-1], 0.9).tolist() == [0, 2]
    assert correlation_filter(np.eye(4), 0.9).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="NaN"):
        correlation_filter(np.array([[1.0, np.nan], [np.nan, 1.0]]))


def test_correlation_from_site_sums_gives_the_pooled_selection() -> None:
    X, _ = _planted(300, seed=2)
    X = X.drop(columns="constant")
    site = np.random.default_rng(3).integers(0, 3, len(X))
    n, sums, cross = 0, 0.0, 0.0
    for k in range(3):  # what each site would send
        part = X[site == k].to_numpy()
        n, sums, cross = n + len(part), sums + part.sum(axis=0), cross + part.T @ part
    federated = correlation_from_sums(n, sums, cross)
    pooled = X.corr().to_numpy()
    np.testing.assert_allclose(federated, pooled, atol=1e-9)
    np.testing.assert_array_equal(
        correlation_filter(federated, 0.9), correlation_filter(pooled, 0.9)
    )


def test_selector_finds_the_planted_informative_columns() -> None:
    X, y = _planted()
    selector = RadiomicsSelector(top_k=10, rf_trees=100, random_state=0).fit(X, y)
    assert selector.dropped_constant_ == ["constant"]
    kept = selector.kept_after_correlation_
    assert not [c for c in kept if c.startswith("dup_")]  # each copy follows its original
    assert all(f"inf_{i}" in kept for i in range(10))
    assert len(kept) == 110
    assert sum(c.startswith("inf_") for c in selector.selected_features_) >= 8
    assert selector.importances_.index.tolist()[:10] == selector.selected_features_
    assert selector.importances_.is_monotonic_decreasing
    out = selector.transform(X)
    assert (
        out.columns.tolist()
        == selector.selected_features_
        == list(selector.get_feature_names_out())
    )
    assert out.index.equals(X.index)
    assert selector.n_features_in_ == X.shape[1]
    assert selector.feature_names_in_.tolist() == X.columns.tolist()


def test_selector_uses_training_rows_only() -> None:
    X, y = _planted(300, seed=4)
    train, test = X.iloc[:200], X.iloc[200:]
    selector = RadiomicsSelector(top_k=5, rf_trees=20, random_state=1).fit(train, y[:200])
    variable = train.drop(columns="constant")
    np.testing.assert_allclose(selector.scaler_.mean_, variable.mean().to_numpy())
    np.testing.assert_allclose(selector.scaler_.scale_, variable.std(ddof=0).to_numpy())
    fitted = copy.deepcopy(selector.__dict__)
    cols = selector.selected_features_
    expected = (test[cols] - train[cols].mean()) / train[cols].std(ddof=0)
    pd.testing.assert_frame_equal(selector.transform(test), expected, check_names=False)
    changed = test * 10.0 + 3.0
    selector.transform(changed)
    assert selector.scaler_.mean_.tolist() == fitted["scaler_"].mean_.tolist()
    assert selector.selected_features_ == fitted["selected_features_"]
    assert selector.importances_.equals(fitted["importances_"])


def test_selector_is_reproducible_and_clonable() -> None:
    X, y = _planted(200, seed=5)
    first = RadiomicsSelector(top_k=8, rf_trees=30, random_state=3).fit(X, y)
    second = clone(first).fit(X, y)
    assert first.selected_features_ == second.selected_features_
    assert first.importances_.equals(second.importances_)
    ranked = rank_by_importance(X[["inf_0", "noise_0"]], y, n_trees=30, random_state=3)
    assert ranked.index.tolist() == ["inf_0", "noise_0"]
    assert ranked.sum() == pytest.approx(1.0)


def test_correlation_ranking_orders_by_absolute_label_correlation() -> None:
    X, y = _planted(300, seed=7)
    selector = RadiomicsSelector(top_k=10, ranking="correlation").fit(X, y)
    kept = X[selector.kept_after_correlation_]
    expected = {c: abs(np.corrcoef(kept[c], y)[0, 1]) for c in kept}
    assert selector.importances_.to_dict() == pytest.approx(expected)
    assert selector.importances_.is_monotonic_decreasing
    assert set(selector.selected_features_) == {f"inf_{i}" for i in range(10)}
    negated = rank_by_label_correlation(-X[["inf_0", "noise_0"]], y)
    assert negated.index.tolist() == ["inf_0", "noise_0"]  # the sign does not matter
    with pytest.raises(ValueError, match="ranking must be"):
        RadiomicsSelector(ranking="lasso").fit(X, y)


def test_selector_refuses_missing_values_and_other_columns() -> None:
    X, y = _planted(100, seed=6)
    holes = X.copy()
    holes.loc[3, "noise_7"] = np.nan
    holes.loc[5, "inf_2"] = np.nan
    with pytest.raises(ValueError, match=r"2 columns: \['inf_2', 'noise_7'\]"):
        RadiomicsSelector(rf_trees=10).fit(holes, y)
    selector = RadiomicsSelector(top_k=3, rf_trees=10).fit(X, y)
    with pytest.raises(ValueError, match="noise_7"):
        selector.transform(holes)
    with pytest.raises(ValueError, match="feature names"):
        selector.transform(X[X.columns[::-1]])
    with pytest.raises(ValueError, match="both classes"):
        RadiomicsSelector(rf_trees=10).fit(X, np.zeros(len(X), dtype=int))
    with pytest.raises(TypeError, match="DataFrame"):
        selector.transform(X.to_numpy())
