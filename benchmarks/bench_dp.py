"""The utility cost of sample-level differential privacy: pooled out-of-fold AUC vs epsilon.

The fusion network alone, centralised, on the extracted features of a cohort (default the demo
cohort, ``data/demo/*/output/features.parquet``: radiomics ``tumour_*``/``ring_*`` and encoded
clinical columns). Stratified k-fold CV (default 5); per fold, on the training rows only:
median imputation, ``fedmets.shared.selection.RadiomicsSelector`` (top 36), clinical
standardisation. Then per epsilon a ``FusionNet`` (radiomics + clinical) is trained for a fixed
number of epochs (no early stopping: choosing an epoch on held-out rows would be a release of its
own): ``inf`` with ``fedmets.client.training.train_fusion`` (plain AdamW), finite epsilon with
``fedmets.client.privacy.train_private`` (DP-SGD, Poisson sampling), the noise multiplier chosen so
that the training of all k folds composed ends at epsilon (a patient is in k-1 of the k training
sets; the ledger composes every fold, as the federated site's ledger does). The held-out scores
of all folds are pooled into one AUC. Repeated over ``--repeats`` seeds (mean and SD).

Selection (forest importances, moments) is not private here either: only the network's
training is. One CPU thread.

    python benchmarks/bench_dp.py [--cohort data/demo] [--epsilons 1 3 8 inf]
        [--out benchmarks/results/dp_tradeoff.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.impute import SimpleImputer
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmets.client.privacy import plan_site_noise, site_ledger, train_private  # noqa: E402
from fedmets.client.training import predict_proba, train_fusion  # noqa: E402
from fedmets.shared.clinical import encoded_columns  # noqa: E402
from fedmets.shared.models import FusionNet, positive_class_weight  # noqa: E402
from fedmets.shared.selection import RadiomicsSelector  # noqa: E402


def load_cohort(cohort: Path) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Radiomics (n, p), encoded clinical (n, q) and labels (n,) of every labelled patient of
    every site of ``cohort``."""
    tables = [pd.read_parquet(p) for p in sorted(cohort.glob("*/output/features.parquet"))]
    if not tables:
        raise SystemExit(f"no */output/features.parquet under {cohort}: extract the sites first")
    table = pd.concat(tables, ignore_index=True)
    table = table[table["label"].notna()].reset_index(drop=True)
    clinical = [c for c in encoded_columns() if c in table.columns]
    radiomics = [c for c in table.columns if c.startswith(("tumour_", "ring_"))]
    values = table[radiomics].astype(float).replace([np.inf, -np.inf], np.nan)
    return values, table[clinical].astype(float), table["label"].astype(int).to_numpy()


def fold_inputs(
    radiomics: pd.DataFrame,
    clinical: pd.DataFrame,
    y: np.ndarray,
    train: np.ndarray,
    top_k: int,
    trees: int,
    seed: int,
) -> tuple[np.ndarray, dict[str, int]]:
    """Every row's input (radiomics selected + standardised, clinical standardised), all
    statistics from the training rows."""
    imputer = SimpleImputer(strategy="median").set_output(transform="pandas")
    imputed = imputer.fit(radiomics.iloc[train]).transform(radiomics)
    selector = RadiomicsSelector(top_k=top_k, rf_trees=trees, random_state=seed)
    selector.fit(imputed.iloc[train], y[train])
    R = selector.transform(imputed).to_numpy(np.float32)
    C = StandardScaler().fit(clinical.iloc[train]).transform(clinical).astype(np.float32)
    return np.concatenate([R, C], axis=1), {"radiomics": R.shape[1], "clinical": C.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--epsilons", nargs="+", default=["1", "3", "8", "inf"])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="DP-SGD max_grad_norm")
    parser.add_argument("--top-k", type=int, default=36)
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "dp_tradeoff.png"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    epsilons = [float(e) for e in args.epsilons]

    radiomics, clinical, y = load_cohort(args.cohort)
    print(
        f"cohort {args.cohort}: {len(y)} patients, {int(y.sum())} DM+, "
        f"{radiomics.shape[1]} radiomics + {clinical.shape[1]} clinical columns"
    )
    splitter = StratifiedKFold(args.folds, shuffle=True, random_state=args.seed)
    folds = []
    for k, (train, test) in enumerate(splitter.split(np.zeros(len(y)), y)):
        X, dims = fold_inputs(radiomics, clinical, y, train, args.top_k, args.trees, args.seed + k)
        folds.append((train, test, X, dims))
    selection_s = time.perf_counter() - started
    print(f"selection: {selection_s:.1f} s ({args.folds} folds)")

    results = []
    for eps in epsilons:
        aucs, noises, spent = [], [], []
        tic = time.perf_counter()
        for rep in range(args.repeats):
            scores = np.full(len(y), np.nan)
            n_train = min(len(f[0]) for f in folds)
            noise = None
            with tempfile.TemporaryDirectory() as folder:
                ledger = None
                if math.isfinite(eps):
                    ledger = site_ledger(folder, "benchmark", args.delta, budget=eps)
                    noise = plan_site_noise(
                        eps, args.delta, n_train, args.batch, args.epochs, releases=args.folds
                    )
                for k, (train, test, X, dims) in enumerate(folds):
                    seed = args.seed * 1000 + rep * 100 + k
                    torch.manual_seed(seed)
                    net = FusionNet(dims, hidden=[args.hidden], dropout=args.dropout)
                    pos_weight = positive_class_weight(y[train])
                    common = dict(epochs=args.epochs, lr=args.lr, pos_weight=pos_weight, seed=seed)
                    if ledger is None:
                        train_fusion(
                            net,
                            X[train],
                            y[train],
                            batch_size=args.batch,
                            weight_decay=1e-3,
                            **common,
                        )
                    else:
                        train_private(
                            net,
                            (X[train], y[train]),
                            batch_size=args.batch,
                            noise_multiplier=noise,
                            max_grad_norm=args.clip,
                            weight_decay=1e-3,
                            ledger=ledger,
                            fold=k,
                            **common,
                        )
                    scores[test] = predict_proba(net, X[test])
                spent.append(ledger.epsilon() if ledger else math.inf)
            aucs.append(float(roc_auc_score(y, scores)))
            noises.append(noise)
        row = {
            "epsilon": eps,
            "auc_mean": float(np.mean(aucs)),
            "auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
            "aucs": aucs,
            "noise_multiplier": noises[0],
            "epsilon_spent": spent[0],
            "seconds": round(time.perf_counter() - tic, 1),
        }
        results.append(row)
        print(
            f"epsilon {eps:>5}: AUC {row['auc_mean']:.3f} +/- {row['auc_sd']:.3f}"
            f"  (noise {row['noise_multiplier'] or 0:.3f}, spent {row['epsilon_spent']:.3f},"
            f" {row['seconds']} s)"
        )

    wall = time.perf_counter() - started
    print()
    print(f"{'epsilon':>8} {'noise z':>8} {'pooled OOF AUC':>16}   (delta {args.delta:g})")
    for r in results:
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        print(f"{r['epsilon']:>8} {z:>8} {r['auc_mean']:>9.3f} +/- {r['auc_sd']:.3f}")
    print(f"wall time {wall:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.out)
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    summary["wall_s"] = round(wall, 1)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"plot: {args.out}\nnumbers: {args.out.with_suffix('.json')}")


def plot(results: list[dict], out: Path) -> None:
    """AUC (mean +/- SD over repeats) per epsilon; inf drawn at the right as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in results if math.isfinite(r["epsilon"])]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    if finite:
        ax.errorbar(
            [r["epsilon"] for r in finite],
            [r["auc_mean"] for r in finite],
            yerr=[r["auc_sd"] for r in finite],
            marker="o",
            capsize=3,
            label="DP-SGD",
        )
    for r in results:
        if not math.isfinite(r["epsilon"]):
            ax.axhline(r["auc_mean"], linestyle="--", color="grey", label="no DP (epsilon inf)")
    ax.axhline(0.5, linestyle=":", color="black", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    if finite:
        ax.set_xticks([r["epsilon"] for r in finite], [f"{r['epsilon']:g}" for r in finite])
        ax.minorticks_off()
    ax.set_xlabel("epsilon (all folds composed, delta 1e-5)")
    ax.set_ylabel("pooled out-of-fold AUC")
    ax.set_title("Fusion network: utility vs sample-level DP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    main()
