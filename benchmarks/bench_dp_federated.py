"""The utility cost of differential privacy in the federated protocol: pooled AUC vs epsilon.

The real protocol (``fedmets.server.protocol.FederatedProtocol``) over the demo cohort's sites, each
a ``fedmets.client.site_worker.SiteWorker`` reached in process
(``fedmets.simulation.in_process.InProcessLink``: the same requests, replies, release gate and
aggregation as over Flower, without the transport). Settings: ``fedmets simulate``'s ``demo`` preset
(5 folds, federated selection), the fusion stage only (Swin3D cannot be trained under DP-SGD, see
docs/privacy.md), with the options below replacing preset values, and per setting:

- ``preset``: the preset as it is (its forest ranking, ``[32]`` network, 30 rounds x 3
  epochs), no DP: the best model a site gets without privacy;
- ``off``: no DP (epsilon inf), the options' settings otherwise;
- ``sample``: DP-SGD at every site (what protects one patient), the noise planned so that a
  site's trainings compose to epsilon: over every fold (``--scope run``) or over each fold's
  rounds alone (``--scope fold``; the ledger still composes all folds: "epsilon spent");
- ``client``: the server clips each site's update and adds Gaussian noise to the average,
  planned the same way (what protects a whole site; with 4 sites the noise on a mean of 4
  updates is large).

Under DP only the main model (radiomics + clinical) is trained (``[dp] ablation = false``).
Each setting runs once per ``--seeds`` seed (the seed fixes the folds); printed: the main
model's pooled AUC per run, then per mode and epsilon its mean and SD over the seeds and the
AUC losses against the same seed's ``off`` and ``preset`` runs. Each site's ledger and state go to a
temporary folder: the benchmark spends no real budget. A plot and the numbers are written
beside ``--out``.

    python benchmarks/bench_dp_federated.py [--cohort data/demo] [--epsilons 1 3 8]
        [--modes sample client] [--seeds 7 8 9] [--scope run|fold] [--fusion-rounds R]
        [--local-epochs E] [--hidden W ...] [--lr LR] [--group-dropout P] [--clip C]
        [--ranking forest|correlation]
        [--out benchmarks/results/dp_federated.png]

The DP settings of docs/privacy.md: ``--ranking correlation --hidden --lr 0.03
--group-dropout 0 --fusion-rounds 10 --local-epochs 1`` (``--hidden`` with no width: a
logistic regression).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmets.client.site_worker import SiteWorker  # noqa: E402
from fedmets.server.protocol import FederatedProtocol  # noqa: E402
from fedmets.simulation.in_process import InProcessLink  # noqa: E402
from fedmets.simulation.simulate import federation_config, site_configs  # noqa: E402


def run_setting(
    cohort: Path, mode: str, epsilon: float | None, seed: int, overrides: dict[str, dict]
) -> dict:
    """One federated run (``overrides``: per config section, values replacing the preset's;
    mode ``preset``: the preset as it is, without DP); returns the main model's pooled
    metrics and the seconds it took."""
    cfg = federation_config("demo", f"dp-{mode}", seed)
    data = cfg.model_dump()
    data["stages"]["image"] = False
    for section, values in ({} if mode == "preset" else overrides).items():
        data[section].update(values)
    data["dp"].update(mode="off" if mode == "preset" else mode, epsilon=epsilon)
    cfg = type(cfg).model_validate(data)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        workers = {
            site.site_id: SiteWorker(
                [site],
                state_root=Path(folder) / site.site_id / "state",
                ledger_root=Path(folder) / site.site_id,
            )
            for site in site_configs(cohort)
        }
        result = FederatedProtocol(
            InProcessLink(workers), cfg, f"dp-{mode}", privacy_dir=Path(folder) / "server"
        ).run_all()
    main = result["main_model"]
    pooled = result["models"][main]["pooled"]
    privacy = result["privacy"]
    spent = (
        max(s["epsilon"] for s in privacy["sites"].values())
        if mode == "sample"
        else (privacy["server"] or {}).get("epsilon")
    )
    return {
        "mode": mode,
        "epsilon": epsilon,
        "seed": seed,
        "model": main,
        "auc": pooled["auc"],
        "auc_ci": pooled["auc_ci"],
        "epsilon_spent": spent,
        "seconds": round(time.perf_counter() - tic, 1),
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Per (mode, epsilon): mean and SD over seeds of the AUC (``auc_*``), of the AUC loss
    against the same seed's run without DP (``loss_*``) and against its preset run
    (``loss_vs_preset_*``); paired: the seed fixes the folds."""
    baseline = {
        name: {r["seed"]: r["auc"] for r in rows if r["mode"] == mode}
        for name, mode in (("loss", "off"), ("loss_vs_preset", "preset"))
    }
    table = []
    for key in dict.fromkeys((r["mode"], r["epsilon"]) for r in rows):
        runs = [r for r in rows if (r["mode"], r["epsilon"]) == key]
        spent = [r["epsilon_spent"] for r in runs if r["epsilon_spent"] is not None]
        entry = {"mode": key[0], "epsilon": key[1], "runs": len(runs)}
        series = {"auc": [r["auc"] for r in runs]}
        series |= {name: [of[r["seed"]] - r["auc"] for r in runs] for name, of in baseline.items()}
        for name, values in series.items():
            entry[f"{name}_mean"] = float(np.mean(values))
            entry[f"{name}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        table.append(entry | {"epsilon_spent": max(spent) if spent else None})
    return table


def plot(table: list[dict], out: Path) -> None:
    """Mean pooled AUC (± SD over seeds) against epsilon, one line per DP mode; no DP dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for mode, label in (("sample", "sample-level (DP-SGD)"), ("client", "client-level")):
        points = sorted(
            (r["epsilon"], r["auc_mean"], r["auc_sd"]) for r in table if r["mode"] == mode
        )
        if points:
            eps, auc, sd = zip(*points, strict=True)
            ax.errorbar(eps, auc, yerr=sd, marker="o", capsize=3, label=label)
    for r in table:
        if r["mode"] == "off":
            ax.axhline(r["auc_mean"], linestyle="--", color="grey", label="no DP, same settings")
        if r["mode"] == "preset":
            ax.axhline(r["auc_mean"], linestyle="-.", color="tab:green", label="preset, no DP")
    ax.axhline(0.5, linestyle=":", color="black", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    epsilons = sorted({r["epsilon"] for r in table if r["epsilon"] is not None})
    ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (delta 1e-5)")
    ax.set_ylabel("pooled out-of-fold AUC")
    ax.set_title("Federated fusion (4 sites): utility vs DP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--modes", nargs="+", default=["sample", "client"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[7], help="one run per seed")
    parser.add_argument("--scope", choices=["run", "fold"], default="run", help="dp.epsilon_scope")
    parser.add_argument("--fusion-rounds", type=int, help="instead of the preset's 30")
    parser.add_argument("--local-epochs", type=int, help="instead of the preset's 3")
    parser.add_argument("--hidden", type=int, nargs="*", help="model.fusion_hidden ([32])")
    parser.add_argument("--lr", type=float, help="model.fusion_lr (the preset's 3e-3)")
    parser.add_argument("--group-dropout", type=float, help="model.fusion_group_dropout (0.3)")
    parser.add_argument("--clip", type=float, help="dp.max_grad_norm (1.0)")
    parser.add_argument(
        "--ranking", choices=["forest", "correlation"], help="selection.ranking (forest)"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "dp_federated.png"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    chosen = {
        "stages": {"fusion_rounds": args.fusion_rounds, "fusion_local_epochs": args.local_epochs},
        "model": {
            "fusion_hidden": args.hidden,
            "fusion_lr": args.lr,
            "fusion_group_dropout": args.group_dropout,
        },
        "dp": {"max_grad_norm": args.clip, "epsilon_scope": args.scope},
        "selection": {"ranking": args.ranking},
    }
    overrides = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in chosen.items()
    }
    settings = [("preset", None), ("off", None)]
    settings += [(m, e) for m in args.modes for e in args.epsilons]
    rows = []
    for seed in args.seeds:
        for mode, epsilon in settings:
            rows.append(run_setting(args.cohort, mode, epsilon, seed, overrides))
            r = rows[-1]
            print(
                f"seed {seed} {mode:7s} epsilon {epsilon or 'inf':>5}: AUC {r['auc']:.3f} "
                f"[{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]  ({r['seconds']} s)",
                flush=True,
            )
    table = summarise(rows)
    print(
        f"\n{rows[0]['model']}, {len(args.seeds)} seed(s), mean ± SD; losses paired with the "
        "same seed's run without DP ('off') and its preset run"
    )
    print(
        f"{'mode':8s} {'epsilon':>8s} {'AUC':>15s} {'loss vs off':>15s} "
        f"{'loss vs preset':>15s} {'epsilon spent':>14s}"
    )
    for r in table:
        eps = r["epsilon"] or "inf"
        spent = "" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        print(
            f"{r['mode']:8s} {eps:>8} {r['auc_mean']:>8.3f} ± {r['auc_sd']:.3f} "
            f"{r['loss_mean']:>8.3f} ± {r['loss_sd']:.3f} "
            f"{r['loss_vs_preset_mean']:>8.3f} ± {r['loss_vs_preset_sd']:.3f} {spent:>14s}"
        )
    print(f"wall time {time.perf_counter() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(table, args.out)
    summary = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "table": table,
        "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"plot: {args.out}\nnumbers: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
