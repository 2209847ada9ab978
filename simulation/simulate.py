"""`fedmets simulate`: the whole federated protocol with every site of a cohort in Flower's
simulation engine, then the same pipeline centralised (all sites pooled into one) and local-only
(each site alone), and one metrics file comparing them.

Steps, for ``simulate(cohort, preset, out)``:

1. every site of ``cohort`` (``*/site.toml``) is extracted if its features are missing;
2. ``OUT/federation.toml`` is written from the preset (or the given federation config);
3. a SuperLink in simulation mode is started on free loopback ports with ``FLWR_HOME=OUT/
   flwr-home`` and runtime dependency installation off; ``flwr run`` submits this app with one
   simulated SuperNode per site (``site-configs`` in the run config); the ServerApp writes
   ``OUT/federated/federated.json``; the SuperLink is stopped afterwards, whatever happened;
4. the same ``fedmets.server.protocol.FederatedProtocol`` runs over one pooled worker
   (``centralized``) and over each site alone (``local_only``), side by side in worker
   processes (:func:`run_baselines`);
5. ``OUT/metrics.json`` and ``OUT/summary.txt``.

Everything is seeded by the federation config's ``[run] seed``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import tomli_w
import torch

from fedmets.client.site_files import FEATURES_FILE
from fedmets.client.site_worker import SiteWorker
from fedmets.server.app_folder import write_app_folder
from fedmets.server.protocol import FederatedProtocol, ProtocolError, main_model
from fedmets.server.results import SimulationResults, to_jsonable, typed
from fedmets.shared.config import (
    FederationConfig,
    SiteConfig,
    load_federation_config,
    load_site_config,
)
from fedmets.shared.files import write_json, write_text
from fedmets.shared.harmonisation import MIN_OWN_BATCH
from fedmets.simulation.holdout import held_out_validation, leave_one_site_out
from fedmets.simulation.in_process import InProcessLink, drain_progress, run_in_process
from fedmets.simulation.loopback import (
    flower_bin,
    flower_env,
    free_port,
    stop_process,
    wait_for_port,
)
from fedmets.simulation.site_effect import site_effect

_DEMO = {
    "stages": {"image_rounds": 5, "local_epochs": 2, "fusion_rounds": 30, "fusion_local_epochs": 3},
    "model": {"fusion_lr": 3e-3},  # at 1e-3 the clinical net was still improving at round 30
    "cv": {"folds": 5},
}
PRESETS: dict[str, dict[str, Any]] = {
    # Plumbing: seconds per fold on 2 cores.
    "tiny": {
        "federation": {"min_patients": 3, "min_sites": 1},
        "stages": {"image_rounds": 2, "fusion_rounds": 6, "fusion_local_epochs": 3},
        "cv": {"folds": 3},
        "selection": {"top_k": 10, "rf_trees": 20},
        "model": {"fusion_hidden": [16]},
    },
    # The demo cohort (400 patients, 4 sites) on 2 CPU cores.
    "demo": _DEMO,
    # The quickstart cohort (240 patients, 4 sites, 3 folds): the README's main job, the demo's
    # training on 3 folds.
    "quickstart": {**_DEMO, "cv": {"folds": 3}},
    # The demo's networks on its native 64^3 crops, 24 image epochs (the epoch kept in 14 of
    # the 15 folds of 40-epoch runs, docs/study.md): a GPU's study.
    "paper": {
        **_DEMO,
        "stages": {**_DEMO["stages"], "image_rounds": 12},
        "model": {**_DEMO["model"], "image_preset": "paper", "image_lr": 2e-4},
    },
    # GPU sites: the published Swin UNETR encoder at 96^3, two sites per GPU.
    "gpu": {
        "stages": {"image_rounds": 20, "local_epochs": 3, "fusion_rounds": 30},
        "model": {"image_preset": "gpu", "image_lr": 1e-4, "image_batch": 16},
        "simulation": {"gpus_per_site": 0.5},
    },
}
"""Federation settings per preset, on top of ``FederationConfig``'s defaults."""

DEFAULT_SEED = 7
"""The ``[run] seed`` of a preset's federation config."""


def federation_config(preset: str, name: str, seed: int = DEFAULT_SEED) -> FederationConfig:
    """The preset's federation config with run name ``name`` and ``[run] seed`` ``seed``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    data = json.loads(json.dumps(PRESETS[preset]))
    data["run"] = {"name": name, "seed": seed}
    return FederationConfig.model_validate(data)


def with_seed(fed: FederationConfig, seed: int | None) -> FederationConfig:
    """``fed`` with ``[run] seed`` ``seed`` (the command line's ``--seed``); as it is for None."""
    if seed is None:
        return fed
    return fed.model_copy(update={"run": fed.run.model_copy(update={"seed": seed})})


def site_configs(cohort: Path) -> list[SiteConfig]:
    """The cohort's site configs (``*/site.toml``, sorted)."""
    paths = sorted(Path(cohort).glob("*/site.toml"))
    if not paths:
        raise ValueError(f"no site configs (*/site.toml) under {cohort}")
    return [load_site_config(p) for p in paths]


def extract_missing(
    configs: Sequence[SiteConfig],
    workers: int | None = None,
    say: Callable[[str], None] | None = None,
) -> list[str]:
    """Extract each site whose ``features.parquet`` is missing; the ids of those extracted.
    ``say`` is told before each site, its progress (at most every
    :data:`EXTRACTION_PROGRESS_S`) and then its counts with every quarantined or failed patient.
    PyRadiomics and SimpleITK are imported only then: the study, which imports this module,
    runs on machines without them (benchmarks/gpu_check.sh)."""
    missing = [cfg for cfg in configs if not (cfg.paths.output / FEATURES_FILE).is_file()]
    if missing:
        from fedmets.client.extract import extract_site
    for cfg in missing:
        if say is None:
            extract_site(cfg, workers)
            continue
        say(f"extracting {cfg.site_id} (features missing)")
        report = extract_site(cfg, workers, _extraction_progress(cfg.site_id, say))
        counts = report["counts"]
        say(
            f"  {cfg.site_id}: {counts['extracted'] + counts['cached']} patients with features,"
            f" {counts['quarantined']} quarantined, {counts['failed']} failed"
            f" ({cfg.paths.output / 'extraction_report.json'})"
        )
        for patient, reasons in report["quarantined"].items():
            say(f"  quarantined: patient {patient}: {'; '.join(reasons)}")
        for patient, failure in report["failed"].items():
            say(f"  failed: patient {patient}: {failure['message']}")
    return [cfg.site_id for cfg in missing]


EXTRACTION_PROGRESS_S = 30.0
"""A site's extraction progress line comes at most this often (besides its first and last)."""


def _extraction_progress(site_id: str, say: Callable[[str], None]) -> Callable[[int, int], None]:
    """``on_patient_done`` of a site's extraction: a line ``site: done/total patients`` at
    most every :data:`EXTRACTION_PROGRESS_S` seconds, and the last."""
    shown_at = -EXTRACTION_PROGRESS_S

    def done(count: int, total: int) -> None:
        nonlocal shown_at
        if count == total or time.monotonic() - shown_at >= EXTRACTION_PROGRESS_S:
            shown_at = time.monotonic()
            say(f"  {site_id}: {count}/{total} patients")

    return done


def run_name(out: Path) -> str:
    """The run name a preset's run takes from its folder ``out``: lower case, every character
    a run name may not hold (``[run] name``: a-z, 0-9, _ and -) a ``-``, at most 32; a name
    too short for the rule is ``simulation``."""
    name = re.sub(r"[^a-z0-9_-]", "-", out.name.lower()).strip("-_")[:32]
    return name if len(name) > 1 else "simulation"


def simulate(
    cohort: Path,
    out: Path,
    preset: str = "demo",
    config: Path | None = None,
    seed: int | None = None,
    workers: int | None = None,
    baselines: bool = True,
    log: Callable[[str], None] = print,
    gpus_per_site: float | None = None,
    holdout: Sequence[str] = (),
    loso: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run the federated simulation and the baselines; write and return ``OUT/metrics.json``.
    ``seed`` replaces the federation config's ``[run] seed`` (default: the config's, or
    :data:`DEFAULT_SEED` with a preset); ``gpus_per_site`` its ``[simulation] gpus_per_site``.
    ``holdout``: also train without those sites and validate the final model at them
    (``metrics.json`` key ``holdout``); ``loso``: that for each site in turn (key ``loso``;
    ``fedmets.simulation.holdout``). ValueError, before anything is written, when ``out``
    holds a run already (``metrics.json`` or ``federated/``) and not ``overwrite``, a
    held-out site is not in the cohort or too few sites would train without the held-out ones,
    or a site's ``[policy] folds`` is not ``[cv] folds``."""
    started = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a run folder")
    earlier = [p.name for p in (out / "metrics.json", out / "federated") if p.exists()]
    if earlier and not overwrite:
        raise ValueError(
            f"{out} holds a run already ({', '.join(earlier)}): another --out, or --overwrite "
            "to replace it"
        )
    fed = with_seed(
        load_federation_config(config) if config else federation_config(preset, run_name(out)),
        seed,
    )
    if gpus_per_site is not None:
        data = fed.model_dump(mode="json")
        data["simulation"]["gpus_per_site"] = gpus_per_site
        fed = FederationConfig.model_validate(data)
    _check_gpus(fed.simulation.gpus_per_site)
    configs = site_configs(cohort)
    unknown = sorted(set(holdout) - {c.site_id for c in configs})
    if unknown:
        raise ValueError(f"--holdout: sites not in the cohort {cohort}: {', '.join(unknown)}")
    left = {"--holdout": len(configs) - len(set(holdout))} if holdout else {}
    if loso:
        left["--loso"] = len(configs) - 1
    for option, training in left.items():  # found by the validation after the whole run
        if training < fed.federation.min_sites:
            raise ValueError(
                f"{option}: {training} of the cohort's {len(configs)} sites would train, fewer "
                f"than [federation] min_sites = {fed.federation.min_sites}"
            )
    other_folds = [c for c in configs if c.policy.folds != fed.cv.folds]
    if other_folds:  # the run's census would refuse them, after extraction and Flower's start
        raise ValueError(
            f"sites {', '.join(c.site_id for c in other_folds)} cross-validate with "
            f"{other_folds[0].policy.folds} folds ([policy] folds in "
            f"{other_folds[0].source}), the run with {fed.cv.folds} ([cv] folds of "
            f"{config or f'the {preset} preset'}): set the same number in both"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "summary.txt"):  # of the run being replaced
        (out / stale).unlink(missing_ok=True)
    for stale in ("report", "holdout", "loso"):  # its held-out sites' bundles among them
        shutil.rmtree(out / stale, ignore_errors=True)
    extract_missing(configs, workers, log)
    _check_held_out_batches(configs, fed, holdout, loso)
    fed_path = out / "federation.toml"
    fed_path.write_text(
        tomli_w.dumps(fed.model_dump(mode="json", exclude_none=True)), encoding="utf-8"
    )
    timing = {}

    tic = time.perf_counter()
    federated = run_flower_simulation(configs, fed_path, out, log)
    timing["federated"] = time.perf_counter() - tic
    metrics: dict[str, Any] = {
        "config": {
            "cohort": str(Path(cohort).resolve()),
            "preset": None if config else preset,
            "federation": fed.model_dump(mode="json"),
            "sites": [c.site_id for c in configs],
        },
        "oracle_auc": _oracle(Path(cohort)),
        "main_model": federated["main_model"],
        "app_sha256": federated["app_sha256"],
        "federated": _summary(federated),
        "census": federated["census"],
        "dropouts": federated["dropouts"],
        "privacy_ledger": federated["privacy"],
        "site_effect": site_effect(configs, federated["run"], federated["folds"]),
    }
    if baselines:
        tic = time.perf_counter()
        log(
            "baselines: the same protocol on all sites pooled (centralised) and on each site alone "
            "(local-only), side by side in worker processes"
        )
        centralized, local, not_run, logistic = run_baselines(configs, fed, out, log)
        timing["baselines"] = time.perf_counter() - tic
        metrics["centralized"] = centralized
        metrics["baselines"] = {"logistic": _logistic_summary(logistic)}
        main = federated["main_model"]
        metrics["local_only"] = {
            "per_site": {s: r["models"][main]["pooled"] for s, r in local.items()},
            "models": {s: r["models"] for s, r in local.items()},
            "timing_s": {s: r["timing_s"] for s, r in local.items()},
            "not_run": not_run,
        }
        metrics["ablation"] = {
            m: {
                "federated": federated["models"][m]["pooled"],
                "centralized": centralized["models"][m]["pooled"],
            }
            for m in federated["models"]
        }
    if holdout:
        tic = time.perf_counter()
        log(f"held-out-site validation: trained without {', '.join(holdout)}")
        metrics["holdout"], _ = held_out_validation(configs, fed, holdout, out / "holdout", log)
        timing["holdout"] = time.perf_counter() - tic
    if loso:
        tic = time.perf_counter()
        metrics["loso"] = leave_one_site_out(configs, fed, out / "loso", log)
        timing["loso"] = time.perf_counter() - tic
    timing["total"] = time.perf_counter() - started
    metrics["timing_s"] = {k: round(v, 1) for k, v in timing.items()}
    metrics = typed(SimulationResults, to_jsonable(metrics))
    write_json(out / "metrics.json", metrics, indent=1)
    write_text(out / "summary.txt", summary_text(metrics))
    return metrics


def run_baselines(
    configs: list[SiteConfig],
    fed: FederationConfig,
    out: Path,
    log: Callable[[str], None] = print,
) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """The centralised baseline (every site's patients in one worker, each keeping its site's
    fold) and the local-only baselines (each site alone), as protocol summaries: (centralised,
    {site: local-only}, {site: why it could not run alone}).

    They are independent, so they run side by side in worker processes (spawned; as many as
    CPU cores, at most one per baseline), each with ``cores // processes`` torch threads: on 2
    cores the centralised run beside the four local-only runs in turn, one thread each, which
    costs less than the two in a row on two threads each. The centralised run logs its
    progress through ``log`` as it goes; local-only runs say when each is done."""
    every = [c.source for c in configs]
    tasks = [("centralized", every), (LOGISTIC_FEDERATED, every), (LOGISTIC_CENTRALIZED, every)]
    for cfg in sorted(configs, key=_patients, reverse=True):
        tasks.append((cfg.site_id, [cfg.source]))
    cores = os.cpu_count() or 1
    processes = max(1, min(cores, len(tasks)))
    threads = max(1, cores // processes)
    data = fed.model_dump(mode="json")
    local: dict[str, dict] = {}
    not_run: dict[str, str] = {}
    centralized: dict = {}
    logistic: dict[str, dict] = {}
    spawn = multiprocessing.get_context("spawn")
    progress = spawn.Queue()  # the centralised run's log lines, as they come
    with ProcessPoolExecutor(
        processes,
        mp_context=spawn,
        initializer=_start_baseline_process,
        initargs=(threads, progress),
    ) as pool:
        pending = {pool.submit(_baseline, kind, tomls, data, out): kind for kind, tomls in tasks}
        try:
            while pending:
                done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                drain_progress(progress, log)
                for job in done:
                    kind = pending.pop(job)
                    outcome = job.result()
                    if kind == "centralized":
                        centralized = outcome
                    elif kind in (LOGISTIC_FEDERATED, LOGISTIC_CENTRALIZED):
                        logistic[kind.removeprefix("logistic-")] = outcome
                        log(f"logistic baseline ({kind.removeprefix('logistic-')}) done")
                    elif isinstance(outcome, str):  # too small to train alone under its policy
                        not_run[kind] = outcome
                        log(f"local-only baseline: {kind} alone cannot run: {outcome}")
                    else:
                        local[kind] = outcome
                        log(f"local-only baseline: {kind} done")
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM made one: the baselines stop too
            workers = multiprocessing.active_children()
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.join(timeout=5)
                if worker.is_alive():  # SIGTERM not acted on yet (seen once on a busy CI)
                    worker.kill()
                    worker.join()
            # the pool's manager thread reaps the workers too: whichever thread's waitpid
            # loses sees no child and leaves the worker listed as running until the other
            # records its exit, so wait for that thread (seen once on a busy CI)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    drain_progress(progress, log)
    return centralized, dict(sorted(local.items())), not_run, logistic


LOGISTIC_FEDERATED, LOGISTIC_CENTRALIZED = "logistic-federated", "logistic-centralized"
LOGISTIC_WEIGHT_DECAY = 1e-2
"""The plain logistic baseline's weight decay (AdamW's decoupled decay: a shrinkage like,
but not the same as, an L2 penalty in the loss)."""


def logistic_config(fed: FederationConfig) -> FederationConfig:
    """The plain baseline of ``fed``: the same protocol, selection, harmonisation and clinical
    encoding, with a logistic regression (a fusion network without hidden layers, shrunk by AdamW's
    weight decay, no dropout, no choice of the main model's network) for the fusion network and no
    image stage or final model."""
    data = fed.model_dump(mode="json")
    data["model"] |= {
        "fusion_hidden": [],
        "fusion_dropout": 0.0,
        "fusion_group_dropout": 0.0,
        "fusion_members": 1,
        "fusion": "joint",
        "fusion_weight_decay": LOGISTIC_WEIGHT_DECAY,
        "main_radiomics": [],
        "main_hidden": [],
    }
    data["stages"] |= {"image": False, "final_model": False}
    data["strategy"]["secure_aggregation"] = False
    return FederationConfig.model_validate(data)


def _logistic_summary(logistic: dict[str, dict]) -> dict:
    """The logistic baseline's main model (radiomics + clinical, or radiomics alone), pooled
    metrics federated and centralised, as ``metrics.json`` ``baselines.logistic`` holds them."""
    federated = logistic["federated"]
    model = main_model(list(federated["models"]))
    return {
        "model": model,
        "weight_decay": LOGISTIC_WEIGHT_DECAY,
        **{kind: r["models"][model]["pooled"] for kind, r in logistic.items()},
    }


def _check_held_out_batches(
    configs: Sequence[SiteConfig], fed: FederationConfig, holdout: Sequence[str], loso: bool
) -> None:
    """ValueError, before the run, when ComBat harmonises and a site to hold out has fewer
    labelled patients than a held-out site's own batch needs (found after the run, else)."""
    if fed.harmonisation.method != "combat":
        return
    held = [c for c in configs if loso or c.site_id in holdout]
    counts = {c.site_id: _labelled(c) for c in held}
    small = [f"{site} has {n}" for site, n in counts.items() if n < MIN_OWN_BATCH]
    if small:
        raise ValueError(
            f'{"--loso" if loso else "--holdout"}: with [harmonisation] method = "combat" a'
            f" held-out site's own ComBat batch is fitted on its labelled patients, at least"
            f" {MIN_OWN_BATCH}: {', '.join(small)}"
        )


def _labelled(cfg: SiteConfig) -> int:
    """Labelled patients of a site's feature table."""
    labels = pq.read_table(cfg.paths.output / FEATURES_FILE, columns=["label"])["label"]
    return len(labels) - labels.null_count


def _patients(cfg: SiteConfig) -> int:
    """Rows of a site's feature table (its size, for ordering the baselines)."""
    return pq.ParquetFile(cfg.paths.output / FEATURES_FILE).metadata.num_rows


_PROGRESS: Any = None
"""In a baseline worker process: the queue its centralised run logs to."""


def _start_baseline_process(threads: int, progress: Any) -> None:
    global _PROGRESS
    torch.set_num_threads(threads)
    _PROGRESS = progress


def _baseline(kind: str, site_tomls: list[Path], federation: dict, out: Path) -> dict | str:
    """One baseline in a worker process: ``kind`` "centralized" (the sites of ``site_tomls``
    pooled; its progress goes to the parent's log) or a site id (that site alone, quietly).
    Returns its summary or, for a site that cannot train alone, the protocol's error text."""
    configs = [load_site_config(p) for p in site_tomls]
    fed = FederationConfig.model_validate(federation)
    if kind == LOGISTIC_FEDERATED:  # one worker per site, in process
        state = out / "logistic-state"
        workers = {
            c.site_id: SiteWorker([c], state_root=state / c.site_id, ledger_root=state / c.site_id)
            for c in configs
        }
        link = InProcessLink(workers)
        protocol = FederatedProtocol(
            link, logistic_config(fed), f"{fed.run.name}-logistic", privacy_dir=state / "server"
        )
        return _summary(protocol.run_all())
    if kind == LOGISTIC_CENTRALIZED:
        kind, fed = "centralized-logistic", logistic_config(fed)
    if kind.startswith("centralized"):
        state, run = out / f"{kind}-state", f"{fed.run.name}-{kind}"
    else:
        state, run = out / "local-state" / kind, f"{fed.run.name}-local"
    worker = SiteWorker(configs, state_root=state, ledger_root=state)
    try:
        return _summary(
            run_in_process(
                worker, fed, run, state, _PROGRESS.put if kind == "centralized" else None
            )
        )
    except ProtocolError as error:
        if kind.startswith("centralized"):
            raise
        return str(error)


def _summary(result: dict) -> dict:
    """A protocol result as metrics.json holds it: the main model's pooled and per-site
    metrics up front, every model below."""
    main = result["main_model"]
    return {
        "pooled": result["models"][main]["pooled"],
        "per_site": result["models"][main]["per_site"],
        "models": result["models"],
        "folds": result["folds"],
        "selection_stability": result.get("selection_stability"),
        "importance": result.get("importance"),
        "timing_s": result["timing_s"],
    }


def _oracle(cohort: Path) -> float | None:
    path = cohort / "ground_truth" / "oracle.json"
    return json.loads(path.read_text(encoding="utf-8")).get("pooled") if path.is_file() else None


# ---- Flower ------------------------------------------------------------------------------------


def _check_gpus(gpus_per_site: float) -> None:
    """ValueError when sites are to get a GPU share and this machine has no GPU (Ray would
    wait for one forever)."""
    if gpus_per_site > 0:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"gpus_per_site {gpus_per_site:g}: no CUDA GPU on this machine; use 0 (CPU)"
            )


def simulation_resources(sites: int, gpus_per_site: float) -> str:
    """Flower's ``--federation-config`` for ``sites`` simulated SuperNodes: one CPU each and,
    when ``gpus_per_site`` > 0, that share of a GPU (Ray then shows each ClientApp its GPU, so a
    site's ``device = "auto"`` trains there; with none, Ray hides every GPU from the sites)."""
    resources = f"num-supernodes={sites} client-resources-num-cpus=1"
    if gpus_per_site > 0:
        resources += f" client-resources-num-gpus={gpus_per_site:g}"
    return resources


def run_flower_simulation(
    configs: list[SiteConfig], fed_path: Path, out: Path, log: Callable[[str], None]
) -> dict:
    """Start a simulation SuperLink (owned by this call), ``flwr run`` the app with one
    SuperNode per site, stop the SuperLink; return ``OUT/federated/federated.json``."""
    home = out / "flwr-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    port = free_port()  # one port serves the Fleet, Control and Runtime APIs
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n",
        encoding="utf-8",
    )
    env = flower_env(home)
    result_dir = out / "federated"
    shutil.rmtree(result_dir, ignore_errors=True)
    link_log = (out / "superlink.log").open("w", encoding="utf-8")
    superlink = subprocess.Popen(
        [
            flower_bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(home / "state.db"),
        ],
        env=env,
        stdout=link_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    process = None
    try:
        wait_for_port(port, superlink)
        run_config = (
            f"federation-config='{fed_path}' out='{result_dir}' "
            f"site-configs='{','.join(str(c.source) for c in configs)}'"
        )
        fed = load_federation_config(fed_path)
        federation_config = simulation_resources(len(configs), fed.simulation.gpus_per_site)
        command = [
            flower_bin("flwr"),
            "run",
            str(write_app_folder(home / "submitted-app")),
            "sim",
            "--run-config",
            run_config,
            "--federation-config",
            federation_config,
            "--stream",
        ]
        log(f"flwr run: {len(configs)} simulated SuperNodes, FLWR_HOME={home}")
        with (out / "flwr-run.log").open("w", encoding="utf-8") as run_log:
            process = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for line in process.stdout:
                run_log.write(line)
                if "[fedmets]" in line:
                    log(line.split("[fedmets]", 1)[1].strip())
            process.wait()
        result = result_dir / "federated.json"
        if not result.is_file():
            error = result_dir / "error.txt"
            reason = error.read_text(encoding="utf-8").strip() if error.is_file() else ""
            where = reason or f"see {out / 'flwr-run.log'}"
            raise RuntimeError(f"the federated run wrote no results ({where})")
        return json.loads(result.read_text(encoding="utf-8"))
    finally:  # also when stopped (Ctrl-C; SIGTERM, which `fedmets simulate` turns into Ctrl-C)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stop_process(superlink)
        link_log.close()


# ---- summary -----------------------------------------------------------------------------------


def _fmt(metrics: dict | None) -> str:
    if not metrics or metrics.get("auc") is None:
        return "n/a"
    ci = metrics.get("auc_ci") or (None, None)
    ci_text = f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci[0] is not None else ""
    parts = [f"AUC {metrics['auc']:.3f}{ci_text}"]
    for key in ("acc", "sen", "spe"):
        if metrics.get(key) is not None:
            parts.append(f"{key.upper()} {metrics[key]:.3f}")
    return ", ".join(parts)


def _stages(result: dict) -> str:
    """A protocol run's seconds per stage (summed over folds), as text."""
    return ", ".join(f"{k} {v:.0f}" for k, v in result["timing_s"].items() if k != "total")


def _calibration(metrics: dict | None) -> str:
    """ ", calibration slope S, intercept I" of a held-out site, or nothing."""
    if not metrics or metrics.get("calibration_slope") is None:
        return ""
    return (
        f", calibration slope {metrics['calibration_slope']:.2f},"
        f" intercept {metrics['calibration_intercept']:.2f}"
    )


def _oracle_text(auc: float | None) -> str:
    """The synthetic cohort's oracle AUC, or why there is none."""
    return "unknown (not a synthetic cohort)" if auc is None else f"{auc:.3f}"


def summary_text(metrics: dict) -> str:
    """The human summary of a simulation's metrics.json."""
    main = metrics["main_model"]
    lines = [
        f"fedmets simulation: {len(metrics['config']['sites'])} sites, model {main}",
        f"oracle AUC (true risk, pooled): {_oracle_text(metrics['oracle_auc'])}",
        f"federated   pooled: {_fmt(metrics['federated']['pooled'])}",
    ]
    if "centralized" in metrics:
        lines.append(f"centralised pooled: {_fmt(metrics['centralized']['pooled'])}")
    logistic = (metrics.get("baselines") or {}).get("logistic")
    if logistic:
        lines.append(f"logistic baseline ({logistic['model']}):")
        for kind in ("federated", "centralized"):
            lines.append(f"  {kind:11s} {_fmt(logistic.get(kind))}")
    stability = metrics["federated"].get("selection_stability")
    if stability and stability["mean_jaccard"] is not None:
        lines.append(
            f"selected radiomics across folds: mean Jaccard {stability['mean_jaccard']:.2f}, "
            f"{stability['in_every_fold']} in every fold, {stability['in_any_fold']} in any"
        )
    effect = metrics.get("site_effect")
    if effect:
        after = "n/a (not harmonised)" if effect["after"] is None else f"{effect['after']:.3f}"
        lines.append(
            f"site effect (site classifier AUC on the selected features): before "
            f"{effect['before']:.3f}, after harmonisation {after}"
        )
    lines.append("per site (federated model | the site alone):")
    for site in metrics["config"]["sites"]:
        local = metrics.get("local_only", {}).get("per_site", {}).get(site)
        lines.append(
            f"  {site:14s} {_fmt(metrics['federated']['per_site'].get(site))} | {_fmt(local)}"
        )
    if "ablation" in metrics:
        lines.append("ablation (pooled AUC, federated | centralised):")
        for model, row in metrics["ablation"].items():
            fed, cen = row["federated"] or {}, row["centralized"] or {}
            lines.append(f"  {model:34s} {fed.get('auc') or 0:.3f} | {cen.get('auc') or 0:.3f}")
    if metrics.get("holdout"):
        held = metrics["holdout"]
        lines.append(
            f"held out ({', '.join(held['held_out'])}; trained on "
            f"{', '.join(held['training_sites'])}, cross-validated "
            f"{_fmt(held['cross_validated'])}):"
        )
        for site, result in held["per_site"].items():
            lines.append(f"  {site:14s} {_fmt(result)}{_calibration(result)}")
    if metrics.get("loso"):
        lines.append("leave one site out (held-out site | cross-validated without it):")
        for site, result in metrics["loso"]["per_site"].items():
            trained = metrics["loso"]["runs"][site]["cross_validated"]
            lines.append(f"  {site:14s} {_fmt(result)}{_calibration(result)} | {_fmt(trained)}")
        lines.append(f"  {'pooled':14s} {_fmt(metrics['loso']['pooled'])}")
    if metrics.get("dropouts"):
        lines.append(f"dropouts: {len(metrics['dropouts'])}")
    lines.append("time (s):")
    timing = metrics["timing_s"]
    for part, seconds in timing.items():
        lines.append(f"  {part:10s} {seconds:7.1f}")
        if part == "federated":
            lines[-1] += f"  ({_stages(metrics['federated'])})"
        elif part == "baselines":
            local = (metrics.get("local_only") or {}).get("timing_s") or {}
            lines[-1] += (
                f"  side by side: centralised {metrics['centralized']['timing_s']['total']:.0f}"
                f" ({_stages(metrics['centralized'])}); local-only "
                + ", ".join(f"{site} {t['total']:.0f}" for site, t in local.items())
            )
    return "\n".join(lines) + "\n"
