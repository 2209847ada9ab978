"""Hospital-side ingest: manifest rows, NIfTI/NRRD/MHA and DICOM + RTSTRUCT loading, and the
shared clinical schema (validation and encoding). Real files from the synthetic generator."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from rt_utils import RTStructBuilder

from fedmets.client.ingest import (
    PatientDataError,
    PatientRecord,
    load_patient_images,
    read_manifest,
)
from fedmets.shared.clinical import (
    CLINICAL_COLUMNS,
    encode_clinical,
    encoded_columns,
    validate_clinical,
)
from fedmets.shared.config import SiteConfig, load_site_config
from fedmets.shared.organs import ORGAN_LABELS


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> Path:
    return tiny_cohort


@pytest.fixture
def site(cohort: Path, tmp_path: Path) -> Path:
    """A private copy of hospital_a (tests may change it)."""
    return Path(shutil.copytree(cohort / "hospital_a", tmp_path / "hospital_a"))


def config(site: Path, **data: object) -> SiteConfig:
    cfg = load_site_config(site / "site.toml")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data)}) if data else cfg


def manifest(site: Path) -> pd.DataFrame:
    return pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)


def first_record(site: Path) -> PatientRecord:
    records, problems = read_manifest(config(site))
    assert problems == []
    return records[0]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ---- manifest -----------------------------------------------------------------------------------


def test_a_list_of_new_patients_may_leave_out_the_label_column(site: Path) -> None:
    manifest(site).drop(columns="dm").to_csv(site / "manifest.csv", index=False)
    records, problems = read_manifest(config(site), labelled=False)
    assert problems == [] and len(records) == len(manifest(site))
    assert all(record.label is None for record in records)
    with pytest.raises(ValueError, match="missing column\\(s\\) 'dm'"):
        read_manifest(config(site))


def test_read_manifest_resolves_rows(site: Path) -> None:
    records, problems = read_manifest(config(site))
    table = manifest(site)
    assert problems == []
    assert [r.patient_id for r in records] == list(table["patient_id"])
    assert [r.line for r in records] == list(range(2, len(table) + 2))  # the header: line 1
    for record in records:
        assert record.ct_path.is_absolute() and record.ct_path.is_file()
        assert record.tumour_mask_path.is_file() and record.organ_mask_path.is_file()
        assert set(record.clinical) == set(CLINICAL_COLUMNS)
        assert record.label in (0, 1)
    empty = [(r, c) for r in records for c, v in r.clinical.items() if v is None]
    assert empty, "the generator leaves some clinical cells empty"
    record, column = empty[0]
    assert table.loc[record.line - 2, column] == ""


def test_read_manifest_reports_bad_rows(site: Path) -> None:
    table = manifest(site)
    ids = list(table["patient_id"])
    table.loc[0, "patient_id"] = ""
    table.loc[1, "ct_path"] = " "
    table.loc[2, "dm"] = "yes"
    table.loc[3, "dm"] = ""
    table.loc[5, "patient_id"] = ids[4]
    table.to_csv(site / "manifest.csv", index=False)

    records, problems = read_manifest(config(site))

    messages = [str(problem) for problem in problems]
    assert messages == [
        "patient (line 2): manifest.csv: patient_id: empty id cell",
        f"patient {ids[1]}: manifest.csv: ct_path: empty cell: the ct file is required",
        f"patient {ids[2]}: manifest.csv: dm: label must be 0 or 1, got 'yes'",
        f"patient {ids[4]}: manifest.csv: patient_id: id used by lines 6 and 7; ids must be unique",
        f"patient {ids[4]}: manifest.csv: patient_id: id used by lines 6 and 7; ids must be unique",
    ]
    assert [problem.line for problem in problems] == [2, 3, 4, 6, 7]
    kept = [record.patient_id for record in records]
    assert kept == [ids[3], *ids[6:]]
    assert records[0].label is None  # an empty label cell is not a row problem


def test_problems_name_the_line_an_editor_shows(site: Path) -> None:
    """A message names a row by its line in the file, as an editor numbers them (the header is
    line 1), across a blank line and a quoted cell over two lines: not the data row's count."""
    lines = (site / "manifest.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index("subsite")] = '"oropharynx\n(base of tongue)"'  # a cell on two lines
    lines[2] = ",".join(cells)
    lines.insert(3, "")  # a blank line
    first = lines[4].split(",")[0]
    lines[7] = ",".join([first, *lines[7].split(",")[1:]])  # line 9 repeats line 6's id
    lines[8] = ",".join(["", *lines[8].split(",")[1:]])  # line 10: no id
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")
    editor = (site / "manifest.csv").read_text().splitlines()
    assert editor[5].startswith(first + ",") and editor[8].startswith(first + ",")

    _, problems = read_manifest(config(site))

    assert [str(problem) for problem in problems] == [
        f"patient {first}: manifest.csv: patient_id: id used by lines 6 and 9; ids must be unique",
        f"patient {first}: manifest.csv: patient_id: id used by lines 6 and 9; ids must be unique",
        "patient (line 10): manifest.csv: patient_id: empty id cell",
    ]


def test_two_patients_listed_with_the_same_image_file_are_both_quarantined(site: Path) -> None:
    """A copy-paste slip: row 3 names row 2's CT. Both rows are that patient's problem (the
    files are one patient's, under two ids); the other rows are read."""
    table = manifest(site)
    ids = list(table["patient_id"])
    table.loc[2, "ct_path"] = table.loc[1, "ct_path"]
    table.to_csv(site / "manifest.csv", index=False)

    records, problems = read_manifest(config(site))

    ct = Path(table.loc[1, "ct_path"]).name
    assert [str(problem) for problem in problems] == [
        f"patient {ids[1]}: manifest.csv: ct_path: {ct} is also listed for patient(s) {ids[2]};"
        " one patient's files",
        f"patient {ids[2]}: manifest.csv: ct_path: {ct} is also listed for patient(s) {ids[1]};"
        " one patient's files",
    ]
    assert [record.patient_id for record in records] == [ids[0], *ids[3:]]


def test_an_unreadable_manifest_row_is_that_patients_problem(site: Path) -> None:
    """A cell that is not UTF-8 (a Latin-1 accent) or a row of more cells than the header
    quarantines that row, naming its patient and the column; the other rows are read."""
    lines = (site / "manifest.csv").read_bytes().splitlines(keepends=True)
    header = lines[0].decode().strip().split(",")
    cells = lines[1].decode().rstrip("\r\n").split(",")
    cells[header.index("subsite")] = "oropharynx \xe9"
    lines[1] = ",".join(cells).encode("latin-1") + b"\n"
    lines[2] = lines[2].rstrip(b"\r\n") + b",extra,cells\n"
    (site / "manifest.csv").write_bytes(b"".join(lines))
    ids = [line.decode("latin-1").split(",")[0] for line in lines[1:]]

    records, problems = read_manifest(config(site))

    assert [str(problem) for problem in problems] == [
        f"patient {ids[0]}: manifest.csv: subsite: not UTF-8 text (byte 0xE9): save the "
        "manifest as UTF-8",
        f"patient {ids[1]}: manifest.csv: row: {len(header) + 2} cells where the header has "
        f"{len(header)}",
    ]
    assert [record.patient_id for record in records] == ids[2:]
    assert [record.line for record in records] == list(range(4, len(ids) + 2))


def test_a_rows_clinical_problems_are_named_with_its_label(site: Path) -> None:
    table = manifest(site)
    table.loc[0, ["dm", "age"]] = ["2", "seventy"]
    table.to_csv(site / "manifest.csv", index=False)
    _, problems = read_manifest(config(site))
    assert [(problem.field, problem.line) for problem in problems] == [("dm", 2), ("age", 2)]


@pytest.mark.parametrize("column", ["tumour_mask_path", "hpv", "dm"])
def test_missing_manifest_column_is_a_site_error(site: Path, column: str) -> None:
    manifest(site).drop(columns=column).to_csv(site / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=rf"manifest\.csv: missing column\(s\) '{column}' "):
        read_manifest(config(site))


def test_header_cells_are_stripped_and_rows_of_empty_cells_skipped(site: Path) -> None:
    """A header cell 'dm ' names column dm; a row of empty cells (an Excel leftover, here
    wider than the header) is skipped like a blank line, not counted as a patient."""
    lines = (site / "manifest.csv").read_text().splitlines()
    width = lines[0].count(",")
    lines[0] = lines[0].replace(",dm", ", dm ")
    lines.insert(3, "," * width)
    lines.append(" ," * (width + 3))
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")

    records, problems = read_manifest(config(site))

    assert problems == []
    lines_of_rows = [2, 3, *range(5, len(lines))]  # line 4: empty cells; the last: spaces
    assert [record.line for record in records] == lines_of_rows
    assert all(record.label in (0, 1) for record in records)


def test_a_repeated_column_name_is_a_site_error(site: Path) -> None:
    lines = (site / "manifest.csv").read_text().splitlines()
    lines = [lines[0] + ",age , hpv", *(line + ",17," for line in lines[1:])]
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as caught:
        read_manifest(config(site))
    assert str(caught.value) == (
        f"{site / 'manifest.csv'}: repeated column name(s) in the header: 'age', 'hpv';"
        " each column needs its own name"
    )


def test_a_semicolon_separated_manifest_is_refused(site: Path) -> None:
    """A European Excel export (';' between cells, decimal commas) is named as such."""
    text = (site / "manifest.csv").read_text()
    (site / "manifest.csv").write_text(text.replace(",", ";").replace(".", ","))
    with pytest.raises(ValueError, match=r"manifest\.csv: the header row is separated by semi"):
        read_manifest(config(site))


# ---- image files --------------------------------------------------------------------------------


def test_load_nifti_patient(site: Path) -> None:
    record = first_record(site)
    images = load_patient_images(record, config(site))
    original = sitk.ReadImage(str(record.ct_path))
    assert images.ct.GetPixelID() == sitk.sitkInt16
    assert images.tumour.GetPixelID() == sitk.sitkUInt8
    assert images.organs.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(images.ct), sitk.GetArrayFromImage(original)
    )
    assert set(np.unique(sitk.GetArrayFromImage(images.tumour))) == {0, 1}
    assert set(np.unique(sitk.GetArrayFromImage(images.organs))) <= {0, *ORGAN_LABELS.values()}
    for mask in (images.tumour, images.organs):
        assert mask.GetSize() == original.GetSize()
        assert mask.GetSpacing() == original.GetSpacing()
        assert mask.GetOrigin() == original.GetOrigin()


def test_nrrd_and_mha_inputs_load(site: Path) -> None:
    record = first_record(site)
    converted = {
        "ct_path": "images/p_ct.nrrd",
        "tumour_mask_path": "masks/p_tumour.mha",
        "organ_mask_path": "masks/p_organs.nrrd",
    }
    table = manifest(site)
    for column, name in converted.items():
        sitk.WriteImage(sitk.ReadImage(str(getattr(record, column))), str(site / name), True)
        table.loc[0, column] = name
    table.to_csv(site / "manifest.csv", index=False)

    records, _ = read_manifest(config(site))
    images = load_patient_images(records[0], config(site))

    assert records[0].ct_path == site / "images/p_ct.nrrd"
    for image, column in zip(images.__dict__.values(), converted, strict=True):
        original = sitk.GetArrayFromImage(sitk.ReadImage(str(getattr(record, column))))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), original)


def test_error_names_patient_file_and_field(site: Path) -> None:
    record = first_record(site)
    mask = sitk.ReadImage(str(record.tumour_mask_path))
    empty = sitk.Image(mask.GetSize(), mask.GetPixelID())
    empty.CopyInformation(mask)
    sitk.WriteImage(empty, str(record.tumour_mask_path))
    with pytest.raises(PatientDataError) as caught:
        load_patient_images(record, config(site))
    pid = record.patient_id
    assert (
        str(caught.value) == f"patient {pid}: masks/{pid}_tumour.nii.gz: tumour_mask: mask is empty"
    )
    assert (caught.value.patient_id, caught.value.field) == (pid, "tumour_mask")


@pytest.mark.parametrize("field", ["ct", "tumour_mask", "organ_mask"])
def test_an_empty_image_file_is_named_as_such(site: Path, field: str) -> None:
    record = first_record(site)
    path = getattr(record, f"{field}_path")
    path.write_bytes(b"")
    with pytest.raises(PatientDataError) as caught:
        load_patient_images(record, config(site))
    assert (caught.value.field, caught.value.message) == (field, "file is empty (0 bytes)")


def test_an_empty_rtstruct_file_is_named_as_such(site: Path) -> None:
    record = first_record(site)
    empty = site / "masks" / "rtstruct.dcm"
    empty.write_bytes(b"")
    with pytest.raises(PatientDataError, match="tumour_mask: file is empty"):
        load_patient_images(dataclasses.replace(record, tumour_mask_path=empty), config(site))


def _nifti_header(path: Path, **fields: object) -> None:
    """Rewrite ``path``'s NIfTI header fields as given (nibabel would mend them on save)."""
    image = nibabel.load(path)
    data = np.asanyarray(image.dataobj)
    header = image.header.copy()
    for name, value in {"vox_offset": 352, **fields}.items():
        header[name] = value
    raw = header.binaryblock + b"\0" * 4  # no extension, then the voxels
    with gzip.open(path, "wb") as stream:
        stream.write(raw + data.astype(header.get_data_dtype()).tobytes(order="F"))


def test_a_grid_itk_would_mend_is_refused(site: Path) -> None:
    """ITK reads a zero voxel size as 1 mm, NaN or infinite float voxels as 0, and takes a NaN
    origin as it is (whose grid arithmetic then never ends): each is the file's problem."""
    record = first_record(site)
    ct = record.ct_path
    pixdim = nibabel.load(ct).header["pixdim"].copy()
    pixdim[3] = 0.0
    _nifti_header(ct, pixdim=pixdim)
    with pytest.raises(PatientDataError, match=r"ct: header pixdim \(voxel size\) .* mm: every"):
        load_patient_images(record, config(site))
    _nifti_header(ct, pixdim=nibabel.load(record.organ_mask_path).header["pixdim"])
    load_patient_images(record, config(site))  # mended: loads
    _nifti_header(ct, qoffset_x=np.nan, srow_x=[3.0, 0.0, 0.0, np.nan])
    with pytest.raises(PatientDataError, match=r"ct: header origin/affine .* NaN"):
        load_patient_images(record, config(site))
    image = sitk.ReadImage(str(record.organ_mask_path))
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    hu[0, 0, :3] = [np.nan, np.inf, -np.inf]
    for suffix in (".nii.gz", ".mha"):
        path = site / "images" / f"float{suffix}"
        float_ct = sitk.GetImageFromArray(hu)
        float_ct.CopyInformation(image)
        sitk.WriteImage(float_ct, str(path))
        bad = PatientRecord(**{**record.__dict__, "ct_path": path})
        with pytest.raises(PatientDataError, match=rf"float{suffix}: ct: 3 voxels are NaN"):
            load_patient_images(bad, config(site))


# ---- DICOM + RTSTRUCT ---------------------------------------------------------------------------


def write_dicom_series(ct: sitk.Image, folder: Path) -> None:
    """One CT slice per file, stored unsigned with RescaleIntercept -1024 (HU = stored - 1024)."""
    folder.mkdir(parents=True)
    hu = sitk.GetArrayFromImage(ct)  # (z, y, x)
    sx, sy, sz = ct.GetSpacing()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(hu.shape[0]):
        uid = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, uid, "CT"
        ds.PatientID = ds.PatientName = "TEST"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.StudyDate, ds.StudyTime = "1", "20240101", "120000"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = list(ct.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [sy, sx], sz
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"CT_{k:03d}.dcm", enforce_file_format=True)


def write_rtstruct(series: Path, rois: dict[str, np.ndarray], path: Path) -> None:
    """RTSTRUCT with one ROI per (z, y, x) mask; rt-utils wants (rows, columns, slices)."""
    rtstruct = RTStructBuilder.create_new(dicom_series_path=str(series))
    for name, mask in rois.items():
        rtstruct.add_roi(mask=np.transpose(mask, (1, 2, 0)).astype(bool), name=name)
    rtstruct.save(str(path))


@pytest.fixture
def dicom_site(site: Path) -> tuple[Path, PatientRecord]:
    """hospital_a with its first patient as a DICOM series + RTSTRUCT (GTVp and Parotid_L)."""
    record = first_record(site)
    ct = sitk.ReadImage(str(record.ct_path))
    write_dicom_series(ct, site / "dicom" / "ct")
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(record.tumour_mask_path)))
    organs = sitk.GetArrayFromImage(sitk.ReadImage(str(record.organ_mask_path)))
    parotid = organs == ORGAN_LABELS["parotid_left"]
    assert parotid.any()
    rois = {"Parotid_L": parotid, "GTVp": tumour}  # the parotid comes first on purpose
    write_rtstruct(site / "dicom" / "ct", rois, site / "dicom" / "rtstruct.dcm")
    table = manifest(site)
    table.loc[0, ["ct_path", "tumour_mask_path"]] = ["dicom/ct", "dicom/rtstruct.dcm"]
    table.to_csv(site / "manifest.csv", index=False)
    return site, record


def test_dicom_series_and_rtstruct_round_trip(dicom_site: tuple[Path, PatientRecord]) -> None:
    site, original = dicom_site
    records, problems = read_manifest(config(site))
    assert problems == [] and records[0].ct_path == site / "dicom" / "ct"

    images = load_patient_images(records[0], config(site))

    ct = sitk.ReadImage(str(original.ct_path))
    assert images.ct.GetSize() == ct.GetSize()
    np.testing.assert_allclose(images.ct.GetSpacing(), ct.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(images.ct.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    hu = sitk.GetArrayFromImage(images.ct).astype(float)
    assert np.max(np.abs(hu - sitk.GetArrayFromImage(ct))) <= 1.0
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(original.tumour_mask_path)))
    loaded = sitk.GetArrayFromImage(images.tumour)
    assert set(np.unique(loaded)) == {0, 1}
    assert dice(loaded, tumour) >= 0.95
    organs = sitk.GetArrayFromImage(images.organs)
    assert dice(loaded, organs == ORGAN_LABELS["parotid_left"]) < 0.1  # GTVp, not Parotid_L


def test_rtstruct_on_a_nifti_ct(dicom_site: tuple[Path, PatientRecord]) -> None:
    site, original = dicom_site
    table = manifest(site)
    table.loc[0, "ct_path"] = original.ct_path.relative_to(site).as_posix()
    table.to_csv(site / "manifest.csv", index=False)
    records, _ = read_manifest(config(site))
    images = load_patient_images(records[0], config(site))
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(original.tumour_mask_path)))
    assert dice(sitk.GetArrayFromImage(images.tumour), tumour) >= 0.95


def test_rtstruct_roi_pattern_is_configurable(dicom_site: tuple[Path, PatientRecord]) -> None:
    site, original = dicom_site
    records, _ = read_manifest(config(site))
    images = load_patient_images(records[0], config(site, rtstruct_roi_pattern=r"^parotid_l$"))
    organs = sitk.GetArrayFromImage(sitk.ReadImage(str(original.organ_mask_path)))
    parotid = organs == ORGAN_LABELS["parotid_left"]
    assert dice(sitk.GetArrayFromImage(images.tumour), parotid) >= 0.95


def test_rtstruct_without_matching_roi_names_the_rois(
    dicom_site: tuple[Path, PatientRecord],
) -> None:
    site, original = dicom_site
    organs = sitk.GetArrayFromImage(sitk.ReadImage(str(original.organ_mask_path)))
    rois = {
        name: organs == ORGAN_LABELS[organ]
        for name, organ in [("Parotid_L", "parotid_left"), ("SpinalCord", "spinal_cord")]
    }
    write_rtstruct(site / "dicom" / "ct", rois, site / "dicom" / "rtstruct.dcm")
    records, _ = read_manifest(config(site))
    with pytest.raises(PatientDataError) as caught:
        load_patient_images(records[0], config(site))
    assert str(caught.value) == (
        f"patient {original.patient_id}: dicom/rtstruct.dcm: tumour_mask: no ROI matches"
        " data.rtstruct_roi_pattern '^(gtvp|gtv-?1|gtv_?primary|gtv)$'"
        " (ROIs found: 'Parotid_L', 'SpinalCord')"
    )


def test_rtstruct_with_two_matching_rois_is_refused(
    dicom_site: tuple[Path, PatientRecord],
) -> None:
    site, original = dicom_site
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(original.tumour_mask_path)))
    rois = {"GTV": tumour, "GTVp": tumour}
    write_rtstruct(site / "dicom" / "ct", rois, site / "dicom" / "rtstruct.dcm")
    records, _ = read_manifest(config(site))
    with pytest.raises(PatientDataError, match=r"2 ROIs match .* \(ROIs found: 'GTV', 'GTVp'\)"):
        load_patient_images(records[0], config(site))


def test_rtstruct_of_another_scan_is_refused(dicom_site: tuple[Path, PatientRecord]) -> None:
    site, original = dicom_site
    ct = sitk.ReadImage(str(original.ct_path))
    write_dicom_series(ct, site / "dicom" / "other_ct")  # same pixels, new frame of reference
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(original.tumour_mask_path)))
    write_rtstruct(site / "dicom" / "other_ct", {"GTVp": tumour}, site / "dicom" / "rtstruct.dcm")
    records, _ = read_manifest(config(site))
    with pytest.raises(PatientDataError, match="the RTSTRUCT belongs to another scan"):
        load_patient_images(records[0], config(site))


def test_dicom_series_with_a_missing_slice_is_refused(
    dicom_site: tuple[Path, PatientRecord],
) -> None:
    site, _ = dicom_site
    (site / "dicom" / "ct" / "CT_010.dcm").unlink()
    records, _ = read_manifest(config(site))
    with pytest.raises(PatientDataError, match=r"dicom/ct: ct: slices are not evenly spaced"):
        load_patient_images(records[0], config(site))


# ---- clinical schema ----------------------------------------------------------------------------

VALID = {
    "age": "62",
    "sex": "M",
    "smoking": "ex",
    "alcohol": "yes",
    "t_stage": "T2",
    "n_stage": "N1",
    "hpv": "positive",
    "subsite": "larynx",
}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, []),
        ({"smoking": " Former ", "t_stage": "T4a", "n_stage": "N2c", "hpv": "", "sex": "f"}, []),
        ({"t_stage": "TX", "n_stage": "nx", "alcohol": None, "subsite": "Oral cavity"}, []),
        (
            {"smoking": "sometimes"},
            [("smoking", "unknown category 'sometimes' (known: never, ex, current)")],
        ),
        ({"age": "150"}, [("age", "must be between 18 and 100 years, got 150")]),
        ({"age": "sixty"}, [("age", "must be a number, got 'sixty'")]),
        ({"age": ""}, [("age", "required value is missing")]),
        ({"sex": None}, [("sex", "required value is missing")]),
        (
            {"t_stage": "Tis"},
            [
                (
                    "t_stage",
                    "Tis (carcinoma in situ) is not eligible: fedmets needs a T1..T4 "
                    "primary tumour",
                )
            ],
        ),
        (
            {"n_stage": "N4", "hpv": "maybe"},
            [
                ("n_stage", "unknown category 'N4' (known: N0, N1, N2, N3)"),
                ("hpv", "unknown category 'maybe' (known: positive, negative)"),
            ],
        ),
    ],
)
def test_validate_clinical(changes: dict, expected: list) -> None:
    assert validate_clinical({**VALID, **changes}) == expected


def test_encode_clinical_same_columns_at_every_site() -> None:
    site_a = pd.DataFrame([VALID, {**VALID, "subsite": "oropharynx", "t_stage": "T4b"}])
    site_b = pd.DataFrame(
        [{**VALID, "smoking": "never", "hpv": None, "n_stage": "N2a", "sex": "F", "age": 40.5}]
    )
    encoded_a, encoded_b = encode_clinical(site_a), encode_clinical(site_b)
    assert list(encoded_a.columns) == list(encoded_b.columns) == encoded_columns()
    assert encoded_a.columns[:3].tolist() == ["age", "sex_male", "smoking_never"]
    assert "subsite_hypopharynx" in encoded_a.columns  # a category neither site has
    assert encoded_a["t_stage_t4"].tolist() == [0.0, 1.0]
    row = encoded_b.iloc[0]
    assert (row["age"], row["sex_male"], row["n_stage_n2"]) == (40.5, 0.0, 1.0)
    assert (row["hpv_missing"], row["hpv_positive"], row["hpv_negative"]) == (1.0, 0.0, 0.0)
    assert encoded_a[["hpv_missing", "smoking_missing"]].to_numpy().sum() == 0
    for name, spec in CLINICAL_COLUMNS.items():
        if spec.kind == "category" and name != "sex":
            group = [f"{name}_{c.lower()}" for c in spec.categories] + [f"{name}_missing"]
            assert (encoded_b[group].sum(axis=1) == 1).all()


def test_encode_clinical_refuses_bad_cells() -> None:
    table = pd.DataFrame([VALID, {**VALID, "alcohol": "often"}], index=["HA-1", "HA-2"])
    with pytest.raises(ValueError, match=r"row 2 \(index 'HA-2'\): alcohol: unknown category"):
        encode_clinical(table)
    with pytest.raises(ValueError, match="lacks the column"):
        encode_clinical(table.drop(columns="hpv"))
