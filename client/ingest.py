"""Hospital-side ingest: read the site's manifest and load one patient's CT and masks.

Accepted inputs (see docs/hospital_guide.md):

- CT: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``,
  ``.mhd``) file in HU, or a folder holding one DICOM CT series (rescale slope/intercept applied,
  slices must be evenly spaced).
- Tumour mask: a mask file on the CT grid (values 0/1, or 0/255), or a DICOM RTSTRUCT whose ROI
  is picked by ``data.rtstruct_roi_pattern``.
- Organ mask: a label-map file on the CT grid with the labels of
  :data:`fedmets.shared.organs.ORGAN_LABELS`.

A mask is "on the CT grid" when its size is equal, spacing agrees within a relative 1e-3, origin
within 0.5 mm or a quarter of the smallest CT spacing (whichever is less), and direction cosines
within 1e-3. RTSTRUCT contours are rasterised here onto the CT grid (a voxel is inside when its
centre is inside or on the contour polygon; holes are cut by inner contours). rt-utils 1.2.7 is
not used for reading because it allocates (columns, rows) slices and clips the mask of
non-square images.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import nibabel
import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk

from fedmets.shared.clinical import CLINICAL_COLUMNS, validate_clinical
from fedmets.shared.config import SiteConfig
from fedmets.shared.organs import ORGAN_LABELS, ORGAN_NAMES

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")
PATH_COLUMNS = {"ct": "ct_path", "tumour_mask": "tumour_mask_path", "organ_mask": "organ_mask_path"}
SPACING_RTOL = 1e-3
ORIGIN_ATOL_MM = 0.5
ORIGIN_ATOL_VOXELS = 0.25
DIRECTION_ATOL = 1e-3
SLICE_GAP_RTOL = 1e-2  # DICOM slice gaps may differ from their median by this fraction
CONTOUR_PLANE_ATOL_VOXELS = 0.25  # an RTSTRUCT contour plane must lie this close to a CT slice


@dataclass(frozen=True)
class PatientRecord:
    """One manifest row, paths resolved to absolute."""

    patient_id: str
    ct_path: Path  # a NIfTI/NRRD/MHA file or a DICOM series folder
    tumour_mask_path: Path  # a mask file (NIfTI/NRRD/MHA) or an RTSTRUCT .dcm file
    organ_mask_path: Path | None
    clinical: dict[str, object]  # raw clinical cells, None for empty
    label: int | None
    line: int  # the row's line in the manifest file as an editor numbers it (header: line 1)


@dataclass
class PatientImages:
    """One patient's images, all on the CT grid (identical size, spacing, origin, direction)."""

    ct: sitk.Image  # HU, float32 or int16, 3D
    tumour: sitk.Image  # uint8 0/1 on the CT grid
    organs: sitk.Image | None  # uint8 labels (fedmets.shared.organs.ORGAN_LABELS) on the CT grid


class PatientDataError(Exception):
    """A problem with one patient's data: ``patient_id``, ``file`` (as shown, or None),
    ``field`` (manifest column or input kind), ``message`` and the ``line`` of the patient's
    row in the manifest file (as an editor numbers it: the header is line 1) if known.

    str() = 'patient HA-0003: masks/HA-0003_tumour.nii.gz: tumour_mask: mask is empty'
    """

    def __init__(
        self, patient_id: str, file: str | None, field: str, message: str, line: int | None = None
    ) -> None:
        self.patient_id = patient_id
        self.file = file
        self.field = field
        self.message = message
        self.line = line
        super().__init__(f"patient {patient_id}: {self.problem}")

    @property
    def problem(self) -> str:
        """The message without the patient: 'file: field: message'."""
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.field}: {self.message}"

    def __reduce__(self):  # pickle by fields (for process pools)
        return PatientDataError, (self.patient_id, self.file, self.field, self.message, self.line)


# ---- manifest ---------------------------------------------------------------------------------


def shown_path(path: Path, cfg: SiteConfig) -> str:
    """``path`` relative to ``data.root`` when inside it (as in the manifest), else absolute."""
    try:
        return path.relative_to(cfg.data.root).as_posix()
    except ValueError:
        return str(path)


def required_columns(cfg: SiteConfig) -> list[str]:
    """Manifest columns this site must have, given its ``data.modalities``."""
    columns = [cfg.data.id_column, PATH_COLUMNS["ct"], PATH_COLUMNS["tumour_mask"]]
    if "organ_mask" in cfg.data.modalities:
        columns.append(PATH_COLUMNS["organ_mask"])
    if "clinical" in cfg.data.modalities:
        columns += list(CLINICAL_COLUMNS)
    return [*columns, cfg.data.label_column]


def read_manifest(
    cfg: SiteConfig, labelled: bool = True
) -> tuple[list[PatientRecord], list[PatientDataError]]:
    """Rows that parse, and one problem per defect of the rows that don't (empty id, duplicate id,
    empty path cell, label not 0/1). Empty label cells give ``label=None``; ``labelled=False``
    (new patients to score): the label column may be left out too.

    Raise ValueError naming the manifest when it cannot be read, lacks a required column or has
    no rows, or when ``data.mode`` is not ``"images"``.
    """
    manifest = cfg.data.manifest
    if cfg.data.mode != "images":
        raise ValueError(f"{manifest}: data.mode is {cfg.data.mode!r}; ingest needs 'images'")
    table, unreadable = read_text_table(manifest)
    if not labelled and cfg.data.label_column not in table.columns:
        table[cfg.data.label_column] = ""
    missing = [column for column in required_columns(cfg) if column not in table.columns]
    if missing:
        raise ValueError(
            f"{manifest}: missing column(s) {quoted(missing)}"
            f" ({columns_found(table.columns, missing)})"
        )
    if table.empty and not unreadable:
        raise ValueError(f"{manifest}: no patient rows")
    name = shown_path(manifest, cfg)
    records: list[PatientRecord] = []
    problems = [
        PatientDataError(
            bad.cells.get(cfg.data.id_column) or f"(line {line})", name, bad.field, bad.reason, line
        )
        for line, bad in unreadable.items()
    ]
    lines_of: dict[str, list[int]] = defaultdict(list)
    for line, cells in zip(table.index, table.to_dict("records"), strict=True):
        cells = {key: (value.strip() or None) for key, value in cells.items()}
        record, row_problems = _parse_row(cells, line, name, cfg)
        problems += row_problems
        if record is not None:
            records.append(record)
        if cells[cfg.data.id_column] is not None:
            lines_of[cells[cfg.data.id_column]].append(line)
    for patient_id, lines in lines_of.items():
        if len(lines) > 1:
            message = f"id used by {listed_lines(lines)}; ids must be unique"
            problems += [
                PatientDataError(patient_id, name, cfg.data.id_column, message, line)
                for line in lines
            ]
    duplicated = {patient_id for patient_id, lines in lines_of.items() if len(lines) > 1}
    records = [record for record in records if record.patient_id not in duplicated]
    records, shared = _own_files(records, name)
    return records, sorted(problems + shared, key=lambda problem: problem.line)


def listed_lines(numbers: list[int]) -> str:
    """'lines 3 and 8', 'lines 3, 5 and 8': rows of a table file as an editor numbers them."""
    return "lines " + ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"


def _own_files(
    records: list[PatientRecord], name: str
) -> tuple[list[PatientRecord], list[PatientDataError]]:
    """The records whose image files (CT, tumour mask, organ mask) no other row names, and a
    problem for each row that shares one with another: one patient's images listed under two
    ids (a copy-paste slip) would enter the cohort twice, once with a wrong label perhaps."""
    owners: dict[tuple[str, Path], list[PatientRecord]] = defaultdict(list)
    for record in records:
        for column in PATH_COLUMNS.values():
            if (path := getattr(record, column)) is not None:
                owners[(column, path)].append(record)
    problems, sharing = [], set()
    for (column, path), rows in owners.items():
        if len(rows) < 2 or not path.exists():  # a file not found is each row's own problem
            continue
        for record in rows:
            others = ", ".join(other.patient_id for other in rows if other is not record)
            message = f"{path.name} is also listed for patient(s) {others}; one patient's files"
            problems.append(PatientDataError(record.patient_id, name, column, message, record.line))
        sharing |= {record.patient_id for record in rows}
    return [r for r in records if r.patient_id not in sharing], problems


@dataclass(frozen=True)
class UnreadableRow:
    """A manifest row left out: its cells by column as far as they could be read, the column
    (or ``row``) at fault and why."""

    cells: dict[str, str]
    field: str
    reason: str


def read_text_table(path: Path) -> tuple[pd.DataFrame, dict[int, UnreadableRow]]:
    """The manifest as text cells ('' for empty; a short row's missing cells empty), columns
    named by the stripped header cells (a column with an empty header cell dropped), indexed by
    the line each row starts on in the file, as an editor numbers them (the header: line 1;
    blank lines and rows of empty cells are skipped, not indexed), and the rows left out, by
    line: those holding bytes that are not UTF-8 or more cells than the header. ValueError
    naming the file when it cannot be read at all, is a spreadsheet workbook, is not
    comma-separated or repeats a column name."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: manifest file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a manifest file") from None
    if raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):  # a ZIP (xlsx, ods) or OLE (xls)
        raise ValueError(
            f"{path}: a spreadsheet workbook (Excel or LibreOffice), not CSV text: save the sheet"
            ' as "CSV UTF-8 (comma delimited)"'
        )
    text = raw.decode("utf-8-sig", errors="surrogateescape")  # bad bytes kept, found below
    reader = csv.reader(io.StringIO(text, newline=""))
    lines: list[tuple[int, list[str]]] = []  # (the line a row starts on, its cells)
    try:
        start = 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                lines.append((start, cells))
            start = reader.line_num + 1  # a quoted cell may span lines
    except csv.Error as error:
        raise ValueError(f"{path}: not a valid CSV file ({error})") from None
    if not lines:
        raise ValueError(f"{path}: manifest is empty")
    header = [cell.strip() for cell in lines[0][1]]
    if any(_undecoded(cell) for cell in header):
        raise ValueError(f"{path}: the header row is not UTF-8 text")
    if sum(cell.count(";") for cell in header) > len(header) - 1:  # more ';' than separators
        raise ValueError(
            f"{path}: the header row is separated by semicolons (;), not commas: save the table"
            " as comma-separated CSV, with decimal points (1.5, not 1,5)"
        )
    repeated = [name for name, n in Counter(filter(None, header)).items() if n > 1]
    if repeated:
        raise ValueError(
            f"{path}: repeated column name(s) in the header: {quoted(repeated)};"
            " each column needs its own name"
        )
    rows, unreadable = {}, {}
    for line, cells in lines[1:]:
        named = {
            column: cell.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            for column, cell in zip(header, cells, strict=False)
        }
        bad = next((c for c, cell in zip(header, cells, strict=False) if _undecoded(cell)), None)
        if bad is not None:
            byte = _undecoded(cells[header.index(bad)])
            reason = f"not UTF-8 text (byte 0x{byte:02X}): save the manifest as UTF-8"
            unreadable[line] = UnreadableRow(named, bad, reason)
        elif len(cells) > len(header):
            reason = f"{len(cells)} cells where the header has {len(header)}"
            unreadable[line] = UnreadableRow(named, "row", reason)
        else:
            rows[line] = cells + [""] * (len(header) - len(cells))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=header, dtype=str)
    return table.drop(columns="", errors="ignore"), unreadable


def quoted(names) -> str:
    """Column names for a message, quoted so that spaces show: 'age', 'dm '."""
    return ", ".join(repr(name) for name in names)


def columns_found(columns, wanted: list[str]) -> str:
    """What a table has, for a message naming its missing ``wanted`` columns: every column of a
    narrow table (a manifest); of a wide one (a feature table), their count and the names
    nearest those wanted."""
    columns = list(columns)
    if len(columns) <= 20:
        return f"columns found: {quoted(columns)}"
    by_lower = {column.lower(): column for column in columns}
    near = dict.fromkeys(
        by_lower[name]
        for column in wanted
        for name in difflib.get_close_matches(column.lower(), by_lower, n=3, cutoff=0.6)
    )
    nearest = f"the nearest: {quoted(near)}" if near else "none named alike"
    return f"{len(columns)} columns found, {nearest}"


def _undecoded(cell: str) -> int | None:
    """The first byte of ``cell`` that was not UTF-8 (decoded with surrogateescape), or None."""
    for char in cell:
        if "\udc80" <= char <= "\udcff":
            return ord(char) - 0xDC00
    return None


def _parse_row(
    cells: dict[str, str | None], line: int, manifest: str, cfg: SiteConfig
) -> tuple[PatientRecord | None, list[PatientDataError]]:
    data = cfg.data
    patient_id = cells[data.id_column] or f"(line {line})"

    def problem(column: str, message: str) -> PatientDataError:
        return PatientDataError(patient_id, manifest, column, message, line)

    problems = [] if cells[data.id_column] else [problem(data.id_column, "empty id cell")]
    paths: dict[str, Path | None] = {}
    for modality, column in PATH_COLUMNS.items():
        if modality not in data.modalities:
            paths[modality] = None
        elif cells[column] is None:
            problems.append(problem(column, f"empty cell: the {modality} file is required"))
        else:
            paths[modality] = (data.root / Path(cells[column]).expanduser()).resolve()
    label = cells[data.label_column]
    if label is not None:
        try:
            number = float(label)
        except ValueError:
            number = None
        if number not in (0.0, 1.0):
            problems.append(problem(data.label_column, f"label must be 0 or 1, got {label!r}"))
    clinical = (
        {column: cells[column] for column in CLINICAL_COLUMNS}
        if "clinical" in data.modalities
        else {}
    )
    if problems:  # no record: its clinical cells are named here too (else by the site check)
        problems += [problem(field, message) for field, message in validate_clinical(clinical)]
        return None, problems
    record = PatientRecord(
        patient_id=patient_id,
        ct_path=paths["ct"],
        tumour_mask_path=paths["tumour_mask"],
        organ_mask_path=paths["organ_mask"],
        clinical=clinical,
        label=None if label is None else int(float(label)),
        line=line,
    )
    return record, []


# ---- images -----------------------------------------------------------------------------------


def load_patient_images(record: PatientRecord, cfg: SiteConfig) -> PatientImages:
    """Read the CT and masks of one patient; raise PatientDataError for the first problem
    (missing, empty, unreadable or corrupt file, mask off the CT grid, empty or non-binary tumour
    mask, unknown organ label, RTSTRUCT without a matching ROI)."""
    images, problems = try_load_patient_images(record, cfg)
    if problems:
        raise problems[0]
    return images


def try_load_patient_images(
    record: PatientRecord, cfg: SiteConfig
) -> tuple[PatientImages | None, list[PatientDataError]]:
    """Like :func:`load_patient_images`, but return every problem found (images None if any)."""
    loader = _Loader(record, cfg)
    problems = []
    ct = frame = None
    try:
        ct, frame = loader.ct()
    except PatientDataError as error:
        problems.append(error)
    tumour = organs = None
    try:
        tumour = loader.tumour(ct, frame)
    except PatientDataError as error:
        problems.append(error)
    if record.organ_mask_path is not None:
        try:
            organs = loader.organs(ct)
        except PatientDataError as error:
            problems.append(error)
    if problems:
        return None, problems
    return PatientImages(ct=ct, tumour=tumour, organs=organs), []


class _Loader:
    """Reads one patient's files, turning every failure into a PatientDataError."""

    def __init__(self, record: PatientRecord, cfg: SiteConfig) -> None:
        self.record = record
        self.cfg = cfg

    def error(self, path: Path, field: str, message: str) -> PatientDataError:
        shown = shown_path(path, self.cfg)
        return PatientDataError(self.record.patient_id, shown, field, message, self.record.line)

    def ct(self) -> tuple[sitk.Image, str | None]:
        """The CT in HU (int16 when integer-valued and in range, else float32) and its DICOM
        frame of reference UID (None for non-DICOM files)."""
        path = self.record.ct_path
        if path.is_dir():
            image, frame = self.dicom_series(path)
        else:
            image, frame = self.image_file(path, "ct"), None
        self.check_3d_scalar(image, path, "ct")
        low, high = _min_max(image)
        integer = image.GetPixelID() in _INTEGER_TYPES
        pixel = sitk.sitkInt16 if integer and -32768 <= low and high <= 32767 else sitk.sitkFloat32
        return (image if image.GetPixelID() == pixel else sitk.Cast(image, pixel)), frame

    def tumour(self, ct: sitk.Image | None, frame: str | None) -> sitk.Image | None:
        """The tumour mask as uint8 0/1 on the CT grid (None when the CT could not be read and
        the mask cannot be checked against it)."""
        path = self.record.tumour_mask_path
        if not path.exists():
            raise self.error(path, "tumour_mask", "file not found")
        if path.is_dir():
            raise self.error(path, "tumour_mask", "is a folder; expected a mask file or RTSTRUCT")
        if path.stat().st_size == 0:
            raise self.error(path, "tumour_mask", "file is empty (0 bytes)")
        if not path.name.lower().endswith(IMAGE_SUFFIXES):
            return None if ct is None else self.rtstruct(path, ct, frame)
        mask = self.image_file(path, "tumour_mask")
        self.check_3d_scalar(mask, path, "tumour_mask")
        values = self.values(mask, path, "tumour_mask")
        if not (set(values) <= {0, 1} or set(values) <= {0, 255}):
            raise self.error(
                path, "tumour_mask", f"values must be 0/1 (or 0/255), found {_listed(values)}"
            )
        if values.max() == 0:
            raise self.error(path, "tumour_mask", "mask is empty")
        if ct is None:
            return None
        self.check_grid(mask, ct, path, "tumour_mask")
        binary = sitk.Cast(mask != 0, sitk.sitkUInt8)
        binary.CopyInformation(ct)
        return binary

    def organs(self, ct: sitk.Image | None) -> sitk.Image | None:
        """The organ label map as uint8 on the CT grid (None without a readable CT)."""
        path = self.record.organ_mask_path
        labels = self.image_file(path, "organ_mask")
        self.check_3d_scalar(labels, path, "organ_mask")
        unknown = sorted(set(self.values(labels, path, "organ_mask")) - {0, *ORGAN_NAMES})
        if unknown:
            known = ", ".join(f"{value} {name}" for name, value in ORGAN_LABELS.items())
            raise self.error(
                path,
                "organ_mask",
                f"unknown label(s) {_listed(unknown)} (known: 0 background, {known})",
            )
        if ct is None:
            return None
        self.check_grid(labels, ct, path, "organ_mask")
        labels = sitk.Cast(labels, sitk.sitkUInt8)
        labels.CopyInformation(ct)
        return labels

    # -- readers

    def image_file(self, path: Path, field: str) -> sitk.Image:
        if not path.exists():
            raise self.error(path, field, "file not found")
        if path.is_dir():
            raise self.error(path, field, "is a folder; expected an image file")
        if path.stat().st_size == 0:
            raise self.error(path, field, "file is empty (0 bytes)")
        if field != "ct" and not path.name.lower().endswith(IMAGE_SUFFIXES):
            raise self.error(path, field, f"unsupported file type; use {_formats()}")
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            truncated = _nifti_truncation(path)
            if truncated:
                raise self.error(path, field, f"corrupt file: {truncated}")
            header = _nifti_header_problem(path)
            if header:
                raise self.error(path, field, header)
        try:
            return sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise self.error(path, field, f"cannot read the image ({_itk_reason(error)})") from None

    def dicom_series(self, folder: Path) -> tuple[sitk.Image, str | None]:
        """Read the one CT series in ``folder``; check modality and even slice spacing."""
        reader = sitk.ImageSeriesReader()
        series = [
            reader.GetGDCMSeriesFileNames(str(folder), uid)
            for uid in reader.GetGDCMSeriesIDs(str(folder))
        ]
        if not series:
            raise self.error(folder, "ct", "no DICOM image series found in the folder")
        modalities = [_dicom_tag(files[0], "0008|0060") for files in series]
        ct_series = [
            files for files, modality in zip(series, modalities, strict=True) if modality == "CT"
        ]
        if len(ct_series) != 1:
            found = ", ".join(
                f"{len(files)} slice(s) of {modality or '?'}"
                for files, modality in zip(series, modalities, strict=True)
            )
            raise self.error(folder, "ct", f"expected one CT series in the folder, found {found}")
        files = ct_series[0]
        if len(files) < 2:
            raise self.error(folder, "ct", "the CT series has a single slice")
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            image = reader.Execute()
        except RuntimeError as error:
            reason = _itk_reason(error)
            raise self.error(folder, "ct", f"cannot read the DICOM series ({reason})") from None
        normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
        try:
            positions = [
                np.dot(normal, np.array(reader.GetMetaData(i, "0020|0032").split("\\"), float))
                for i in range(len(files))
            ]
        except (RuntimeError, ValueError):
            raise self.error(folder, "ct", "a slice lacks a valid ImagePositionPatient") from None
        gaps = np.diff(positions)
        median = float(np.median(gaps))
        if median <= 0 or np.max(np.abs(gaps - median)) > SLICE_GAP_RTOL * median:
            raise self.error(
                folder,
                "ct",
                f"slices are not evenly spaced (gaps {gaps.min():.3g} to {gaps.max():.3g} mm):"
                " missing or duplicate slices?",
            )
        frame = (
            reader.GetMetaData(0, "0020|0052").strip()
            if reader.HasMetaDataKey(0, "0020|0052")
            else None
        )
        return image, frame or None

    def rtstruct(self, path: Path, ct: sitk.Image, frame: str | None) -> sitk.Image:
        """Rasterise the RTSTRUCT ROI chosen by ``data.rtstruct_roi_pattern`` onto the CT grid."""
        field = "tumour_mask"
        try:
            ds = pydicom.dcmread(path)
        except Exception as error:  # pydicom raises many types for a damaged or foreign file
            raise self.error(
                path,
                field,
                f"not a mask image ({_formats()}) nor a readable DICOM file"
                f" ({type(error).__name__}: {error})",
            ) from None
        if ds.get("Modality") != "RTSTRUCT":
            raise self.error(
                path, field, f"DICOM modality is {ds.get('Modality')!r}, expected 'RTSTRUCT'"
            )
        try:
            name, roi_frame, contours = _select_roi(ds, self.cfg.data.rtstruct_roi_pattern)
        except ValueError as error:
            raise self.error(path, field, str(error)) from None
        if frame and roi_frame and roi_frame != frame:
            raise self.error(
                path,
                field,
                f"ROI {name!r} is in frame of reference {roi_frame}, the CT series in {frame}:"
                " the RTSTRUCT belongs to another scan",
            )
        try:
            array = _rasterise(contours, ct)
        except ValueError as error:
            raise self.error(path, field, f"ROI {name!r}: {error}") from None
        if not array.any():
            raise self.error(path, field, f"ROI {name!r} is empty (no closed planar contour)")
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(ct)
        return mask

    # -- checks

    def check_3d_scalar(self, image: sitk.Image, path: Path, field: str) -> None:
        """A 3D image of one value per voxel, on a grid of finite origin and direction and
        positive spacing; for floating-point voxels, every one finite."""
        if image.GetDimension() != 3:
            raise self.error(
                path,
                field,
                f"must be a 3D image, got {image.GetDimension()}D of size {image.GetSize()}",
            )
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise self.error(
                path,
                field,
                f"must have one value per voxel, got "
                f"{image.GetNumberOfComponentsPerPixel()} (colour/vector image)",
            )
        spacing = np.array(image.GetSpacing())
        geometry = np.r_[image.GetOrigin(), image.GetDirection(), spacing]
        if not np.isfinite(geometry).all() or (spacing <= 0).any():
            raise self.error(
                path,
                field,
                f"invalid grid: origin {_vector(image.GetOrigin())} mm, spacing "
                f"{_vector(spacing)} mm, direction {_vector(image.GetDirection())} (every value "
                "must be finite and the spacing > 0)",
            )
        if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
            bad = int((~np.isfinite(sitk.GetArrayViewFromImage(image))).sum())
            if bad:
                raise self.error(path, field, f"{bad} voxels are NaN or infinite")

    def values(self, mask: sitk.Image, path: Path, field: str) -> np.ndarray:
        try:
            return _distinct_integers(sitk.GetArrayViewFromImage(mask))
        except ValueError as error:
            raise self.error(path, field, str(error)) from None

    def check_grid(self, mask: sitk.Image, ct: sitk.Image, path: Path, field: str) -> None:
        differences = grid_differences(mask, ct)
        if differences:
            raise self.error(path, field, "not on the CT grid: " + "; ".join(differences))


_INTEGER_TYPES = {
    sitk.sitkInt8,
    sitk.sitkUInt8,
    sitk.sitkInt16,
    sitk.sitkUInt16,
    sitk.sitkInt32,
    sitk.sitkUInt32,
    sitk.sitkInt64,
    sitk.sitkUInt64,
}


def grid_differences(image: sitk.Image, reference: sitk.Image) -> list[str]:
    """How ``image``'s grid differs from ``reference``'s (size, spacing mm, origin mm,
    direction), within the module's tolerances; empty when they agree."""
    differences = []
    if image.GetSize() != reference.GetSize():
        differences.append(f"size {image.GetSize()} vs CT {reference.GetSize()} voxels")
    spacing, ct_spacing = np.array(image.GetSpacing()), np.array(reference.GetSpacing())
    if not np.allclose(spacing, ct_spacing, rtol=SPACING_RTOL, atol=0):
        differences.append(f"spacing {_vector(spacing)} vs CT {_vector(ct_spacing)} mm")
    origin, ct_origin = np.array(image.GetOrigin()), np.array(reference.GetOrigin())
    tolerance = min(ORIGIN_ATOL_MM, ORIGIN_ATOL_VOXELS * ct_spacing.min())
    if np.max(np.abs(origin - ct_origin)) > tolerance:
        differences.append(
            f"origin {_vector(origin)} vs CT {_vector(ct_origin)} mm (tolerance {tolerance:.3g} mm)"
        )
    if not np.allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
        differences.append(
            f"direction {_vector(image.GetDirection())} vs CT {_vector(reference.GetDirection())}"
        )
    return differences


def _select_roi(ds: pydicom.Dataset, pattern: str) -> tuple[str, str | None, list]:
    """(name, frame of reference UID, contour items) of the one ROI whose name matches
    ``pattern`` (ignoring case); ValueError naming the ROIs found otherwise."""
    try:
        rois = {int(item.ROINumber): item for item in ds.get("StructureSetROISequence", [])}
        names = {number: str(item.get("ROIName", "")).strip() for number, item in rois.items()}
        chosen = [n for n, name in names.items() if re.search(pattern, name, re.IGNORECASE)]
        if len(chosen) != 1:
            what = "no ROI matches" if not chosen else f"{len(chosen)} ROIs match"
            found = ", ".join(map(repr, names.values())) or "none"
            raise ValueError(f"{what} data.rtstruct_roi_pattern {pattern!r} (ROIs found: {found})")
        number = chosen[0]
        frame = str(rois[number].get("ReferencedFrameOfReferenceUID", "")) or None
        contours = next(
            (
                list(item.get("ContourSequence", []))
                for item in ds.get("ROIContourSequence", [])
                if int(item.ReferencedROINumber) == number
            ),
            [],
        )
    except (AttributeError, KeyError, TypeError) as error:
        raise ValueError(f"malformed RTSTRUCT ({type(error).__name__}: {error})") from None
    return names[number], frame, contours


def _rasterise(contours, ct: sitk.Image) -> np.ndarray:
    """(z, y, x) uint8 mask of the CLOSED_PLANAR contours (ContourData in mm, patient LPS) on the
    CT grid; ValueError when a contour leaves the grid or does not lie on a CT slice."""
    size = np.array(ct.GetSize())  # (x, y, z)
    to_index = np.linalg.inv(np.asarray(ct.GetDirection()).reshape(3, 3) @ np.diag(ct.GetSpacing()))
    origin = np.asarray(ct.GetOrigin())
    polygons: dict[int, list[np.ndarray]] = defaultdict(list)
    for contour in contours:
        if contour.get("ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
            continue
        try:
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        except (AttributeError, ValueError):
            raise ValueError("a contour has no valid ContourData (x, y, z triplets)") from None
        index = (points - origin) @ to_index.T  # (n, 3) continuous (x, y, z) voxel index
        if np.any(index < -0.5 - 1e-6) or np.any(index > size - 0.5 + 1e-6):
            raise ValueError("a contour lies outside the CT volume")
        slice_ = np.rint(index[:, 2])
        if np.max(np.abs(index[:, 2] - slice_)) > CONTOUR_PLANE_ATOL_VOXELS or np.ptp(slice_):
            raise ValueError(
                f"a contour at z = {points[0, 2]:.2f} mm does not lie on a CT slice"
                " (contours must be drawn on this CT's axial slices)"
            )
        polygons[int(slice_[0])].append(np.rint(index[:, :2]).astype(np.int32))
    mask = np.zeros(size[::-1], dtype=np.uint8)
    for k, slice_polygons in polygons.items():
        cv2.fillPoly(mask[k], slice_polygons, 1)
    return mask


def _distinct_integers(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a label array; ValueError if it holds non-integer values."""
    if array.dtype.kind == "f":
        fractional = array != np.round(array)  # NaN counts as fractional
        if fractional.any():
            raise ValueError(
                f"non-integer value(s) such as {array[fractional].flat[0]:g}: a mask holds whole "
                "labels (was it resampled with linear interpolation?)"
            )
    if array.min() >= 0 and array.max() <= 255:
        counts = np.bincount(array.astype(np.uint8, copy=False).ravel(), minlength=256)
        return np.flatnonzero(counts)
    return np.unique(array).astype(np.int64)


def _nifti_truncation(path: Path) -> str | None:
    """Why a NIfTI file holds less data than its header announces, or None. ITK reads such a
    file (plain or gzipped) without error and fills the missing voxels with zeros."""
    try:
        header = nibabel.load(path).header
    except Exception:  # nibabel raises many types for a damaged header; ITK then reports it
        return None
    expected = header.get_data_offset() + int(np.prod(header.get_data_shape())) * (
        header.get_data_dtype().itemsize
    )
    if path.name.lower().endswith(".gz"):
        size = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as error:
            return f"the gzip data is truncated or damaged ({error})"
    else:
        size = path.stat().st_size
    if size < expected:
        return f"{size} bytes of data where the header announces {expected}: truncated"
    return None


def _nifti_header_problem(path: Path) -> str | None:
    """What ITK would silently mend in a NIfTI file, or None: a zero voxel size (ITK takes 1
    mm), a non-finite origin or affine, or NaN/infinite floating-point voxels (ITK reads them
    as 0)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:  # the header as written (nibabel.load mends a zero pixdim, as ITK does)
        with opener(path, "rb") as stream:
            size = stream.read(4)
            kinds = {k.sizeof_hdr: k for k in (nibabel.Nifti1Header, nibabel.Nifti2Header)}
            kind = kinds.get(int.from_bytes(size, "little")) or kinds[int.from_bytes(size, "big")]
            stream.seek(0)
            header = kind.from_fileobj(stream, check=False)
    except Exception:  # a damaged header: ITK reports it
        return None
    pixdim = np.asarray(header["pixdim"][1:4], dtype=float)
    if not np.isfinite(pixdim).all() or (pixdim <= 0).any():
        return f"header pixdim (voxel size) {_vector(pixdim)} mm: every value must be > 0"
    affine = np.r_[header["qoffset_x"], header["qoffset_y"], header["qoffset_z"]]
    affine = np.r_[affine, np.ravel([header["srow_x"], header["srow_y"], header["srow_z"]])]
    if not np.isfinite(affine.astype(float)).all():
        return "header origin/affine (qoffset, srow) holds NaN or infinite values"
    if header.get_data_dtype().kind == "f":
        bad = int((~np.isfinite(np.asanyarray(nibabel.load(path).dataobj))).sum())
        if bad:
            return f"{bad} voxels are NaN or infinite"
    return None


def _min_max(image: sitk.Image) -> tuple[float, float]:
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return stats.GetMinimum(), stats.GetMaximum()


def _dicom_tag(path: str, key: str) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else None


def _itk_reason(error: RuntimeError) -> str:
    """The informative line of an ITK exception (drop file/line prefixes)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "ERROR:" in line or "Description:" in line:
            reason = line.split("ERROR:")[-1].split("Description:")[-1].strip()
            return re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", reason)
    return lines[-1] if lines else type(error).__name__


def _formats() -> str:
    return "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd)"


def _listed(values) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:10])) + (
        f" and {len(values) - 10} more" if len(values) > 10 else ""
    )


def _vector(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
