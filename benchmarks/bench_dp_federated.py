"""The utility cost of differential privacy in the federated protocol: pooled AUC vs epsilon.

The real protocol (``server.protocol.FederatedProtocol``) over the demo cohort's sites, each a
``client.site_worker.SiteWorker`` reached in process (``simulation.in_process.InProcessLink``:
the same requests, replies, release gate and aggregation as over Flower, without the
transport). Settings: ``fedmets simulate``'s ``demo`` preset (5 folds, federated selection,
30 FedAvg rounds of the fusion networks), the fusion stage only (Swin3D cannot be trained under
DP-SGD, see docs/privacy.md), and per setting:

- ``off``: no DP (epsilon inf);
- ``sample``: DP-SGD at every site, the noise planned so that a site's trainings over all folds,
  rounds and networks compose to epsilon (each site's ledger; what protects one patient);
- ``client``: the server clips each site's update and adds Gaussian noise to the sum, planned
  so that every aggregation of the run composes to epsilon (what protects a whole site; with 4
  sites the noise on a mean of 4 updates is large).

Each site's ledger and state go to a temporary folder: the benchmark spends no real budget
(the sites' audit logs do list its releases, as for ``fedmets simulate``'s baselines).
Printed: pooled AUC (main model: radiomics + clinical) per mode and epsilon, the AUC loss against
``off``, and the wall time; a plot and the numbers are written beside ``--out``.

    python benchmarks/bench_dp_federated.py [--cohort data/demo] [--epsilons 1 3 8]
        [--modes sample client] [--fusion-rounds R] [--local-epochs E]
        [--out benchmarks/results/dp_federated.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.site_worker import SiteWorker  # noqa: E402
from server.protocol import FederatedProtocol  # noqa: E402
from simulation.in_process import InProcessLink  # noqa: E402
from simulation.simulate import federation_config, site_configs  # noqa: E402

FUSION_ONLY = ["census", "folds", "selection", "fusion", "evaluate"]


def run_setting(
    cohort: Path, mode: str, epsilon: float | None, seed: int, stages: dict[str, int]
) -> dict:
    """One federated run (``stages``: overrides of the preset's ``[stages]``); returns the main
    model's pooled metrics and the seconds it took."""
    cfg = federation_config("demo", f"dp-{mode}", seed)
    data = cfg.model_dump()
    data["stages"].update(stages, enabled=FUSION_ONLY)
    data["dp"] = {"mode": mode, "epsilon": epsilon}
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
        "model": main,
        "auc": pooled["auc"],
        "auc_ci": pooled["auc_ci"],
        "epsilon_spent": spent,
        "seconds": round(time.perf_counter() - tic, 1),
    }


def plot(rows: list[dict], out: Path) -> None:
    """Pooled AUC against epsilon, one line per DP mode; no DP as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for mode, label in (("sample", "sample-level (DP-SGD)"), ("client", "client-level")):
        points = sorted((r["epsilon"], r["auc"]) for r in rows if r["mode"] == mode)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    for r in rows:
        if r["mode"] == "off":
            ax.axhline(r["auc"], linestyle="--", color="grey", label="no DP")
    ax.axhline(0.5, linestyle=":", color="black", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (the whole run, delta 1e-5)")
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
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fusion-rounds", type=int, help="instead of the preset's 30")
    parser.add_argument("--local-epochs", type=int, help="instead of the preset's 3")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "dp_federated.png"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    settings = [("off", None)] + [(m, e) for m in args.modes for e in args.epsilons]
    stages = {
        key: value
        for key, value in (
            ("fusion_rounds", args.fusion_rounds),
            ("fusion_local_epochs", args.local_epochs),
        )
        if value is not None
    }
    rows = []
    for mode, epsilon in settings:
        rows.append(run_setting(args.cohort, mode, epsilon, args.seed, stages))
        r = rows[-1]
        print(
            f"{mode:7s} epsilon {epsilon or 'inf':>5}: AUC {r['auc']:.3f} "
            f"[{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]  ({r['seconds']} s)",
            flush=True,
        )
    base = rows[0]["auc"]
    print(f"\n{'mode':8s} {'epsilon':>8s} {'AUC':>6s} {'loss vs no DP':>14s}  {rows[0]['model']}")
    for r in rows:
        eps = r["epsilon"] or "inf"
        print(f"{r['mode']:8s} {eps:>8} {r['auc']:>6.3f} {base - r['auc']:>14.3f}")
    wall = time.perf_counter() - started
    print(f"wall time {wall:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out)
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"plot: {args.out}\nnumbers: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
