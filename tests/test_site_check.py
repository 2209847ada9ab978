"""`fedmets site check`: each kind of bad input quarantines its patient with a message naming
file and field, and every other patient stays usable. Real files from the synthetic generator."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import CliResult, run_fedmets

from fedmets.client import site_check
from fedmets.client.site_check import SiteCheckReport, check_site, ct_value_problems
from fedmets.shared.config import load_site_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> Path:
    return tiny_cohort


def copy_site(cohort: Path, folder: Path) -> Path:
    return Path(shutil.copytree(cohort / "hospital_a", folder / "hospital_a"))


def read_table(site: Path) -> pd.DataFrame:
    return pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)


def rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray], **geometry) -> None:
    """Apply ``change`` to the voxels (z, y, x) of an image file; optionally set its spacing or
    origin."""
    image = sitk.ReadImage(str(path))
    changed = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
    changed.CopyInformation(image)
    if "spacing" in geometry:
        changed.SetSpacing(geometry["spacing"])
    if "origin" in geometry:
        changed.SetOrigin(geometry["origin"])
    sitk.WriteImage(changed, str(path), True)


def one_voxel(mask: np.ndarray) -> np.ndarray:
    single = np.zeros_like(mask)
    single[tuple(np.argwhere(mask)[0])] = 1
    return single


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def shifted_origin(path: Path) -> tuple[float, ...]:
    x, y, z = sitk.ReadImage(str(path)).GetOrigin()
    return (x + 2.0, y, z)


def set_cell(column: str, value: str) -> Callable[[Path, pd.DataFrame, int], None]:
    def apply(site: Path, table: pd.DataFrame, i: int) -> None:
        table.loc[i, column] = value

    return apply


def duplicate_into_next_row(site: Path, table: pd.DataFrame, i: int) -> None:
    table.loc[i + 1, "patient_id"] = table.loc[i, "patient_id"]


# (what is done to one patient, field, expected message); {ct}/{tumour}/{organs}/{id} are
# that patient's files and id. Each row breaks a different patient.
DEFECTS: dict[str, tuple[Callable[[Path, pd.DataFrame, int], None], str, str]] = {
    "corrupt_ct": (
        lambda site, table, i: truncate(site / table.loc[i, "ct_path"]),
        "{ct}: ct",
        "corrupt file: the gzip data is truncated or damaged",
    ),
    "not_an_image": (
        lambda site, table, i: (site / table.loc[i, "tumour_mask_path"]).write_text("hello"),
        "{tumour}: tumour_mask",
        "cannot read the image (Unable to determine ImageIO reader",
    ),
    "mask_spacing": (
        lambda site, table, i: rewrite(
            site / table.loc[i, "tumour_mask_path"], lambda a: a, spacing=(3.0, 3.0, 5.0)
        ),
        "{tumour}: tumour_mask",
        "not on the CT grid: spacing (3, 3, 5) vs CT (3, 3, 4) mm",
    ),
    "mask_origin": (
        lambda site, table, i: rewrite(
            site / table.loc[i, "organ_mask_path"],
            lambda a: a,
            origin=shifted_origin(site / table.loc[i, "organ_mask_path"]),
        ),
        "{organs}: organ_mask",
        "not on the CT grid: origin",
    ),
    "empty_mask": (
        lambda site, table, i: rewrite(site / table.loc[i, "tumour_mask_path"], np.zeros_like),
        "{tumour}: tumour_mask",
        "mask is empty",
    ),
    "mask_value_2": (
        lambda site, table, i: rewrite(
            site / table.loc[i, "tumour_mask_path"], lambda a: a + one_voxel(a)
        ),
        "{tumour}: tumour_mask",
        "values must be 0/1 (or 0/255), found 0, 1, 2",
    ),
    "organ_label_99": (
        lambda site, table, i: rewrite(
            site / table.loc[i, "organ_mask_path"], lambda a: np.where(a == 3, 99, a)
        ),
        "{organs}: organ_mask",
        "unknown label(s) 99 (known: 0 background, 1 spinal_cord,",
    ),
    "missing_file": (
        lambda site, table, i: (site / table.loc[i, "organ_mask_path"]).unlink(),
        "{organs}: organ_mask",
        "file not found",
    ),
    "unscaled_ct": (
        lambda site, table, i: rewrite(site / table.loc[i, "ct_path"], lambda a: a + 1024),
        "{ct}: ct",
        "no air: no voxel below -500 HU (lowest 0); raw stored values without the DICOM rescale",
    ),
    "tiny_tumour": (
        lambda site, table, i: rewrite(site / table.loc[i, "tumour_mask_path"], one_voxel),
        "{tumour}: tumour_mask",
        "tumour volume 0.036 cc (1 voxels) is outside the plausible 0.5..500 cc",
    ),
    "unknown_category": (
        set_cell("smoking", "sometimes"),
        "manifest.csv: smoking",
        "unknown category 'sometimes' (known: never, ex, current)",
    ),
    "age_out_of_range": (
        set_cell("age", "150"),
        "manifest.csv: age",
        "must be between 18 and 100 years, got 150",
    ),
    "sex_missing": (
        set_cell("sex", ""),
        "manifest.csv: sex",
        "required value is missing",
    ),
    "label_missing": (
        set_cell("dm", ""),
        "manifest.csv: dm",
        "label is missing (must be 0 or 1)",
    ),
    "duplicate_id": (
        duplicate_into_next_row,
        "manifest.csv: patient_id",
        "id used by lines {row} and {next_row}; ids must be unique",
    ),
}
# Inputs that must pass: a 0/255 tumour mask, and NRRD / MHA files.
GOOD_VARIANTS = ("mask_0_255", "nrrd_mha")


@pytest.fixture(scope="module")
def broken(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteCheckReport, dict]:
    """hospital_a with one defect per patient (DEFECTS, then GOOD_VARIANTS), checked once."""
    site = copy_site(cohort, tmp_path_factory.mktemp("broken"))
    table = read_table(site)
    patients = {}
    i = 0
    for name, (apply, _, _) in DEFECTS.items():
        patients[name] = (i, table.loc[i].to_dict())
        apply(site, table, i)
        i += 2 if name == "duplicate_id" else 1  # the duplicate takes the next row too
    patients["mask_0_255"] = (i, table.loc[i].to_dict())
    rewrite(site / table.loc[i, "tumour_mask_path"], lambda a: a * 255)
    i += 1
    patients["nrrd_mha"] = (i, table.loc[i].to_dict())
    for column, suffix in [("ct_path", ".nrrd"), ("tumour_mask_path", ".mha")]:
        old = site / table.loc[i, column]
        new = old.with_name(old.name.replace(".nii.gz", suffix))
        sitk.WriteImage(sitk.ReadImage(str(old)), str(new), True)
        old.unlink()
        table.loc[i, column] = new.relative_to(site).as_posix()
    table.to_csv(site / "manifest.csv", index=False)
    untouched = list(table["patient_id"][i + 1 :])
    assert len(untouched) >= 4
    with pytest.MonkeyPatch.context() as patch:  # use the process pool even for a tiny site
        patch.setattr(site_check, "POOL_MIN_SECONDS", 0.0)
        report = check_site(load_site_config(site / "site.toml"), workers=2)
    return report, {"patients": patients, "untouched": untouched, "rows": len(table)}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_quarantines_its_patient(broken, defect: str) -> None:
    report, info = broken
    i, row = info["patients"][defect]
    _, where, message = DEFECTS[defect]
    names = {
        "ct": row["ct_path"],
        "tumour": row["tumour_mask_path"],
        "organs": row["organ_mask_path"],
    }
    expected = where.format(**names) + ": " + message.format(row=i + 2, next_row=i + 3)
    problems = report.quarantined.get(row["patient_id"], [])
    assert any(problem.startswith(expected) for problem in problems), problems
    assert all(problem.startswith(where.format(**names) + ": ") for problem in problems)


def test_other_patients_stay_usable(broken) -> None:
    report, info = broken
    good = [info["patients"][name][1]["patient_id"] for name in GOOD_VARIANTS]
    assert report.usable == good + info["untouched"]
    assert len(report.quarantined) == len(DEFECTS)
    assert report.n_patients == info["rows"]
    assert report.site_problems == []
    assert report.to_json()["n_usable"] == len(report.usable)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda hu: hu, []),
        (lambda hu: np.where(np.arange(hu.shape[2]) < 3, -3024, hu), []),  # padding columns
        (
            lambda hu: np.where(np.arange(hu.size).reshape(hu.shape) % 997 == 0, -2000, hu),
            ["lowest value -2000 HU is below -1100 HU"],
        ),
        (lambda hu: np.full_like(hu, 40), ["the CT is constant (40 everywhere)"]),
        (lambda hu: np.maximum(hu, -400), ["no air: no voxel below -500 HU (lowest -400); raw"]),
        (lambda hu: np.where(hu > 3000, 5000, hu), ["highest value 5000 HU is above 4000 HU"]),
    ],
)
def test_ct_value_rules(cohort: Path, change, expected: list[str]) -> None:
    ct = sitk.ReadImage(str(cohort / "hospital_a" / "images" / "HA-0001_ct.nii.gz"))
    hu = sitk.GetArrayFromImage(ct)
    assert (hu.min(), hu.max()) == (-1024, 3071)
    problems = ct_value_problems(sitk.GetImageFromArray(change(hu)))
    assert len(problems) == len(expected)
    assert all(got.startswith(want) for got, want in zip(problems, expected, strict=True))


def test_missing_clinical_column_is_a_site_problem(cohort: Path, tmp_path: Path) -> None:
    site = copy_site(cohort, tmp_path)
    read_table(site).drop(columns="smoking").to_csv(site / "manifest.csv", index=False)
    report = check_site(load_site_config(site / "site.toml"), workers=1)
    assert report.usable == [] and report.quarantined == {}
    assert len(report.site_problems) == 1
    assert report.site_problems[0].startswith(
        f"{site / 'manifest.csv'}: missing column(s) 'smoking' "
    )


# ---- command line -------------------------------------------------------------------------------


def run_cli(*args: str) -> CliResult:
    return run_fedmets("site", "check", *args, cwd=REPO)


def test_cli_reports_quarantined_patient(cohort: Path, tmp_path: Path) -> None:
    site = copy_site(cohort, tmp_path)
    table = read_table(site)
    rewrite(site / table.loc[2, "tumour_mask_path"], np.zeros_like)
    toml = site / "site.toml"
    name = "Hôpital A [/] [bold]nord"  # brackets are text in a name, not markup
    toml.write_text(toml.read_text().replace("seed = ", f'display_name = "{name}"\nseed = ', 1))

    result = run_cli("--config", str(toml), "--workers", "1")

    assert result.returncode == 0, result.stderr
    assert f"site check: hospital_a ({name})" in result.stdout
    assert "quarantined" in result.stdout and table.loc[2, "patient_id"] in result.stdout
    report = json.loads((site / "output" / "site_check.json").read_text())
    assert report["quarantined"] == {
        table.loc[2, "patient_id"]: [
            f"{table.loc[2, 'tumour_mask_path']}: tumour_mask: mask is empty"
        ]
    }
    assert report["n_usable"] == len(table) - 1


def test_the_cli_counts_rows_sharing_an_id_as_one_patient(cohort: Path, tmp_path: Path) -> None:
    site = copy_site(cohort, tmp_path)
    table = read_table(site)
    table.loc[1, "patient_id"] = table.loc[0, "patient_id"]
    table.to_csv(site / "manifest.csv", index=False)

    result = run_cli("--config", str(site / "site.toml"), "--workers", "1")

    n = len(table)
    assert f"{n - 2} of {n - 1} patients ({n} rows) usable, 1 quarantined" in result.stdout


def test_cli_exits_1_when_nothing_is_usable(cohort: Path, tmp_path: Path) -> None:
    site = copy_site(cohort, tmp_path)
    table = read_table(site)
    table["ct_path"] = "images/nowhere.nii.gz"
    table.to_csv(site / "manifest.csv", index=False)

    result = run_cli("--config", str(site / "site.toml"), "--report", str(tmp_path / "r.json"))

    assert result.returncode == 1
    assert f"no usable patient: all {len(table)} are quarantined" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["usable"] == [] and len(report["quarantined"]) == len(table)
    assert all(
        problems == ["images/nowhere.nii.gz: ct: file not found"]
        for problems in report["quarantined"].values()
    )


def test_cli_prints_config_problems(cohort: Path, tmp_path: Path) -> None:
    site = copy_site(cohort, tmp_path)
    toml = site / "site.toml"
    toml.write_text(toml.read_text().replace("workers = 2", 'workers = "two"'))

    result = run_cli("--config", str(toml))

    assert result.returncode == 1
    assert f"{toml}: compute.workers: must be an integer, got 'two'" in result.stderr
    assert not (site / "output").exists()


def test_cli_names_a_report_it_cannot_write_before_checking(cohort: Path, tmp_path: Path) -> None:
    """--report on a folder, or under a file, is one line naming the option and what is there
    (it was '[Errno 21] ... .partial' or 'File exists'), said before any patient is checked."""
    site = copy_site(cohort, tmp_path)
    toml = str(site / "site.toml")
    result = run_cli("--config", toml, "--report", str(tmp_path))
    assert result.returncode == 1 and "checking" not in result.stdout
    assert result.stderr == f"--report: cannot write {tmp_path}: a folder, not a file\n"
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file\n")
    result = run_cli("--config", toml, "--report", str(blocker / "check.json"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"--report: cannot write {blocker}: a file, not a folder\n"
    assert not (site / "output").exists()
