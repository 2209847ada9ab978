"""ComBat harmonisation of radiomics across sites (batches), split into the parts a federation
runs where the data are (distributed ComBat, Chen et al., NeuroImage 2022).

ComBat (Johnson et al., Biostatistics 2007; ``neuroCombat``) models each feature ``y`` (p,) of a
patient of batch ``b`` with covariates ``c`` (q,) as ``y = alpha_b + c @ beta + sqrt(v) *
(gamma_b + sqrt(delta_b) * e)``. The parts:

1. each batch's sums (:func:`design_statistics`): its patient count, covariate sums, feature
   sums, and over all its rows the covariate Gram and covariate x feature products;
2. the centre's least squares over every batch (:func:`fit_location`): the batch intercepts
   ``alpha_b``, the covariate effects ``beta`` (q, p) and the grand mean (the intercepts
   weighted by patients);
3. each batch's residual sums of squares at its own intercept (:func:`residual_sumsq`) ->
   the pooled variance ``v`` (p,) (:func:`pooled_variance`);
4. each batch alone (:class:`BatchAdjustment`): its standardised rows, their location and scale
   ``gamma_b``/``delta_b`` shrunk by parametric empirical Bayes across its own features (the
   priors are per batch, so no other batch's rows are needed), and the harmonised values.

A site holds one batch (its scanner set); a pooled worker holds several. The covariates are
clinical schema columns whose effect is kept (never the label): :func:`covariate_design`.
Missing radiomics values are set to a given mean before fitting and stay missing after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedmets.shared.clinical import CLINICAL_COLUMNS, encoded_columns

CONVERGENCE = 1e-4
"""The empirical-Bayes iteration stops when the largest relative change of ``gamma``/``delta``
is below this (the rule of the reference ComBat, sva and neuroCombat)."""
MIN_OWN_BATCH = 20
"""Fewest patients a site that was not in the federation fits its own batch on (predict)."""
MAX_ITERATIONS = 1000
"""At most this many iterations (the reference has no bound; it converges in tens)."""


def covariate_columns(covariates: Sequence[str]) -> list[str]:
    """The encoded clinical columns (``fedmets.shared.clinical.encoded_columns``) of the schema
    columns ``covariates``: a numeric column as is; a category's indicator columns without its
    first (the reference level; a category of one indicator, e.g. ``sex_male``, keeps it)."""
    unknown = sorted(set(covariates) - set(CLINICAL_COLUMNS))
    if unknown:
        raise ValueError(f"harmonisation covariates {unknown}: not clinical schema columns")
    encoded = encoded_columns()
    columns: list[str] = []
    for name in covariates:
        if CLINICAL_COLUMNS[name].kind == "numeric":
            columns.append(name)
            continue
        group = [c for c in encoded if c.startswith(f"{name}_")]
        columns += group[1:] if len(group) > 1 else group
    return columns


def covariate_design(clinical: pd.DataFrame | None, covariates: Sequence[str]) -> np.ndarray:
    """The covariate design (n, q) float64 of the encoded ``clinical`` table; (n, 0) for none."""
    columns = covariate_columns(covariates)
    if not columns:
        return np.zeros((0 if clinical is None else len(clinical), 0))
    if clinical is None:
        raise ValueError(f"harmonisation covariates {list(covariates)} need clinical data")
    return clinical[columns].to_numpy(dtype=np.float64)


def impute(radiomics: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``radiomics`` (n, p) with missing values at ``mean`` (p,)."""
    return np.where(np.isfinite(radiomics), radiomics, mean)


def design_statistics(
    y: np.ndarray, c: np.ndarray, batch: np.ndarray, batches: Sequence[str]
) -> dict[str, np.ndarray]:
    """Sums over the rows of each of ``batches`` (in that order) of the features ``y`` (n, p)
    and covariates ``c`` (n, q), ``batch`` (n,) naming each row's batch: ``batch_n`` (b,),
    ``batch_covariate_sum`` (b, q), ``batch_response_sum`` (b, p); and over all the rows
    ``covariate_gram`` (q, q) and ``covariate_response`` (q, p)."""
    rows = [batch == b for b in batches]
    return {
        "batch_n": np.array([r.sum() for r in rows], dtype=np.int64),
        "batch_covariate_sum": np.array([c[r].sum(axis=0) for r in rows]).reshape(len(rows), -1),
        "batch_response_sum": np.array([y[r].sum(axis=0) for r in rows]),
        "covariate_gram": c.T @ c,
        "covariate_response": c.T @ y,
    }


@dataclass(frozen=True)
class Location:
    """The centre's least-squares fit: ``intercepts`` (b, p) of the batches in the order their
    statistics were stacked, covariate ``effects`` (q, p), ``grand_mean`` (p,)."""

    intercepts: np.ndarray
    effects: np.ndarray
    grand_mean: np.ndarray


def fit_location(statistics: Sequence[Mapping[str, np.ndarray]]) -> Location:
    """Least squares of the features on [batch indicators, covariates] from every holder's
    :func:`design_statistics` (their batches stacked in the order given); the minimum-norm
    solution when the design is rank-deficient."""
    n_b = np.concatenate([s["batch_n"] for s in statistics]).astype(np.float64)
    c_sum = np.concatenate([s["batch_covariate_sum"] for s in statistics])
    y_sum = np.concatenate([s["batch_response_sum"] for s in statistics])
    gram_c = sum(s["covariate_gram"] for s in statistics)
    resp_c = sum(s["covariate_response"] for s in statistics)
    gram = np.block([[np.diag(n_b), c_sum], [c_sum.T, gram_c]])
    # least squares: a covariate column no patient has (a stage nobody is in) gets effect 0
    coefficients = np.linalg.lstsq(gram, np.vstack([y_sum, resp_c]), rcond=None)[0]
    b = len(n_b)
    intercepts, effects = coefficients[:b], coefficients[b:]
    return Location(intercepts, effects, (n_b / n_b.sum()) @ intercepts)


def residual_sumsq(y: np.ndarray, c: np.ndarray, intercept: np.ndarray, effects: np.ndarray):
    """Per feature (p,): the sum over one batch's rows of (y - intercept - c @ effects)^2."""
    return ((y - intercept - c @ effects) ** 2).sum(axis=0)


def pooled_variance(sumsq: Sequence[np.ndarray], n: int) -> np.ndarray:
    """The pooled residual variance (p,) of ``n`` rows (ComBat divides by n); a feature without
    variance gets 1 (it stays as it is)."""
    variance = sum(sumsq) / n
    return np.where(variance > 0, variance, 1.0)


def standardise(y, c, grand_mean, effects, variance) -> np.ndarray:
    """(y - grand_mean - c @ effects) / sqrt(variance): (n, p)."""
    return (y - grand_mean - c @ effects) / np.sqrt(variance)


@dataclass(frozen=True)
class BatchAdjustment:
    """One batch's location ``gamma`` (p,) and scale ``delta`` (p,) on the standardised scale,
    with the centre's ``grand_mean``, ``effects`` (q, p) and ``variance`` (p,) it applies with."""

    gamma: np.ndarray
    delta: np.ndarray
    grand_mean: np.ndarray
    effects: np.ndarray
    variance: np.ndarray

    @classmethod
    def fit(cls, y, c, grand_mean, effects, variance) -> BatchAdjustment:
        """Parametric empirical Bayes on one batch's rows ``y`` (n, p), ``c`` (n, q): the
        least-squares location/scale of each feature, shrunk towards priors fitted across
        the batch's features (normal for gamma, inverse gamma for delta)."""
        s = standardise(y, c, grand_mean, effects, variance)
        n = s.shape[0]
        if n < 2:
            raise ValueError(f"ComBat needs >= 2 patients in a batch, got {n}")
        gamma_hat = s.mean(axis=0)
        delta_hat = s.var(axis=0, ddof=1)
        delta_hat = np.where(delta_hat == 0, 1.0, delta_hat)
        gamma_bar, tau2 = gamma_hat.mean(), gamma_hat.var(ddof=1)
        m, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
        a, b = (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2
        gamma_old, delta_old = gamma_hat, delta_hat
        for _ in range(MAX_ITERATIONS):
            gamma = (tau2 * n * gamma_hat + delta_old * gamma_bar) / (tau2 * n + delta_old)
            delta = (0.5 * ((s - gamma) ** 2).sum(axis=0) + b) / (n / 2.0 + a - 1.0)
            with np.errstate(divide="ignore", invalid="ignore"):  # a location exactly 0
                change = max(
                    (np.abs(gamma - gamma_old) / gamma_old).max(),
                    (np.abs(delta - delta_old) / delta_old).max(),
                )
            gamma_old, delta_old = gamma, delta
            if change <= CONVERGENCE:
                break
        if not (np.isfinite(gamma).all() and np.isfinite(delta).all() and (delta > 0).all()):
            raise ValueError("ComBat's empirical Bayes did not give a finite location and scale")
        return cls(gamma, delta, grand_mean, effects, variance)

    def apply(self, radiomics: np.ndarray, c: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """Harmonised ``radiomics`` (n, p) of this batch (missing values set to ``mean`` for
        the fit, missing again after)."""
        s = standardise(impute(radiomics, mean), c, self.grand_mean, self.effects, self.variance)
        adjusted = (s - self.gamma) / np.sqrt(self.delta)
        harmonised = adjusted * np.sqrt(self.variance) + self.grand_mean + c @ self.effects
        return np.where(np.isfinite(radiomics), harmonised, np.nan)

    def arrays(self) -> dict[str, np.ndarray]:
        """Its arrays by name (for ``np.savez``; :meth:`from_arrays` reads them back)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> BatchAdjustment:
        return cls(**{name: np.asarray(arrays[name]) for name in cls.__dataclass_fields__})
