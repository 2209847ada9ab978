"""Radiomics feature selection: drop constant columns, standardise, drop correlated columns,
keep the ``top_k`` most important by random-forest importance.

The pieces are functions as well, so that the federated protocol can run the same steps from
aggregates: :func:`correlation_from_sums` turns pooled sums and cross-products into the
correlation matrix that :func:`correlation_filter` reads, giving exactly the pooled result.

Missing values are not imputed: a NaN anywhere is an error naming the columns (impute before,
e.g. with scikit-learn's ``SimpleImputer`` fitted on training rows, so that every site can do
the same from pooled statistics).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import VarianceThreshold
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data


def correlation_filter(corr: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """Indices of the columns kept from a (p, p) correlation matrix: columns are visited in
    order and one is kept unless ``|r| > threshold`` with a column already kept (so of a
    correlated pair the earlier column stays; a column correlated only with dropped ones
    stays too). Returns sorted int indices."""
    corr = np.asarray(corr, dtype=float)
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
        raise ValueError(f"corr must be a square matrix, got shape {corr.shape}")
    if np.isnan(corr).any():
        raise ValueError("corr has NaN entries (a constant column?)")
    kept: list[int] = []
    for j in range(corr.shape[0]):
        if not kept or np.abs(corr[j, kept]).max() <= threshold:
            kept.append(j)
    return np.array(kept, dtype=int)


def correlation_from_sums(n: int, sums: np.ndarray, cross_products: np.ndarray) -> np.ndarray:
    """Pearson correlation (p, p) from ``n`` rows, column ``sums`` (p,) and ``cross_products``
    X^T X (p, p; its diagonal holds the sums of squares) -- statistics that add up over sites.
    Precision: centre X by an agreed shift (e.g. a first-round pooled mean) before summing
    when column means are large next to their spread."""
    sums = np.asarray(sums, dtype=float)
    cov = (np.asarray(cross_products, dtype=float) - np.outer(sums, sums) / n) / (n - 1)
    scale = np.sqrt(np.diag(cov))
    return cov / np.outer(scale, scale)


def rank_by_importance(
    X: pd.DataFrame, y: np.ndarray, n_trees: int = 200, random_state: int = 0
) -> pd.Series:
    """Impurity importances of a class-balanced ``RandomForestClassifier`` on ``X`` (n, p) and
    0/1 ``y`` (n,): a Series indexed by column, highest first (ties keep column order)."""
    forest = RandomForestClassifier(
        n_estimators=n_trees, class_weight="balanced", random_state=random_state, n_jobs=1
    )
    forest.fit(X.to_numpy(), np.asarray(y))
    importances = pd.Series(forest.feature_importances_, index=X.columns, name="importance")
    return importances.sort_values(ascending=False, kind="stable")


def rank_by_label_correlation(X: pd.DataFrame, y: np.ndarray) -> pd.Series:
    """|Pearson r| of each column of ``X`` (n, p) with 0/1 ``y`` (n,): a Series indexed by
    column, highest first (ties keep column order)."""
    values = X.to_numpy(dtype=float)
    centred = values - values.mean(axis=0)
    label = np.asarray(y, dtype=float) - np.mean(y)
    r = np.abs(centred.T @ label) / np.sqrt((centred**2).sum(axis=0) * (label**2).sum())
    correlations = pd.Series(r, index=X.columns, name="importance")
    return correlations.sort_values(ascending=False, kind="stable")


class RadiomicsSelector(TransformerMixin, BaseEstimator):
    """Select ``top_k`` radiomics columns, fitted on training rows only.

    ``fit(X, y)``: X a numeric DataFrame (n, p) without NaN, y 0/1 (n,) with both classes.
    1. constant columns (zero variance in the training rows) are dropped: ``dropped_constant_``;
    2. ``scaler_`` (StandardScaler) standardises the rest;
    3. :func:`correlation_filter` at ``correlation_threshold`` (earlier column kept):
       ``kept_after_correlation_``;
    4. ``ranking="forest"``: :func:`rank_by_importance` with ``rf_trees`` trees and
       ``random_state``, or ``"correlation"``: :func:`rank_by_label_correlation`, ranks those
       on the standardised training rows: ``importances_`` (highest first);
    5. the first ``top_k`` (all, if fewer remain) are ``selected_features_``.

    ``transform(X)``: the standardised ``selected_features_`` columns of X (DataFrame, same
    index), using the training statistics.
    """

    def __init__(
        self,
        correlation_threshold: float = 0.9,
        top_k: int = 36,
        rf_trees: int = 200,
        random_state: int = 0,
        ranking: str = "forest",
    ) -> None:
        self.correlation_threshold = correlation_threshold
        self.top_k = top_k
        self.rf_trees = rf_trees
        self.random_state = random_state
        self.ranking = ranking

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> RadiomicsSelector:
        """Learn the selection from training rows ``X`` (n, p) and labels ``y`` (n,)."""
        _check_frame(X)
        values, y = validate_data(self, X, y, reset=True)
        if set(np.unique(y)) != {0, 1}:
            raise ValueError(f"y must hold both classes 0 and 1, got {np.unique(y).tolist()}")
        names = np.asarray(self.feature_names_in_)
        variable = VarianceThreshold(0.0).fit(values).get_support()
        self.dropped_constant_ = names[~variable].tolist()
        self.scaler_ = StandardScaler().set_output(transform="pandas").fit(X.loc[:, variable])
        scaled = self.scaler_.transform(X.loc[:, variable])
        kept = correlation_filter(scaled.corr().to_numpy(), self.correlation_threshold)
        self.kept_after_correlation_ = scaled.columns[kept].tolist()
        if self.ranking not in ("forest", "correlation"):
            raise ValueError(f"ranking must be 'forest' or 'correlation', got {self.ranking!r}")
        kept_rows = scaled[self.kept_after_correlation_]
        self.importances_ = (
            rank_by_importance(kept_rows, y, self.rf_trees, self.random_state)
            if self.ranking == "forest"
            else rank_by_label_correlation(kept_rows, y)
        )
        self.selected_features_ = self.importances_.index[: self.top_k].tolist()
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        """Standardised selected columns of ``X`` (n, k) with the training mean and scale."""
        check_is_fitted(self, "selected_features_")
        _check_frame(X)
        validate_data(self, X, reset=False)
        scaled = self.scaler_.transform(X.loc[:, self.scaler_.feature_names_in_])
        return scaled[self.selected_features_]

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        """Names of the columns ``transform`` returns."""
        check_is_fitted(self, "selected_features_")
        return np.asarray(self.selected_features_, dtype=object)


def _check_frame(X: object) -> None:
    """A DataFrame without NaN, or a ValueError naming what is wrong."""
    if not isinstance(X, pd.DataFrame):
        raise TypeError(f"X must be a pandas DataFrame, got {type(X).__name__}")
    missing = X.columns[X.isna().any()].tolist()
    if missing:
        raise ValueError(f"X has missing values in {len(missing)} columns: {missing}")
