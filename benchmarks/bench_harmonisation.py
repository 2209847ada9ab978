"""Harmonisation and the plain baseline over several CV seeds: ``fedmets simulate`` on a cohort with
``[harmonisation] method`` "none" and "combat", each seed a fresh run (the sites' folds and the
training draw from the seed). Prints, per method, the pooled AUC of the main model federated
and centralised and of the logistic baseline federated and centralised, and the site-classifier
AUC before and after harmonisation: mean and SD over the seeds, then every run.

Each run works on a fresh copy of the cohort's extracted features whose sites draw their folds
from that seed (a site's folds come from its own ``seed``, not the run's), with no released-set
history: the sites' differencing guard would rightly refuse a second cohort's worth of releases
on shifted folds.

    python benchmarks/bench_harmonisation.py data/centres --seeds 0 1 2 3 4 --out runs/harm

The real table split by centre (``data/centres``):
``fedmets split ../shared/data/real/head_neck_pet_ct_gtvp_radiomics_dm.csv --out data/centres
--scheme column --column centre --label Distant --id id``. The raw results (one metrics.json
per run) stay under ``--out``; the table goes to stdout and ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import tomli_w

from fedmets.simulation.simulate import federation_config, simulate

COLUMNS = {
    "main fed": ("federated", "pooled"),
    "main central": ("centralized", "pooled"),
    "logistic fed": ("baselines", "logistic", "federated"),
    "logistic central": ("baselines", "logistic", "centralized"),
}


def _auc(metrics: dict, path: tuple[str, ...]) -> float:
    for key in path:
        metrics = metrics[key]
    return float(metrics["auc"])


KEPT = ("features.parquet", "extraction_report.json")


def fresh_cohort(cohort: Path, dest: Path, seed: int) -> Path:
    """A copy of ``cohort``'s site configs and extracted features under ``dest``, the i-th site
    seeded ``100 * seed + i + 1``; nothing of earlier runs (caches, ledgers, released sets)."""
    for i, toml in enumerate(sorted(cohort.glob("*/site.toml"))):
        site = dest / toml.parent.name
        (site / "output").mkdir(parents=True)
        own = f"seed = {100 * seed + i + 1}"
        text = re.sub(r"(?m)^seed = \d+$", own, toml.read_text(encoding="utf-8"))
        (site / "site.toml").write_text(text, encoding="utf-8")
        for name in KEPT:
            if (toml.parent / "output" / name).is_file():
                shutil.copy2(toml.parent / "output" / name, site / "output" / name)
        for extra in toml.parent.iterdir():
            if extra.is_file() and extra.name != "site.toml":
                shutil.copy2(extra, site / extra.name)
    return dest


def _run(cohort: Path, out: Path, preset: str, method: str, seed: int) -> dict:
    """One simulation of ``method`` on a fresh copy of ``cohort`` seeded ``seed``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    copy = fresh_cohort(cohort, out / "cohort", seed)
    data = federation_config(preset, f"harm-{method}-{seed}", seed).model_dump(
        mode="json", exclude_none=True
    )
    data["harmonisation"]["method"] = method
    config = out / "federation-input.toml"
    config.write_text(tomli_w.dumps(data), encoding="utf-8")
    return simulate(copy, out, config=config, seed=seed, log=lambda _: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--methods", nargs="+", default=["none", "combat"])
    parser.add_argument("--out", type=Path, default=Path("runs/harmonisation"))
    parser.add_argument("--resume", action="store_true", help="read runs already finished")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            out = args.out / f"{method}-seed{seed}"
            if args.resume and (out / "metrics.json").is_file():
                metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
            else:
                metrics = _run(args.cohort, out, args.preset, method, seed)
            row = {"method": method, "seed": seed}
            row |= {name: _auc(metrics, path) for name, path in COLUMNS.items()}
            row["site AUC before"] = metrics["site_effect"]["before"]
            row["site AUC after"] = metrics["site_effect"]["after"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    names = [*COLUMNS, "site AUC before", "site AUC after"]
    print(f"\n{'method':8s} " + " ".join(f"{n:>17s}" for n in names))
    for method in args.methods:
        values = [r for r in rows if r["method"] == method]
        cells = []
        for name in names:
            column = [r[name] for r in values if r[name] is not None]
            cells.append(
                f"{np.mean(column):.3f} ± {np.std(column, ddof=1) if len(column) > 1 else 0:.3f}"
                if column
                else "n/a"
            )
        print(f"{method:8s} " + " ".join(f"{c:>17s}" for c in cells))


if __name__ == "__main__":
    main()
