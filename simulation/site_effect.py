"""How much the site shows in the selected radiomics features: the researcher's measure of scanner
and protocol effects, before and after harmonisation, on a simulation's own sites.

A multinomial logistic regression predicts each patient's site from the radiomics columns the
run selected in each fold (standardised and mean-imputed on that fold's training rows, fitted
on them), scored on the fold's held-out rows; the pooled out-of-fold probabilities give a
one-vs-rest macro AUC (0.5: the site cannot be told from the features; 1: always). "After" reads
the fold's ComBat-harmonised values that each site kept (``fedmets.client.site_worker``). It
reads every site's rows, so it runs in the simulation (one machine), never in a federation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedmets.client.site_files import STATE_DIR
from fedmets.client.site_worker import load_site_data
from fedmets.shared.config import SiteConfig


def site_effect(configs: Sequence[SiteConfig], run: str, folds: Sequence[dict]) -> dict:
    """``{"before": AUC, "after": AUC or None (the run did not harmonise), "folds": k}`` of the
    site classifier on the selected columns of each of the run's ``folds`` records (their
    ``selection.selected``), over the run's own fold assignment at each site."""
    data = load_site_data(list(configs))
    fold, harmonised = [], {f: [] for f in range(len(folds))}
    for cfg in configs:
        state = cfg.paths.cache / STATE_DIR / run
        with np.load(state / "folds.npz") as stored:
            if not np.array_equal(stored["ids"], data.ids[data.site == cfg.site_id]):
                raise ValueError(f"{cfg.site_id}: its patients changed since run {run}")
            fold.append(stored["fold"])
        for f in harmonised:
            path = state / f"harmonised-fold{f}.npy"
            harmonised[f].append(np.load(path) if path.is_file() else None)
    fold = np.concatenate(fold)
    raw = data.radiomics.to_numpy()
    before = _out_of_fold(data.site, fold, folds, {f: raw for f in harmonised})
    after = None
    if all(part is not None for parts in harmonised.values() for part in parts):
        values = {f: np.vstack(parts) for f, parts in harmonised.items()}
        after = _out_of_fold(data.site, fold, folds, values)
    return {"before": before, "after": after, "folds": len(folds)}


def _out_of_fold(
    site: np.ndarray, fold: np.ndarray, folds: Sequence[dict], values: dict[int, np.ndarray]
) -> float:
    """Macro one-vs-rest AUC of the pooled held-out site probabilities."""
    names = sorted(set(site))
    probabilities = np.full((len(site), len(names)), np.nan)
    for f, record in enumerate(folds):
        columns = np.asarray(record["selection"]["selected"], dtype=int)
        X = values[f][:, columns]
        train, test = fold != f, fold == f
        mean = np.nanmean(X[train], axis=0)
        X = np.where(np.isfinite(X), X, mean)
        scale = X[train].std(axis=0)
        X = (X - mean) / np.where(scale > 0, scale, 1.0)
        classifier = LogisticRegression(max_iter=2000).fit(X[train], site[train])
        order = [list(classifier.classes_).index(n) for n in names]
        probabilities[test] = classifier.predict_proba(X[test])[:, order]
    scored = np.isfinite(probabilities).all(axis=1)
    if len(names) == 2:
        return float(roc_auc_score(site[scored] == names[1], probabilities[scored, 1]))
    return float(
        roc_auc_score(site[scored], probabilities[scored], multi_class="ovr", labels=names)
    )
