"""Repeated cross-validation (`fedmets study --repeats R`): the whole study run once per repeat
``k = 0 .. R - 1``, and a summary of how much each result moves with the split alone.

With ~40 events a single 5-fold split moves a pooled AUC by 0.02-0.03 (docs/study.md), as much
as the differences between the ablation models. Repeat ``k`` is an ordinary study
(``run_study(..., repeat=k)``: every site's folds drawn from its config seed + k, training
seeded with the run seed + k; repeat 0 keeps the sites' own folds) written to
``OUT/repeat-<k>/``; the summary ``OUT/repeats.json`` holds, per model, the pooled out-of-fold
AUC of every repeat, their mean and SD, and for each model of several groups its paired AUC
difference to each of its single-group models (DeLong, per repeat), their mean and the number of
repeats in which the fused model is the higher one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fedmets.shared.config import FederationConfig
from fedmets.simulation.study import StudySites, run_study

REPEATS_FILE = "repeats.json"


def run_repeated_study(
    sites: StudySites,
    fed: FederationConfig,
    out: Path,
    repeats: int,
    backbones: Sequence[str] = ("swin3d",),
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    parallel_folds: int = 1,
) -> dict:
    """Run ``run_study`` for repeats ``0 .. repeats - 1`` into ``out/repeat-<k>/``; write and
    return the ``summarise_repeats`` summary (``out/repeats.json``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    say = log or (lambda message: None)
    out = Path(out)
    runs = []
    for repeat in range(repeats):
        say(f"repeat {repeat + 1}/{repeats}")
        result = run_study(
            sites, fed, out / f"repeat-{repeat}", backbones, repeat, device, log, parallel_folds
        )
        runs.append(result.metrics)
    summary = summarise_repeats(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPEATS_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def summarise_repeats(runs: Sequence[dict]) -> dict:
    """Summary of study metrics dicts (one per fold seed, same models): per model the pooled
    AUCs, their mean, SD (ddof 1; 0 for one repeat), min and max; per fused model and single
    group the paired differences and p values, their mean and ``repeats_above`` (difference > 0)."""
    if not runs:
        raise ValueError("no study runs to summarise")
    keys = list(runs[0]["models"])
    for run in runs[1:]:
        if list(run["models"]) != keys:
            raise ValueError(f"repeats differ in their models: {keys} vs {list(run['models'])}")
    models = {}
    for key in keys:
        aucs = [run["models"][key]["pooled"]["auc"] for run in runs]
        entry = {"auc_per_repeat": aucs, **_auc_spread(aucs)}
        versus = runs[0]["models"][key].get("versus_single_groups", {})
        if versus:
            entry["versus_single_groups"] = {}
            for single in versus:
                tests = [run["models"][key]["versus_single_groups"][single] for run in runs]
                differences = [test["auc_difference"] for test in tests]
                entry["versus_single_groups"][single] = {
                    "difference_per_repeat": differences,
                    "p_per_repeat": [test["p"] for test in tests],
                    "difference_mean": float(np.mean(differences)),
                    "repeats_above": int(sum(d > 0 for d in differences)),
                }
        models[key] = entry
    first = runs[0]["config"]
    return {
        "repeats": len(runs),
        "seeds": [run["config"]["seed"] for run in runs],
        "folds": first["folds"],
        "n_patients": first["n_patients"],
        "positives": first["positives"],
        "oracle_auc_used": runs[0]["oracle_auc_used"],
        "models": models,
        "timing_s": {"total": round(sum(run["timing_s"]["total"] for run in runs), 1)},
    }


def _auc_spread(values: Sequence[float]) -> dict:
    """Mean, SD (ddof 1; 0 for one value), min and max of pooled AUCs."""
    array = np.asarray(values, dtype=float)
    return {
        "auc_mean": float(array.mean()),
        "auc_sd": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "auc_min": float(array.min()),
        "auc_max": float(array.max()),
    }
