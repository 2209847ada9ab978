"""`fedmets site extract`: radiomics features of every usable patient of a site, in parallel,
with a per-patient cache.

For each patient that ``fedmets.client.site_check.check_site`` passes: load
(``fedmets.client.ingest``), preprocess and crop (``fedmets.client.preprocess``), build the
peritumoral ring (``fedmets.client.peritumoral``), extract PyRadiomics features of tumour and ring
(``fedmets.client.radiomics_features``), save the deep crop. Patients run one per task on
``compute.workers`` processes (ITK single-threaded in each).

Outputs under ``paths.output``: ``features.parquet`` (one row per extracted patient: patient_id,
label, tumour_*, ring_*, then ``fedmets.shared.clinical.encoded_columns()``) and
``extraction_report.json`` (counts, reasons, timing). A patient that fails is recorded with its
stage, file and field and the run goes on; a worker process that dies is replaced and the
patients it held are retried alone.

Cache: ``paths.cache/extract/<patient>/`` holds ``features.json`` and ``crop.npz``, valid while
the cache key matches: sha256 of the CT and tumour-mask files, the parameter file, the extraction
settings (``[preprocess]``, margin, RTSTRUCT ROI pattern), the fedmets code version and the
PyRadiomics/SimpleITK versions. Entries are written atomically (temporary file + rename, JSON
last), so an interrupted run resumes where it stopped. A failure caused by the data (bad image,
empty ring, PyRadiomics rejecting a mask) is cached too and reported again without recomputing;
other failures (disk, memory, a dead worker) are retried on the next run.

Tabular mode (``data.mode = "tabular"``): the features come from the site's feature table
(``fedmets.client.tabular``), written in the same layout with the table's radiomics column names
instead of tumour_*/ring_*; no worker, no cache, no crop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import radiomics
import SimpleITK as sitk

import fedmets.shared
from fedmets.client.ingest import (
    PatientDataError,
    PatientRecord,
    load_patient_images,
    read_manifest,
    shown_path,
)
from fedmets.client.peritumoral import peritumoral_ring
from fedmets.client.preprocess import ImageContentError, prepare_patient, save_crop
from fedmets.client.radiomics_features import (
    REGIONS,
    SHAPE_REGIONS,
    extractor_for,
    params_file,
    regions_features,
    restricted_extractor,
    use_one_thread,
    wanted_features,
)
from fedmets.client.site_check import check_site
from fedmets.client.site_files import (
    CACHE_FOLDER,
    CROP_FILE,
    ENTRY_FILE,
    FEATURES_FILE,
    REPORT_FILE,
    entry_name,
)
from fedmets.client.tabular import load_feature_table
from fedmets.shared.clinical import encode_clinical
from fedmets.shared.config import SiteConfig
from fedmets.shared.files import check_writable, write_atomically

# The input a failure at each stage points at when the error itself names none.
_STAGE_FIELD = {
    "clinical": "clinical",
    "hash": "ct",
    "load": "ct",
    "preprocess": "ct",
    "ring": "tumour_mask",
    "radiomics": "tumour_mask",
    "cache": "paths.cache",
    "worker": "ct",
}
_IMAGE_FIELD = {"ct": "ct", "tumour": "tumour_mask"}


@dataclass(frozen=True)
class _Task:
    """One patient for a worker: its record, the site config and where its cache entry goes;
    ``features``: only these radiomics features (fedmets names), or every one of ``params``."""

    record: PatientRecord
    cfg: SiteConfig
    params: Path
    key: str
    entry: Path
    features: tuple[str, ...] | None = None


def extract_site(
    cfg: SiteConfig,
    workers: int | None = None,
    on_patient_done: Callable[[int, int], None] | None = None,
    on_patient_checked: Callable[[int, int], None] | None = None,
    features: Sequence[str] | None = None,
    labelled: bool = True,
) -> dict:
    """Check the site, extract every usable patient, write features.parquet and
    extraction_report.json under ``paths.output``, and return the report.

    ``features``: compute only these radiomics features (fedmets names; a model bundle's), each
    equal to the full extraction's; the report's ``settings`` stay the parameter file's, and the
    cache keeps such entries apart. ``labelled=False``: patients without a label are usable
    (new patients to score).

    ``workers`` defaults to ``compute.workers``. ``on_patient_checked(done, total)`` is called
    after each patient of the site check, ``on_patient_done(done, total)`` after each usable
    patient's extraction (cached, extracted or failed), both in this process. Raises
    FileNotFoundError when the parameter file is missing, OSError naming the config key when
    ``paths.output`` or ``paths.cache`` cannot be written (tried first, before any work);
    patient-level problems never raise."""
    started = time.perf_counter()
    check_writable(cfg.paths.output, "paths.output")
    if cfg.data.mode == "tabular":
        return _extract_table(cfg, started, on_patient_done, on_patient_checked, labelled)
    check_writable(cfg.paths.cache / CACHE_FOLDER, "paths.cache")
    workers = workers or cfg.compute.workers
    params = params_file(cfg.radiomics.params)
    if not params.is_file():
        raise FileNotFoundError(f"radiomics.params: file not found: {params}")
    context = _worker_context()  # the workers' server starts now, beside the site check
    check = check_site(cfg, workers, on_patient_checked, labelled=labelled)
    usable = set(check.usable)
    records = (
        [r for r in read_manifest(cfg, labelled)[0] if r.patient_id in usable] if usable else []
    )
    fingerprint = settings_fingerprint(cfg, params)
    only = tuple(sorted(features)) if features is not None else None
    keyed = fingerprint if only is None else {**fingerprint, "only_features": list(only)}
    use_clinical = "clinical" in cfg.data.modalities
    cache_root = cfg.paths.cache / CACHE_FOLDER

    features: dict[str, dict[str, float]] = {}
    clinical: dict[str, pd.DataFrame] = {}
    failed: dict[str, dict[str, str]] = {}
    seconds: list[float] = []
    stages: list[dict[str, float]] = []  # per extracted patient: seconds per stage
    peak_rss_mb = 0.0
    done = 0
    cached = 0
    tasks = []
    mask_bytes: dict[str, int] = {}

    def finish() -> None:
        nonlocal done
        done += 1
        if on_patient_done:
            on_patient_done(done, len(records))

    for record in records:
        entry = cache_root / entry_name(record.patient_id)
        stage = "clinical"
        try:
            if use_clinical:
                row = pd.DataFrame([record.clinical], index=[record.patient_id])
                clinical[record.patient_id] = encode_clinical(row)
            stage = "hash"
            key = cache_key(record, keyed)
            mask_bytes[record.patient_id] = record.tumour_mask_path.stat().st_size
        except (ValueError, OSError) as error:
            failed[record.patient_id] = _failure(record, cfg, stage, error, entry) | {
                "cached": False
            }
            finish()
            continue
        hit = read_entry(entry, key)
        if hit is None:
            tasks.append(_Task(record, cfg, params, key, entry, only))
            continue
        if "features" in hit:
            features[record.patient_id] = hit["features"]
            cached += 1
        else:
            failed[record.patient_id] = hit["failure"] | {"cached": True}
        finish()

    def collect(task: _Task, result: dict) -> None:
        nonlocal peak_rss_mb
        patient_id = task.record.patient_id
        if "features" in result:
            features[patient_id] = result["features"]
            seconds.append(result["seconds"])
            stages.append(result["stages"])
        else:
            failed[patient_id] = result["failure"]
        peak_rss_mb = max(peak_rss_mb, result.get("peak_rss_mb", 0.0))
        finish()

    # Largest tumour-mask files first: the file grows with the tumour, and so does the time to
    # extract it; a big patient started last would run alone while the other workers idle.
    tasks.sort(key=lambda task: -mask_bytes[task.record.patient_id])
    restarts = _run_tasks(tasks, workers, context, collect)

    order = [r for r in records if r.patient_id in features]
    table = _feature_table(order, features, clinical)
    output = cfg.paths.output
    written = _write_features(output, table)
    elapsed = time.perf_counter() - started
    columns = {region: sum(c.startswith(f"{region}_") for c in table.columns) for region in REGIONS}
    columns["clinical"] = table.shape[1] - 2 - sum(columns.values())
    report = {
        "site_id": cfg.site_id,
        "config": str(cfg.source) if cfg.source else None,
        "params_file": str(params),
        "settings": fingerprint,
        "workers": workers,
        "counts": {
            "total": check.n_patients,
            "quarantined": len(check.quarantined),
            "usable": len(records),
            "extracted": len(features) - cached,
            "cached": cached,
            "failed": len(failed),
        },
        "quarantined": check.quarantined,
        "site_problems": list(check.site_problems),
        "failed": failed,
        "features_per_region": columns,
        "seconds": round(elapsed, 3),
        "patients_per_minute": round(60 * len(features) / elapsed, 2),
        "mean_seconds_per_extracted_patient": (
            round(sum(seconds) / len(seconds), 3) if seconds else None
        ),
        "mean_stage_seconds": {
            stage: round(sum(s[stage] for s in stages) / len(stages), 3) for stage in stages[0]
        }
        if stages
        else None,
        "peak_worker_rss_mb": round(peak_rss_mb, 1) if tasks else None,
        "worker_restarts": restarts,
        "features_file": str(output / FEATURES_FILE),
        "features_file_written": written,
    }
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(output / REPORT_FILE, lambda path: path.write_text(text, encoding="utf-8"))
    return report


def _write_features(output: Path, table: pd.DataFrame) -> bool:
    """Write the site's feature table atomically into ``output``; a table of no patient does not
    replace an earlier one (a run whose every patient failed, say with the image folder moved,
    loses nothing): False then."""
    path = output / FEATURES_FILE
    if table.empty and path.is_file():
        return False
    write_atomically(path, lambda partial: table.to_parquet(partial, index=False))
    return True


def _extract_table(
    cfg: SiteConfig,
    started: float,
    on_patient_done: Callable[[int, int], None] | None,
    on_patient_checked: Callable[[int, int], None] | None,
    labelled: bool,
) -> dict:
    """extract_site for a tabular site: the usable rows of its feature table, same report keys
    (``features_per_region`` adds ``radiomics``, the table's radiomics columns)."""
    loaded = load_feature_table(cfg, labelled)
    table, n_usable = loaded.features, len(loaded.features)
    for callback in (on_patient_checked, on_patient_done):
        if callback:
            callback(loaded.n_rows, loaded.n_rows)
    output = cfg.paths.output
    written = _write_features(output, table)
    columns = {region: sum(c.startswith(f"{region}_") for c in table.columns) for region in REGIONS}
    columns["radiomics"] = len(loaded.radiomics_columns)
    columns["clinical"] = table.shape[1] - 2 - columns["radiomics"]
    elapsed = time.perf_counter() - started
    report = {
        "site_id": cfg.site_id,
        "config": str(cfg.source) if cfg.source else None,
        "params_file": None,
        "settings": {  # what the features depend on (params_hash): not the table's names
            "code_version": fedmets.shared.__version__,
            "radiomics_pattern": cfg.data.radiomics_pattern,
        },
        "clinical_sources": loaded.clinical_sources,  # schema column -> the table's column
        "workers": None,
        "counts": {
            "total": loaded.n_rows,
            "quarantined": len(loaded.quarantined),
            "usable": n_usable,
            "extracted": n_usable,
            "cached": 0,
            "failed": 0,
        },
        "quarantined": loaded.quarantined,
        "site_problems": loaded.site_problems,
        "failed": {},
        "features_per_region": columns,
        "seconds": round(elapsed, 3),
        "patients_per_minute": round(60 * n_usable / elapsed, 2),
        "mean_seconds_per_extracted_patient": None,
        "mean_stage_seconds": None,
        "peak_worker_rss_mb": None,
        "worker_restarts": 0,
        "features_file": str(output / FEATURES_FILE),
        "features_file_written": written,
    }
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(output / REPORT_FILE, lambda path: path.write_text(text, encoding="utf-8"))
    return report


# ---- cache --------------------------------------------------------------------------------------


def settings_fingerprint(cfg: SiteConfig, params: Path) -> dict:
    """Everything besides the input files that changes a patient's features or crop."""
    return {
        "code_version": fedmets.shared.__version__,
        "pyradiomics": radiomics.__version__,
        "simpleitk": sitk.Version.VersionString(),
        "params_sha256": hashlib.sha256(params.read_bytes()).hexdigest(),
        "shape_regions": list(SHAPE_REGIONS),
        "rtstruct_roi_pattern": cfg.data.rtstruct_roi_pattern,
        "peritumoral_margin_mm": cfg.radiomics.peritumoral_margin_mm,
        "preprocess": cfg.preprocess.model_dump(),
    }


def cache_key(record: PatientRecord, fingerprint: dict) -> str:
    """sha256 over the settings fingerprint and the contents of the CT and tumour-mask inputs
    (a folder, e.g. a DICOM series, counts with every file in it)."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode())
    for path in (record.ct_path, record.tumour_mask_path):
        digest.update(_content_digest(Path(path)).encode())
    return digest.hexdigest()


def read_entry(entry: Path, key: str) -> dict | None:
    """The cache entry in ``entry`` if its key is ``key``: ``{"features": {...}}`` (when its crop
    is there too) or ``{"failure": {...}}``; else None."""
    try:
        stored = json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stored.get("cache_key") != key:
        return None
    if "features" in stored and (entry / CROP_FILE).is_file():
        return {"features": stored["features"]}
    return {"failure": stored["failure"]} if "failure" in stored else None


def _content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(file, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


# ---- one patient (runs in a worker process) ----------------------------------------------------


def _extract_patient(task: _Task) -> dict:
    """Extract one patient and write its cache entry; never raises: a problem comes back as
    ``{"failure": {...}}``, success as ``{"features": {...}, "seconds": s, "stages": {...}}``
    (seconds of each stage: load, preprocess, ring, radiomics, cache: crops and entry)."""
    started = time.perf_counter()
    record, cfg = task.record, task.cfg
    # SIGALRM's default action ends this worker when the patient outlasts its time, even inside
    # a C loop that never returns to Python; the parent then treats it as a worker that died.
    signal.setitimer(signal.ITIMER_REAL, cfg.compute.patient_timeout_s)
    for partial in task.entry.glob(".*.partial"):  # a write cut off by a stopped worker
        partial.unlink(missing_ok=True)
    margin = cfg.radiomics.peritumoral_margin_mm
    stage_seconds: dict[str, float] = {}
    stage, tic = "load", started

    def begin(next_stage: str) -> str:
        nonlocal tic
        stage_seconds[stage] = time.perf_counter() - tic
        tic = time.perf_counter()
        return next_stage

    try:
        images = load_patient_images(record, cfg)
        stage = begin("preprocess")
        prepared = prepare_patient(images.ct, images.tumour, cfg.preprocess, margin)
        stage = begin("ring")
        ring = peritumoral_ring(
            prepared.ct,
            prepared.tumour,
            prepared.body,
            margin,
            cfg.preprocess.air_threshold_hu,
            cfg.preprocess.bone_threshold_hu,
        )
        box = prepared.radiomics_box
        ct = box.crop(prepared.ct)
        masks = dict(zip(REGIONS, (box.crop(prepared.tumour), box.crop(ring)), strict=True))
        if task.features is None:
            extractor = extractor_for(task.params)
        else:
            extractor = restricted_extractor(task.params, task.features)
            needed = {name.split("_", 1)[0] for name in task.features}
            masks = {region: mask for region, mask in masks.items() if region in needed}
        stage = begin("radiomics")
        wanted = None if task.features is None else wanted_features(task.features)
        features = regions_features(extractor, ct, masks, wanted)
        if task.features is not None:  # a class computes features beside the wanted ones
            features = {name: features[name] for name in task.features}
        stage = begin("cache")
        task.entry.mkdir(parents=True, exist_ok=True)
        save_crop(task.entry / CROP_FILE, prepared, ring)
        _write_entry(task, {"seconds": time.perf_counter() - started, "features": features})
        begin("")
        seconds = sum(stage_seconds.values())  # the entry's write included
        result: dict = {"features": features, "seconds": seconds, "stages": stage_seconds}
    except Exception as error:  # noqa: BLE001 - any failure is this patient's, never the run's
        failure = _failure(record, cfg, stage, error, task.entry)
        result = {"failure": failure | {"cached": False}}
        # Bad input gives the same failure next time: remember it. Other errors (disk, memory)
        # may pass, so the patient is tried again on the next run.
        if stage != "cache" and isinstance(error, PatientDataError | ValueError):
            with contextlib.suppress(OSError):  # not remembering it only costs a retry
                task.entry.mkdir(parents=True, exist_ok=True)
                (task.entry / CROP_FILE).unlink(missing_ok=True)
                _write_entry(task, {"failure": failure})
    signal.setitimer(signal.ITIMER_REAL, 0)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _write_entry(task: _Task, content: dict) -> None:
    """Write the patient's features.json (cache key, id and ``content``) atomically."""
    text = json.dumps({"cache_key": task.key, "patient_id": task.record.patient_id, **content})
    write_atomically(task.entry / ENTRY_FILE, lambda path: path.write_text(text, "utf-8"))


def _failure(
    record: PatientRecord, cfg: SiteConfig, stage: str, error: BaseException, entry: Path
) -> dict[str, str]:
    """What went wrong, where: stage, file (as in the manifest), field (input kind) and a
    one-line message naming all of them and the patient."""
    field = _STAGE_FIELD[stage]
    if isinstance(error, PatientDataError):
        file, field, detail = str(error.file), error.field, error.message
    else:
        if isinstance(error, ImageContentError):
            field = _IMAGE_FIELD[error.image]
        detail = str(error).strip() or type(error).__name__
        file = {
            "ct": shown_path(record.ct_path, cfg),
            "tumour_mask": shown_path(record.tumour_mask_path, cfg),
            "paths.cache": str(entry),
        }.get(field, f"{shown_path(cfg.data.manifest, cfg)} line {record.line}")
    detail = " ".join(detail.split())  # ITK messages span lines
    return {
        "stage": stage,
        "file": file,
        "field": field,
        "message": f"patient {record.patient_id}: {file}: {field}: {stage}: {detail}",
    }


# ---- process pool -------------------------------------------------------------------------------


def _init_worker() -> None:
    """Worker set-up: ITK on one thread; Ctrl-C left to the main process, which lets the
    patients in flight finish (their cache entries are kept) before it stops; SIGALRM ends the
    worker (a patient over ``[compute] patient_timeout_s``)."""
    use_one_thread()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _worker_context() -> multiprocessing.context.ForkServerContext:
    """How workers start: forked from a server process that imported this module once (fast
    pool starts and restarts) and that never ran ITK or a progress-bar thread (safe to fork).
    The server is started here and imports in the background, so that it is ready by the time
    the site check is done."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    multiprocessing.forkserver.ensure_running()
    return context


def _run_tasks(
    tasks: list[_Task],
    workers: int,
    context: multiprocessing.context.ForkServerContext,
    collect: Callable[[_Task, dict], None],
) -> int:
    """Run ``tasks`` on up to ``workers`` processes of ``context`` (at most 2 per worker
    queued), calling ``collect(task, result)`` in this process for each. When a worker dies
    (crash, out of memory, a patient over its time) the pool is replaced; the patients in
    flight are retried one at a time, and one that kills a worker on its own is recorded as
    failed. Returns how many times the pool was replaced."""
    queue, suspects, restarts = deque(tasks), deque(), 0
    while queue or suspects:
        crashed: list[_Task] = []
        alone: _Task | None = None  # a suspect running on its own
        broken = False  # the pool refused a task: a worker died between two results
        with ProcessPoolExecutor(
            max_workers=min(workers, len(queue) + len(suspects)),
            mp_context=context,
            initializer=_init_worker,
        ) as pool:
            in_flight: dict = {}
            while (queue or suspects or in_flight) and not (crashed or broken):
                if suspects and not in_flight:
                    broken = not _submitted(pool, in_flight, suspects[0])
                    alone = None if broken else suspects.popleft()
                while not broken and alone is None and not suspects and queue:
                    if len(in_flight) >= 2 * workers:
                        break
                    broken = not _submitted(pool, in_flight, queue[0])
                    if not broken:
                        queue.popleft()
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = in_flight.pop(future)
                    try:
                        collect(task, future.result())
                    except BrokenProcessPool:
                        crashed.append(task)
                    else:
                        alone = None if task is alone else alone
            for future, task in in_flight.items():  # the pool broke: these fail too
                try:
                    collect(task, future.result())
                except BrokenProcessPool:
                    crashed.append(task)
        restarts += bool(crashed or broken)
        if crashed and alone is not None:  # it killed a worker on its own
            limit = alone.cfg.compute.patient_timeout_s
            error = RuntimeError(
                "worker process died on this patient alone: a crash, out of memory, or over "
                f"[compute] patient_timeout_s ({limit:g} s)"
            )
            failure = _failure(alone.record, alone.cfg, "worker", error, alone.entry)
            collect(alone, {"failure": failure | {"cached": False}})
        else:
            suspects.extend(crashed)
    return restarts


def _submitted(pool: ProcessPoolExecutor, in_flight: dict, task: _Task) -> bool:
    """Queue ``task`` on ``pool`` (recorded in ``in_flight``); False if the pool is broken."""
    try:
        in_flight[pool.submit(_extract_patient, task)] = task
    except BrokenProcessPool:
        return False
    return True


def _feature_table(
    records: list[PatientRecord],
    features: dict[str, dict[str, float]],
    clinical: dict[str, pd.DataFrame],
) -> pd.DataFrame:
    """patient_id, label (nullable Int64), tumour_*, ring_*, encoded clinical columns."""
    ids = [r.patient_id for r in records]
    head = pd.DataFrame(
        {
            "patient_id": pd.Series(ids, dtype="string"),
            "label": pd.array([r.label for r in records], dtype="Int64"),
        }
    )
    parts = [head, pd.DataFrame([features[i] for i in ids], dtype="float64")]
    if clinical and ids:
        parts.append(pd.concat([clinical[i] for i in ids]).reset_index(drop=True))
    return pd.concat(parts, axis=1)
