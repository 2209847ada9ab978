"""One federated run two ways: Flower's simulation engine vs a real deployment on loopback
(TLS SuperLink with SuperNode authentication; per site a site service, ``fedmets site serve``,
and a SuperNode whose ClientApp relays each message to it).

    .venv/bin/python benchmarks/bench_deployment.py [--sites 3] [--patients 60] [--out DIR]
                                                     [--secure-aggregation] [--folds 2]
                                                     [--fusion-rounds 2]
                                                     [--parallel-folds N] [--site-lanes K]

The same tiny tabular federation (``fedmets.simulation.feature_sites``; 2 folds, 2 fusion rounds)
runs both ways (``--secure-aggregation``: its training rounds through SecAgg+, both ways;
``--parallel-folds N``: the deployment runs a second time with N folds at once, their requests
in batch messages, ``[federation] parallel_folds``, which each site answers ``--site-lanes``
at once, default N). Printed
per way: wall time of the run, the machine's busy CPU seconds meanwhile (every process, Flower's
included; ``/proc/stat``), message rounds (one ``ask`` of the protocol, from the ServerApp's
``received.jsonl``), wall time per message round, bytes each site sends per message round (mean
of the replies' field sizes), and the deployment's extra cost per message round over the
simulation (a ClientApp process start per message), and the part of that start that is fedmets'
own: the median wall time of a fresh Python importing the ClientApp (the relay: what every
message loads; the site service imports the worker once, when it starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from fedmets.shared.config import FederationConfig, load_site_config
from fedmets.simulation.feature_sites import write_feature_sites
from fedmets.simulation.loopback import LoopbackFederation
from fedmets.simulation.simulate import run_flower_simulation


def federation_toml(
    path: Path,
    *,
    secure_aggregation: bool = False,
    folds: int = 2,
    parallel_folds: int = 1,
    fusion_rounds: int = 2,
) -> Path:
    """Write the benchmark's federation config to ``path`` (folds one after another unless
    ``parallel_folds``) and return ``path``."""
    cfg = FederationConfig.model_validate(
        {
            "run": {"name": "bench-deploy", "seed": 1},
            "cv": {"folds": folds},
            "stages": {"fusion_rounds": fusion_rounds, "fusion_local_epochs": 2},
            "selection": {"top_k": 10, "rf_trees": 20},
            "federation": {
                "min_sites": 2,
                "round_timeout_s": 120,
                "parallel_folds": parallel_folds,
            },
            "strategy": {"secure_aggregation": secure_aggregation},
        }
    )
    path.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def field_bytes(field: dict) -> int:
    """Bytes of one received field: as described, or for SecAgg+'s masked vector its values at
    8 bytes each (the key exchange is not counted)."""
    return field["bytes"] if "bytes" in field else 8 * field["values"]


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``: user, nice,
    system, irq, softirq; every process, Flower's included)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def figures(out: Path, wall: float, cpu: float) -> dict[str, float]:
    """Message rounds, seconds per round and bytes per site per round from received.jsonl,
    beside the run's wall and machine CPU seconds."""
    entries = [json.loads(line) for line in (out / "received.jsonl").read_text().splitlines()]
    asks = {(e["route"], e["fold"], e["round"]) for e in entries}
    sizes = [sum(field_bytes(f) for f in e["fields"].values()) for e in entries]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "message_rounds": len(asks),
        "s_per_round": wall / max(len(asks), 1),
        "bytes_per_site_round": sum(sizes) / max(len(sizes), 1),
        "replies": len(entries),
    }


def import_s(modules: str, repeats: int = 3) -> float:
    """Median wall seconds of a fresh interpreter importing ``modules`` (comma-separated)."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--sites", type=int, default=3)
    args.add_argument("--patients", type=int, default=60)
    args.add_argument("--out", type=Path, default=None)
    args.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="training rounds through SecAgg+ (4 Flower message rounds each)",
    )
    args.add_argument("--folds", type=int, default=2)
    args.add_argument("--fusion-rounds", type=int, default=2)
    args.add_argument(
        "--parallel-folds",
        type=int,
        default=1,
        help="also deploy with this many folds at once (their requests in batch messages)",
    )
    args.add_argument(
        "--site-lanes",
        type=int,
        default=None,
        help="each site's [compute] parallel_folds (default: --parallel-folds)",
    )
    opts = args.parse_args()
    root = opts.out or Path(tempfile.mkdtemp(prefix="fedmets-deploy-"))
    tomls = write_feature_sites(
        root / "sites", [opts.patients] * opts.sites, seed=3, folds=opts.folds
    )
    lanes = opts.site_lanes or opts.parallel_folds
    for toml in tomls:  # each site answers a batch's items that many at once (lanes)
        text = toml.read_text().replace("[compute]\n", f"[compute]\nparallel_folds = {lanes}\n")
        toml.write_text(text)
    fed = federation_toml(
        root / "federation.toml",
        secure_aggregation=opts.secure_aggregation,
        folds=opts.folds,
        fusion_rounds=opts.fusion_rounds,
    )
    results = {}

    tic, cpu = time.perf_counter(), machine_cpu_s()
    configs = [load_site_config(p) for p in tomls]
    run_flower_simulation(configs, fed, root / "simulation", lambda m: None)
    results["simulation"] = figures(
        root / "simulation" / "federated", time.perf_counter() - tic, machine_cpu_s() - cpu
    )

    sites = {cfg.site_id: path for cfg, path in zip(configs, tomls, strict=True)}
    with LoopbackFederation(root / "deployment", sites) as federation:
        federation.start_superlink()
        for site in sites:
            federation.register(site)
            federation.start_supernode(site)
        ways = {"deployment": fed}
        if opts.parallel_folds > 1:
            ways[f"{opts.parallel_folds} at once"] = federation_toml(
                root / "federation-at-once.toml",
                folds=opts.folds,
                parallel_folds=opts.parallel_folds,
                fusion_rounds=opts.fusion_rounds,
            )
        for way, toml in ways.items():
            out = root / "deployment" / way.replace(" ", "-")
            tic, cpu = time.perf_counter(), machine_cpu_s()
            run = federation.run(toml, out)
            if run.wait(timeout=3600) != 0:
                raise SystemExit(f"deployment run failed: see {root / 'deployment' / 'logs'}")
            results[way] = figures(out, time.perf_counter() - tic, machine_cpu_s() - cpu)

    print(f"{os.cpu_count()} CPUs; {opts.sites} sites x {opts.patients} patients; in {root}")
    print(
        f"{'':12s} {'wall s':>8s} {'CPU s':>8s} {'rounds':>7s} {'s/round':>8s}"
        f" {'kB/site/round':>14s}"
    )
    for way, r in results.items():
        print(
            f"{way:12s} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['message_rounds']:>7d}"
            f" {r['s_per_round']:>8.2f} {r['bytes_per_site_round'] / 1e3:>14.1f}"
        )
    extra = results["deployment"]["s_per_round"] - results["simulation"]["s_per_round"]
    print(f"deployment overhead per message round: {extra:.2f} s (a ClientApp process per message)")
    relay = import_s("fedmets.client.client_app")
    print(f"ClientApp (relay) import in a fresh process: {relay:.2f} s (median of 3)")


if __name__ == "__main__":
    main()
