"""`fedmets site check`: validate a site's whole cohort before anything is computed from it.

Per patient (each problem names the patient, the file and the field):

- manifest row: id present and unique, path cells filled, label 0/1 (:func:`read_manifest`);
- clinical cells: present, typed, known categories, plausible (:func:`validate_clinical`);
- files: exist and readable, masks on the CT grid, tumour mask binary and non-empty, organ labels
  known (:func:`try_load_patient_images`);
- plausibility: CT values in HU (below, constants) and tumour volume 0.5..500 cc.

A patient with any problem is quarantined: listed with its problems and left out; the rest go
on. Site-level problems (manifest unreadable, a required column missing) stop the check. A site in
tabular mode (``data.mode = "tabular"``) has its feature table checked by
``fedmets.client.tabular``.

CT values: the lowest value may be below -1100 HU only as padding (one value covering >= 1 % of
the voxels, e.g. -2048 or -3024 outside the reconstruction circle), which is then ignored. The
rest must lie within -1100..4000 HU, must not be constant, and must include air (some voxel
below -500 HU): without air the values are likely raw stored values without the DICOM rescale
(HU = stored x RescaleSlope + RescaleIntercept).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import SimpleITK as sitk

from fedmets.client.ingest import (
    PatientDataError,
    PatientImages,
    PatientRecord,
    read_manifest,
    shown_path,
    try_load_patient_images,
)
from fedmets.client.tabular import load_feature_table
from fedmets.shared.clinical import validate_clinical
from fedmets.shared.config import SiteConfig

HU_RANGE = (-1100.0, 4000.0)
PADDING_MIN_FRACTION = 0.01
AIR_HU = -500.0
TUMOUR_CC_RANGE = (0.5, 500.0)
POOL_MIN_SECONDS = 2.0  # sequential work below which no process pool is started


@dataclass
class SiteCheckReport:
    """Outcome of :func:`check_site` for one site."""

    site_id: str
    n_patients: int  # rows in the manifest (0 when it cannot be read)
    usable: list[str]  # patient ids that passed, in manifest order
    quarantined: dict[str, list[str]]  # patient id -> problem messages ('file: field: message')
    site_problems: list[str]

    def to_json(self) -> dict:
        """The report as a JSON-ready dict (adds the counts)."""
        return {
            "site_id": self.site_id,
            "n_patients": self.n_patients,
            "n_usable": len(self.usable),
            "n_quarantined": len(self.quarantined),
            "usable": self.usable,
            "quarantined": self.quarantined,
            "site_problems": self.site_problems,
        }


def check_site(
    cfg: SiteConfig,
    workers: int | None = None,
    on_patient_done: Callable[[int, int], None] | None = None,
    labelled: bool = True,
) -> SiteCheckReport:
    """Run every check on every patient of the site, ``workers`` processes in parallel (default
    ``compute.workers``); ``on_patient_done(done, total)`` is called after each patient (once,
    for all rows, in tabular mode). ``labelled=False`` (new patients to score): an empty label
    cell is no problem."""
    if cfg.data.mode == "tabular":
        table = load_feature_table(cfg, labelled)
        if on_patient_done:
            on_patient_done(table.n_rows, table.n_rows)
        usable = table.features["patient_id"].tolist()
        return SiteCheckReport(
            cfg.site_id, table.n_rows, usable, table.quarantined, table.site_problems
        )
    try:
        records, row_problems = read_manifest(cfg, labelled)
    except ValueError as error:
        return SiteCheckReport(cfg.site_id, 0, [], {}, [str(error)])
    found = [(problem.line, problem.patient_id, problem.problem) for problem in row_problems]
    check = partial(check_patient, cfg=cfg, labelled=labelled)
    checks = _map(check, records, workers or cfg.compute.workers)
    for done, problems in enumerate(checks, start=1):
        found += [(problem.line, problem.patient_id, problem.problem) for problem in problems]
        if on_patient_done:
            on_patient_done(done, len(records))
    quarantined: dict[str, list[str]] = {}
    for _, patient_id, message in sorted(found, key=lambda item: item[0]):
        messages = quarantined.setdefault(patient_id, [])
        if message not in messages:  # duplicate ids: one message for the rows sharing the id
            messages.append(message)
    usable = [record.patient_id for record in records if record.patient_id not in quarantined]
    n_patients = len(records) + len({problem.line for problem in row_problems})
    site_problems = [] if usable else [f"no usable patient: all {n_patients} are quarantined"]
    return SiteCheckReport(cfg.site_id, n_patients, usable, quarantined, site_problems)


def check_patient(
    record: PatientRecord, cfg: SiteConfig, labelled: bool = True
) -> list[PatientDataError]:
    """Every problem of one patient: clinical cells, label (when ``labelled``), files,
    plausibility."""
    manifest = shown_path(cfg.data.manifest, cfg)

    def problem(field: str, message: str) -> PatientDataError:
        return PatientDataError(record.patient_id, manifest, field, message, record.line)

    problems = []
    if "clinical" in cfg.data.modalities:
        problems += [
            problem(field, message) for field, message in validate_clinical(record.clinical)
        ]
    if labelled and record.label is None:
        problems.append(problem(cfg.data.label_column, "label is missing (must be 0 or 1)"))
    images, image_problems = try_load_patient_images(record, cfg)
    problems += image_problems
    if images is not None:
        problems += _plausibility(images, record, cfg)
    return problems


def _plausibility(
    images: PatientImages, record: PatientRecord, cfg: SiteConfig
) -> list[PatientDataError]:
    def problem(path, field: str, message: str) -> PatientDataError:
        return PatientDataError(
            record.patient_id, shown_path(path, cfg), field, message, record.line
        )

    problems = [problem(record.ct_path, "ct", message) for message in ct_value_problems(images.ct)]
    spacing = images.tumour.GetSpacing()
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(images.tumour)))
    volume_cc = voxels * float(np.prod(spacing)) / 1000.0
    low, high = TUMOUR_CC_RANGE
    if not low <= volume_cc <= high:
        problems.append(
            problem(
                record.tumour_mask_path,
                "tumour_mask",
                f"tumour volume {volume_cc:.3g} cc ({voxels} voxels) is outside the plausible"
                f" {low:g}..{high:g} cc: wrong structure or wrong voxel spacing?",
            )
        )
    return problems


def ct_value_problems(ct: sitk.Image) -> list[str]:
    """Problems with a CT's values in HU (see the module docstring); empty when plausible."""
    hu = sitk.GetArrayViewFromImage(ct)
    low, high = float(hu.min()), float(hu.max())
    if low == high:
        return [f"the CT is constant ({low:g} everywhere)"]
    padding = low < HU_RANGE[0] and np.count_nonzero(hu == low) >= PADDING_MIN_FRACTION * hu.size
    if padding:
        body = hu != low
        low = float(np.min(hu, where=body, initial=high))
    problems = []
    if low < HU_RANGE[0]:
        problems.append(f"lowest value {low:g} HU is below {HU_RANGE[0]:g} HU")
    if high > HU_RANGE[1]:
        problems.append(f"highest value {high:g} HU is above {HU_RANGE[1]:g} HU")
    air = (hu < AIR_HU) & body if padding else hu < AIR_HU
    if not air.any():
        problems.append(
            f"no air: no voxel below {AIR_HU:g} HU (lowest {low:g}); raw stored values without"
            " the DICOM rescale slope/intercept, or not a CT in HU?"
        )
    return problems


def _map(
    function: Callable[[PatientRecord], list[PatientDataError]],
    records: list[PatientRecord],
    workers: int,
) -> Iterator[list[PatientDataError]]:
    """``function`` over ``records`` in order. The first record runs here; the rest go to
    ``workers`` spawned processes only when, at that pace, they would take longer than
    POOL_MIN_SECONDS (starting the processes costs about that)."""
    if not records:
        return
    started = time.perf_counter()
    yield function(records[0])
    rest = records[1:]
    estimate = (time.perf_counter() - started) * len(rest)
    if workers <= 1 or len(rest) <= 1 or estimate < POOL_MIN_SECONDS:
        yield from map(function, rest)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(rest)), mp_context=context) as pool:
        yield from pool.map(function, rest, chunksize=1)
