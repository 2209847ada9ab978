"""Scale of the simulation: the tiny federation preset on 4, 16 and 32 simulated sites.

    .venv/bin/python benchmarks/bench_scale.py [--sites 4 16 32] [--patients 60] [--out DIR]

Each site is a synthetic tabular site of ``--patients`` patients
(``fedmets.simulation.feature_sites``: 60 radiomics-like columns + clinical, no extraction), so the
figures are the protocol's and Flower's own cost: wall time of the federated run (``fedmets simulate
--preset tiny --no-baselines``) and the peak resident memory summed over every process of the run
(this one, the SuperLink, ServerApp, Ray and its workers), sampled every 0.5 s from /proc.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from fedmets.simulation.feature_sites import write_feature_sites
from fedmets.simulation.simulate import simulate


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree_rss_mb(root: int) -> float:
    """Resident memory (MB) of ``root`` and all its descendants."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        stack += _children(pid)
    return total / 1024


class PeakMemory:
    """Samples :func:`tree_rss_mb` of this process in a thread; ``peak`` in MB."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peak, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(os.getpid()))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--sites", type=int, nargs="+", default=[4, 16, 32])
    args.add_argument("--patients", type=int, default=60)
    args.add_argument("--out", type=Path, default=None)
    opts = args.parse_args()
    root = opts.out or Path(tempfile.mkdtemp(prefix="fedmets-scale-"))
    print(f"{os.cpu_count()} CPUs; tiny preset, {opts.patients} patients per site; in {root}")
    print(f"{'sites':>5s} {'patients':>8s} {'wall s':>8s} {'s/site':>7s} {'peak MB':>8s}")
    for n in opts.sites:
        cohort = root / f"sites-{n}"
        write_feature_sites(cohort, [opts.patients] * n, seed=n, folds=3)
        tic = time.perf_counter()
        with PeakMemory() as memory:
            simulate(cohort, root / f"run-{n}", "tiny", baselines=False, log=lambda m: None)
        wall = time.perf_counter() - tic
        print(f"{n:>5d} {n * opts.patients:>8d} {wall:>8.1f} {wall / n:>7.2f} {memory.peak:>8.0f}")


if __name__ == "__main__":
    main()
