"""What the sites' release policy costs the pooled evaluation: the federated pooled AUC of a
`fedmets simulate` run (from the coarsened score histograms the sites released) against the
exact pooled AUC of the same run's out-of-fold scores, which stay on the sites' disks.

    .venv/bin/python benchmarks/bench_pooled_auc.py runs/demo [--cohort data/demo]

Reads ``RUN/metrics.json`` and ``RUN/federation.toml``, then each site's held-out scores
(``<paths.cache>/federated/<run>/scores-fold<f>.npz``, a simulation can read every site) and
prints per model: the pooled AUC the federation reported, the exact AUC of the pooled scores,
their difference, and the AUC of the same scores on the run's histogram grid without
coarsening (what the bins alone cost).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmets.client.site_files import STATE_DIR  # noqa: E402
from fedmets.client.site_worker import _safe, load_site_data  # noqa: E402
from fedmets.shared.config import load_federation_config, load_site_config  # noqa: E402
from fedmets.shared.metrics import metrics_from_histograms, score_histograms  # noqa: E402


def pooled_scores(cohort: Path, run: str, model: str, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and out-of-fold scores (n,) of ``model`` over every site of ``cohort``."""
    labels, scores = [], []
    for toml in sorted(cohort.glob("*/site.toml")):
        cfg = load_site_config(toml)
        data = load_site_data([cfg])
        for fold in range(folds):
            path = cfg.paths.cache / STATE_DIR / run / f"scores-fold{fold}.npz"
            with np.load(path) as stored:
                labels.append(data.labels[stored["rows"]])
                scores.append(stored[_safe(model)])
    return np.concatenate(labels), np.concatenate(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--cohort", type=Path, default=None)
    args = parser.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    fed = load_federation_config(args.run / "federation.toml")
    cohort = args.cohort or Path(metrics["config"]["cohort"])
    bins = fed.evaluation.histogram_bins
    print(f"{args.run}: pooled AUC, {bins} bins (the federated one from the sites' releases)")
    print(f"{'model':34s} {'n':>5s} {'federated':>9s} {'exact':>7s} {'diff':>8s} {'grid only':>9s}")
    for model, result in metrics["federated"]["models"].items():
        y, s = pooled_scores(cohort, fed.run.name, model, fed.cv.folds)
        hist = score_histograms(y, s, bins)
        grid = metrics_from_histograms(hist.pos_counts, hist.neg_counts, hist.edges, 0.5)
        exact = roc_auc_score(y, s)
        reported = result["pooled"]["auc"]
        print(
            f"{model:34s} {len(y):5d} {reported:9.4f} {exact:7.4f} {reported - exact:+8.4f}"
            f" {grid['auc'] - exact:+9.4f}"
        )


if __name__ == "__main__":
    main()
