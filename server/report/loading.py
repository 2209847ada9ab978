"""Reading a run folder: the results of a simulation (``RUN/metrics.json``) or of a deployed run's
server output (``federated.json``) in the one shape the report's sections and figures read."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from fedmets.server.results import SimulationResults, typed

# the settings whose pooled results every simulation run holds, in the page's order
SETTINGS = ("federated", "centralized")


def load_run(run_dir: Path) -> tuple[dict, list[Path]]:
    """The run's results in the shape of ``metrics.json`` and the files they came from.

    ``run_dir/metrics.json`` (a simulation) wins; else ``run_dir/federated.json`` or
    ``run_dir/federated/federated.json`` (a deployed run's server output), whose main model's
    pooled and per-site results become ``federated.pooled`` / ``per_site``. Keys that only
    ``federated.json`` holds (a privacy ledger, DP results) are taken from it too."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = f"a file, not a run folder (give {run_dir.parent})" if run_dir.exists() else None
        raise FileNotFoundError(f"{run_dir}: {what or 'folder not found'}")
    metrics_file = run_dir / "metrics.json"
    server_files = [run_dir / "federated.json", run_dir / "federated" / "federated.json"]
    server_file = next((f for f in server_files if f.is_file()), None)
    if metrics_file.is_file():
        metrics = _read(metrics_file)
        if "federated" not in metrics and "threshold_rule" in (metrics.get("config") or {}):
            raise ValueError(
                f"{metrics_file}: the results of `fedmets study`, not of a federated run: its "
                "figures (roc.png, calibration.png, ablation.png) and tables are in "
                f"{run_dir} already; `fedmets report` reads a `fedmets simulate` run or a "
                "server output folder"
            )
        sources = [metrics_file]
        if server_file is not None:
            server = _read(server_file)
            if "privacy" in server and "privacy_ledger" not in metrics:
                metrics["privacy_ledger"] = server["privacy"]
            for key in ("dp", "run", "backbone"):
                if key in server and key not in metrics:
                    metrics[key] = server[key]
            sources.append(server_file)
        try:
            return typed(SimulationResults, metrics), sources
        except ValidationError as error:  # one line, naming the keys (pydantic's has many)
            keys = [".".join(map(str, e["loc"])) + f" ({e['msg'].lower()})" for e in error.errors()]
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ValueError(
                f"{metrics_file}: not the results of a run: {'; '.join(keys[:3])}{more}"
            ) from error
    if server_file is None:
        _raise_if_failed(run_dir)
        raise FileNotFoundError(
            f"{run_dir}: neither metrics.json (a simulation run) nor federated.json "
            "(a server output folder) found"
        )
    server = _read(server_file)
    main_model = server.get("main_model")
    models = server.get("models") or {}
    main = models.get(main_model, {})
    federated = {
        "pooled": main.get("pooled"),
        "per_site": main.get("per_site"),
        "models": models,
        "folds": server.get("folds") or [],
        "timing_s": server.get("timing_s") or {},
        "importance": server.get("importance"),
        "selection_stability": server.get("selection_stability"),
    }
    metrics = {
        key: value
        for key, value in server.items()
        if key
        not in {
            "models",
            "folds",
            "timing_s",
            "config",
            "privacy",
            "importance",
            "selection_stability",
        }
    }
    if "privacy" in server:  # the ServerApp's name for the privacy ledger report
        metrics["privacy_ledger"] = server["privacy"]
    metrics.update(
        federated=federated,
        config={"federation": server.get("config") or {}},
        timing_s=server.get("timing_s") or {},
    )
    return typed(SimulationResults, metrics), [server_file]


def _raise_if_failed(run_dir: Path) -> None:
    """ValueError with the first line of the ``error.txt`` the ServerApp wrote in ``run_dir``
    (or its ``federated/``) when the run stopped with no results."""
    files = [run_dir / "error.txt", run_dir / "federated" / "error.txt"]
    error_file = next((f for f in files if f.is_file()), None)
    if error_file is None:
        return
    lines = error_file.read_text(encoding="utf-8", errors="replace").splitlines()
    first = next((line.strip() for line in lines if line.strip()), "no reason given")
    raise ValueError(
        f"{run_dir}: the run failed and wrote no results: {first} (all of it in {error_file},"
        f" the server's log in {error_file.parent / 'server.log'}; fix that, then run again or"
        " resume it: docs/deployment.md)"
    )


def _read(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value
