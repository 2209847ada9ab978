"""The synthetic cohort on disk, through the real `fedmets synth` command: determinism across worker
counts, geometry, masks, manifests, site configs, and ground truth kept away from the sites."""

import filecmp
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import CliResult, run_fedmets

from fedmets.shared.config import check_config_file
from fedmets.shared.organs import ORGAN_LABELS
from fedmets.simulation.cohort import MANIFEST_CLINICAL_COLUMNS
from fedmets.simulation.synth import generate_cohort


def _synth(out: Path, *extra: str) -> CliResult:
    return run_fedmets("synth", "--preset", "tiny", "--out", out, *extra)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    result = _synth(out, "--seed", "5", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "oracle AUC" in result.stdout and "hospital_c" in result.stdout
    assert "…" not in result.stdout  # the summary table is not cut at 80 columns
    return out


def _all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_same_seed_identical_files_whatever_the_worker_count(cohort, tmp_path):
    again = tmp_path / "again"
    assert _synth(again, "--seed", "5", "--workers", "1").returncode == 0
    files = _all_files(cohort)
    assert files == _all_files(again)
    _, mismatch, errors = filecmp.cmpfiles(cohort, again, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []


@pytest.mark.slow
def test_other_seed_gives_other_images(cohort, tmp_path):
    other = tmp_path / "other"
    assert _synth(other, "--seed", "6", "--workers", "2").returncode == 0
    ct_a = sitk.ReadImage(str(cohort / "hospital_a/images/HA-0001_ct.nii.gz"))
    ct_b = sitk.ReadImage(str(other / "hospital_a/images/HA-0001_ct.nii.gz"))
    assert not np.array_equal(sitk.GetArrayFromImage(ct_a), sitk.GetArrayFromImage(ct_b))


def test_refuses_to_overwrite_without_flag(cohort):
    result = _synth(cohort, "--seed", "5")
    assert result.returncode == 1 and "is not empty" in result.stderr


def test_manifests_list_existing_files_and_all_clinical_columns(cohort):
    summary = json.loads((cohort / "cohort.json").read_text())
    assert [s["site_id"] for s in summary["sites"]] == ["hospital_a", "hospital_b", "hospital_c"]
    for site in summary["sites"]:
        manifest = pd.read_csv(cohort / site["site_id"] / "manifest.csv")
        assert list(manifest.columns) == [
            "patient_id",
            "ct_path",
            "tumour_mask_path",
            "organ_mask_path",
            *MANIFEST_CLINICAL_COLUMNS,
            "dm",
        ]
        assert len(manifest) == site["n_patients"] and manifest["patient_id"].is_unique
        assert int(manifest["dm"].sum()) == site["positives"] >= 2
        for column in ("ct_path", "tumour_mask_path", "organ_mask_path"):
            assert all((cohort / site["site_id"] / p).is_file() for p in manifest[column])


def test_images_are_int16_hu_and_masks_share_the_ct_geometry(cohort):
    manifest = pd.read_csv(cohort / "hospital_b/manifest.csv")
    for row in manifest.itertuples():
        ct = sitk.ReadImage(str(cohort / "hospital_b" / row.ct_path))
        assert ct.GetPixelID() == sitk.sitkInt16
        hu = sitk.GetArrayFromImage(ct)
        assert hu.min() >= -1024 and hu.max() <= 3071
        for path in (row.tumour_mask_path, row.organ_mask_path):
            mask = sitk.ReadImage(str(cohort / "hospital_b" / path))
            assert mask.GetPixelID() == sitk.sitkUInt8
            assert mask.GetSize() == ct.GetSize()
            assert mask.GetSpacing() == ct.GetSpacing()
            assert mask.GetOrigin() == ct.GetOrigin()
            assert mask.GetDirection() == ct.GetDirection()


def test_masks_non_empty_and_inside_the_body(cohort):
    manifest = pd.read_csv(cohort / "hospital_a/manifest.csv")
    for row in manifest.itertuples():
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "hospital_a" / row.ct_path)))
        tumour = sitk.GetArrayFromImage(
            sitk.ReadImage(str(cohort / "hospital_a" / row.tumour_mask_path))
        )
        organs = sitk.GetArrayFromImage(
            sitk.ReadImage(str(cohort / "hospital_a" / row.organ_mask_path))
        )
        assert set(np.unique(tumour)) == {0, 1}
        assert set(np.unique(organs)) <= {0, *ORGAN_LABELS.values()}
        assert len(np.unique(organs)) >= 4
        # Tumour and solid organs lie in tissue: almost no voxel of either is air (the larynx
        # and esophagus contours hold their lumen).
        assert np.mean(hu[tumour == 1] < -500) < 0.05
        assert 0 < np.median(hu[tumour == 1]) < 120
        hollow = [ORGAN_LABELS["larynx"], ORGAN_LABELS["esophagus"]]
        solid = (organs > 0) & ~np.isin(organs, hollow)
        assert np.mean(hu[solid] < -500) < 0.01


def test_site_configs_validate_and_point_at_the_manifest(cohort):
    for site_dir in sorted(p for p in cohort.iterdir() if (p / "site.toml").exists()):
        kind, problems = check_config_file(site_dir / "site.toml", check_paths=True)
        assert (kind, problems) == ("site", [])
    result = run_fedmets("config", "check", *cohort.glob("*/site.toml"))
    assert result.returncode == 0, result.stderr


def test_ground_truth_is_separate_from_the_sites(cohort):
    truth = pd.read_csv(cohort / "ground_truth/truth.csv")
    assert {"true_risk", "image_logit", "clinical_logit", "rendered_volume_cc"} <= set(truth)
    for manifest in cohort.glob("*/manifest.csv"):
        assert not {"true_risk", "logit", "necrosis"} & set(pd.read_csv(manifest).columns)
    oracle = json.loads((cohort / "ground_truth/oracle.json").read_text())
    assert set(oracle["per_site"]) == {"hospital_a", "hospital_b", "hospital_c"}
    # The rendered tumour follows the latent volume it was drawn from.
    ratio = truth["rendered_volume_cc"] / truth["tumour_volume_cc"]
    assert ratio.median() == pytest.approx(1.0, abs=0.25)


def test_a_bad_site_count_or_folder_name_is_named_as_written(tmp_path):
    """--sites 0 is refused (it made the preset's 3 sites), and an error naming an --out folder
    with brackets shows the name as written (rich read '[old]' as markup and dropped it)."""
    result = _synth(tmp_path / "zero", "--sites", "0")
    assert result.returncode == 2 and not (tmp_path / "zero").exists()
    assert "--sites" in result.stderr
    with pytest.raises(ValueError, match="need at least 1 site, got 0"):
        generate_cohort("tiny", 0, 5, tmp_path / "api")
    folder = tmp_path / "b[old]x"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept\n")
    result = _synth(folder, "--sites", "1")
    assert result.returncode == 1 and f"{folder} is not empty" in result.stderr.replace("\n", "")
    result = _synth(folder / "notes.txt", "--sites", "1")  # a file: said, no traceback
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "notes.txt is a file, not a folder for the cohort" in result.stderr.replace("\n", "")


def test_the_summary_splits_no_word_at_80_columns(monkeypatch):
    """In a log folded at 80 columns (COLUMNS=80, CI) the summary shows every header, site and
    value whole: one 11-column table split words ("preva/lence", "hosp/ital_a")."""
    import io

    from rich.console import Console

    from fedmets import cli

    site = {"n_patients": 654, "positives": 57, "prevalence": 0.087, "spacing_mm": [1.1, 1.1, 1.25]}
    site |= {"contrast_share": 0.61, "noise_hu": 23.3, "median_volume_cc": 19.3}
    site |= {"mb_per_patient": 1.66, "oracle_auc": 0.884}
    oracle = {"pooled": 0.896, "image_part_only": 0.852, "clinical_part_only": 0.714}
    summary = {"preset": "paper", "seed": 5, "n_patients": 1497, "positives": 162}
    summary |= {"prevalence": 0.108, "mb_per_patient": 1.47, "oracle_auc": oracle}
    summary["sites"] = [site | {"site_id": f"hospital_{s}"} for s in "abcdef"]
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, width=80))
    cli._print_cohort_summary(summary, Path("/data/cohorts/paper-seed-5"), 1.0)
    lines = screen.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    words = {w for line in lines for w in line.replace("│", " ").replace("┃", " ").split()}
    headers = "site patients DM+ prevalence in-plane slice contrast noise HU median GTV MB/patient"
    expected = {*headers.split(), "oracle", "AUC", "hospital_a", "hospital_f", "1497", "10.8%"}
    assert expected | {"1.66", "0.884", "19.3", "/data/cohorts/paper-seed-5."} <= words
