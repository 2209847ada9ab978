"""`fedmets site extract` end to end on a real synthetic site: parallel PyRadiomics extraction,
the per-patient cache, per-patient failures, a worker crash, and the command line."""

import io
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import CliResult, run_fedmets
from radiomics.featureextractor import RadiomicsFeatureExtractor

from fedmets.client.extract import extract_site
from fedmets.client.ingest import load_patient_images, read_manifest
from fedmets.client.peritumoral import peritumoral_ring
from fedmets.client.preprocess import prepare_patient
from fedmets.client.radiomics_features import SHAPE_REGIONS, params_file
from fedmets.client.site_files import FEATURES_FILE, REPORT_FILE
from fedmets.shared.clinical import encode_clinical, encoded_columns
from fedmets.shared.config import load_site_config
from fedmets.simulation.site_files import write_site_config

IDS = [f"HA-{n:04d}" for n in range(1, 9)]
CORRUPT_CT = "HA-0002"  # unreadable CT file: quarantined by the site check
EMPTY_MASK = "HA-0004"  # tumour mask of zeros: quarantined by the site check
TUMOUR_IN_AIR = "HA-0003"  # passes the check, but no tissue around the tumour: fails at "ring"
GOOD = [i for i in IDS if i not in (CORRUPT_CT, EMPTY_MASK, TUMOUR_IN_AIR)]


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> Path:
    return tiny_cohort


def make_site(cohort: Path, folder: Path, margin: float = 5.0, params: str = "fast") -> Path:
    """A site of 8 hospital_a patients (three of them broken) in ``folder``; returns its TOML."""
    source = cohort / "hospital_a"
    manifest = pd.read_csv(source / "manifest.csv", dtype=str, keep_default_na=False)
    manifest = manifest[manifest["patient_id"].isin(IDS)]
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
        for path in (source / sub).glob("HA-000[1-8]_*"):
            shutil.copy(path, folder / sub / path.name)
    manifest.to_csv(folder / "manifest.csv", index=False)
    (folder / "images" / f"{CORRUPT_CT}_ct.nii.gz").write_bytes(b"not an image")
    tumour_path = folder / "masks" / f"{TUMOUR_IN_AIR}_tumour.nii.gz"
    tumour = sitk.ReadImage(str(tumour_path))
    in_air = np.zeros(sitk.GetArrayViewFromImage(tumour).shape, np.uint8)
    in_air[1:4, 1:4, 1:4] = 1  # 27 voxels of 3x3x4 mm = 0.97 cc in the corner of the FOV
    moved = sitk.GetImageFromArray(in_air)
    moved.CopyInformation(tumour)
    sitk.WriteImage(moved, str(tumour_path), useCompression=True)
    empty_path = folder / "masks" / f"{EMPTY_MASK}_tumour.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(empty_path)) * 0, str(empty_path), useCompression=True)
    return write_site_config(
        folder,
        "hospital_a",
        mode="images",
        modalities=["ct", "tumour_mask", "organ_mask", "clinical"],
        seed=1,
        peritumoral_margin_mm=margin,
        radiomics_params=params,
    )


def entry_times(cache: Path) -> dict[str, int]:
    return {
        str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def site(cohort, tmp_path_factory):
    """(config, report, features table, cache file mtimes) after a first, cold extraction."""
    toml = make_site(cohort, tmp_path_factory.mktemp("site") / "hospital_a")
    cfg = load_site_config(toml)
    report = extract_site(cfg, workers=2)
    table = pd.read_parquet(cfg.paths.output / FEATURES_FILE)
    return cfg, report, table, entry_times(cfg.paths.cache)


@pytest.mark.slow
def test_cold_run_extracts_every_usable_patient_and_reports_the_bad_ones(site):
    cfg, report, _, _ = site
    assert report == json.loads((cfg.paths.output / REPORT_FILE).read_text())
    assert report["counts"] == {
        "total": 8,
        "quarantined": 2,
        "usable": 6,
        "extracted": 5,
        "cached": 0,
        "failed": 1,
    }
    (reason,) = report["quarantined"][CORRUPT_CT]
    assert f"images/{CORRUPT_CT}_ct.nii.gz: ct: cannot read the image" in reason
    assert report["quarantined"][EMPTY_MASK] == [
        f"masks/{EMPTY_MASK}_tumour.nii.gz: tumour_mask: mask is empty"
    ]
    failure = report["failed"][TUMOUR_IN_AIR]
    assert failure["stage"] == "ring" and failure["field"] == "tumour_mask"
    assert failure["cached"] is False
    assert failure["file"] == f"masks/{TUMOUR_IN_AIR}_tumour.nii.gz"
    assert failure["message"].startswith(
        f"patient {TUMOUR_IN_AIR}: masks/{TUMOUR_IN_AIR}_tumour.nii.gz: tumour_mask: ring: "
        "peritumoral ring is empty"
    )
    assert report["features_per_region"] == {"tumour": 293, "ring": 279, "clinical": 28}
    assert report["worker_restarts"] == 0 and report["patients_per_minute"] > 0
    assert 0 < report["peak_worker_rss_mb"] < 2000
    stages = report["mean_stage_seconds"]  # where a patient's time goes, stage by stage
    assert list(stages) == ["load", "preprocess", "ring", "radiomics", "cache"]
    assert min(stages.values()) > 0
    assert sum(stages.values()) == pytest.approx(
        report["mean_seconds_per_extracted_patient"], abs=0.01
    )


@pytest.mark.slow
def test_feature_table_rows_columns_labels_and_clinical(site):
    cfg, _, table, _ = site
    assert list(table["patient_id"]) == GOOD
    assert list(table.columns[:2]) == ["patient_id", "label"]
    radiomic = [c for c in table.columns if c.startswith(("tumour_", "ring_"))]
    assert len(radiomic) == 293 + 279 and not [c for c in table.columns if "diagnostics" in c]
    assert list(table.columns[2 + len(radiomic) :]) == encoded_columns()
    assert table[radiomic].dtypes.eq("float64").all()
    assert table[[c for c in radiomic if "_shape_" not in c]].notna().all().all()
    manifest = pd.read_csv(cfg.data.manifest, dtype=str, keep_default_na=False)
    manifest = manifest.set_index("patient_id").loc[GOOD]
    assert list(table["label"]) == [int(v) for v in manifest["dm"]]
    expected = encode_clinical(manifest).reset_index(drop=True)
    pd.testing.assert_frame_equal(table[encoded_columns()], expected)


@pytest.mark.slow
def test_features_equal_a_direct_pyradiomics_call(site):
    cfg, _, table, _ = site
    records = {r.patient_id: r for r in read_manifest(cfg)[0]}
    images = load_patient_images(records[GOOD[0]], cfg)
    margin = cfg.radiomics.peritumoral_margin_mm
    prepared = prepare_patient(images.ct, images.tumour, cfg.preprocess, margin)
    ring = peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, margin)
    box = prepared.radiomics_box
    extractor = RadiomicsFeatureExtractor(str(params_file("fast")))
    row = table.set_index("patient_id").loc[GOOD[0]]
    for region, mask in (("tumour", prepared.tumour), ("ring", ring)):
        direct = extractor.execute(box.crop(prepared.ct), box.crop(mask), label=1)
        direct = {
            k: float(v)
            for k, v in direct.items()
            if not k.startswith("diagnostics_")
            and (region in SHAPE_REGIONS or not k.startswith("original_shape_"))
        }
        mine = row[[c for c in table.columns if c.startswith(f"{region}_")]]
        assert [c.removeprefix(f"{region}_") for c in mine.index] == list(direct)
        np.testing.assert_allclose(mine.to_numpy(float), list(direct.values()), rtol=1e-9)
    crop = np.load(cfg.paths.cache / "extract" / GOOD[0] / "crop.npz")
    np.testing.assert_array_equal(crop["ring"], prepared.deep_box.array(ring))


@pytest.mark.slow
def test_second_run_is_all_cached_and_touches_no_entry(site):
    cfg, first, table, times = site
    report = extract_site(cfg, workers=2)
    assert report["counts"]["cached"] == 5 and report["counts"]["extracted"] == 0
    # the failure came from the data: it is remembered, not recomputed
    assert report["failed"][TUMOUR_IN_AIR] == first["failed"][TUMOUR_IN_AIR] | {"cached": True}
    assert report["peak_worker_rss_mb"] is None  # no worker was started
    assert entry_times(cfg.paths.cache) == times
    assert report["seconds"] < first["seconds"] / 3
    pd.testing.assert_frame_equal(pd.read_parquet(cfg.paths.output / FEATURES_FILE), table)


@pytest.mark.slow
def test_a_lost_entry_is_all_that_is_redone(site):
    cfg, _, table, times = site
    shutil.rmtree(cfg.paths.cache / "extract" / GOOD[2])
    report = extract_site(cfg, workers=2)
    assert (report["counts"]["extracted"], report["counts"]["cached"]) == (1, 4)
    again = entry_times(cfg.paths.cache)
    changed = {name for name in again if again[name] != times.get(name)}
    assert changed == {f"extract/{GOOD[2]}/features.json", f"extract/{GOOD[2]}/crop.npz"}
    pd.testing.assert_frame_equal(pd.read_parquet(cfg.paths.output / FEATURES_FILE), table)


@pytest.mark.slow
def test_changing_margin_or_params_invalidates_the_cache(site, tmp_path):
    cfg, _, table, _ = site
    folder = tmp_path / "hospital_a"
    shutil.copytree(cfg.data.root, folder)  # with its warm cache
    toml = folder / "site.toml"
    text = toml.read_text()
    toml.write_text(text.replace("peritumoral_margin_mm = 5.0", "peritumoral_margin_mm = 8.0"))
    report = extract_site(load_site_config(toml), workers=2)
    assert (report["counts"]["extracted"], report["counts"]["cached"]) == (5, 0)
    wider = pd.read_parquet(folder / "output" / FEATURES_FILE)
    # Same tumour on the same grid; only its filtered images see the wider box's extra context.
    tumour = [c for c in table.columns if c.startswith("tumour_original_")]
    pd.testing.assert_frame_equal(wider[tumour], table[tumour], rtol=1e-9)
    energy = "ring_original_firstorder_TotalEnergy"  # a sum over the ring's voxels
    assert (wider[energy] > 1.3 * table[energy]).all()

    params = folder / "coarse.yaml"
    params.write_text(params_file("fast").read_text().replace("binWidth: 25", "binWidth: 50"))
    toml.write_text(text.replace('params = "fast"', 'params = "coarse.yaml"'))
    report = extract_site(load_site_config(toml), workers=2)
    assert (report["counts"]["extracted"], report["counts"]["cached"]) == (5, 0)
    coarse = pd.read_parquet(folder / "output" / FEATURES_FILE)
    entropy = "tumour_original_firstorder_Entropy"
    assert (coarse[entropy] < table[entropy]).all()
    assert report["settings"]["params_sha256"] != site[1]["settings"]["params_sha256"]


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced_and_its_patients_retried(cohort, tmp_path):
    cfg = load_site_config(make_site(cohort, tmp_path / "hospital_a"))
    killed = []

    def kill_a_worker(done: int, total: int) -> None:
        if not killed:
            worker = multiprocessing.active_children()[0]
            os.kill(worker.pid, signal.SIGKILL)
            killed.append(worker.pid)

    report = extract_site(cfg, workers=2, on_patient_done=kill_a_worker)
    assert killed and report["worker_restarts"] == 1
    assert report["counts"]["extracted"] == 5 and list(report["failed"]) == [TUMOUR_IN_AIR]
    table = pd.read_parquet(cfg.paths.output / FEATURES_FILE)
    assert list(table["patient_id"]) == GOOD


def test_a_patient_that_kills_every_worker_it_runs_on_fails_alone(cohort, tmp_path):
    toml = make_site(cohort, tmp_path / "hospital_a")
    manifest = pd.read_csv(tmp_path / "hospital_a" / "manifest.csv", dtype=str)
    manifest[manifest["patient_id"] == GOOD[0]].to_csv(toml.parent / "manifest.csv", index=False)
    killed: set[int] = set()
    stop = threading.Event()

    def kill_every_worker() -> None:  # as a patient that crashes whatever worker runs it would
        while not stop.is_set():
            for worker in multiprocessing.active_children():
                if worker.pid not in killed:
                    os.kill(worker.pid, signal.SIGKILL)
                    killed.add(worker.pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_every_worker)
    killer.start()
    try:
        report = extract_site(load_site_config(toml), workers=2)
    finally:
        stop.set()
        killer.join()
    # tried with others (none here), then alone: failed, and the run still ends normally
    assert report["worker_restarts"] == 2 and len(killed) == 2
    failure = report["failed"][GOOD[0]]
    assert failure["stage"] == "worker" and "died" in failure["message"]
    assert report["counts"]["extracted"] == 0


def test_a_patient_over_its_time_limit_fails_alone(cohort, tmp_path):
    """[compute] patient_timeout_s: a worker still on a patient when its time is up ends (as on
    a file that sends a reader into an endless loop); the patient is tried again alone, then
    recorded as failed, and the run ends normally. Here a limit no patient can meet."""
    toml = make_site(cohort, tmp_path / "hospital_a")
    manifest = pd.read_csv(toml.parent / "manifest.csv", dtype=str)
    manifest[manifest["patient_id"] == GOOD[0]].to_csv(toml.parent / "manifest.csv", index=False)
    toml.write_text(toml.read_text().replace("[compute]\n", "[compute]\npatient_timeout_s = 0.1\n"))
    report = extract_site(load_site_config(toml), workers=2)
    failure = report["failed"][GOOD[0]]
    assert failure["stage"] == "worker" and "patient_timeout_s (0.1 s)" in failure["message"]
    assert report["worker_restarts"] == 2 and report["counts"]["extracted"] == 0


def run_cli(*args: str) -> CliResult:
    return run_fedmets("site", "extract", *args)


@pytest.mark.slow
def test_cli_writes_the_feature_table_and_exits_0_despite_a_bad_patient(site):
    cfg = site[0]
    shutil.rmtree(cfg.paths.output)
    result = run_cli("--config", str(cfg.source), "--workers", "2")
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(cfg.paths.output / FEATURES_FILE)
    assert list(table["patient_id"]) == GOOD
    columns = set(table.columns)
    assert {"tumour_original_firstorder_Mean", "ring_original_glcm_Idm"} <= columns
    assert set(encoded_columns()) <= columns
    assert "5 patients in" in result.stdout and "1 failed, 2 quarantined" in result.stdout
    assert "extracting hospital_a: 6/6 patients" in result.stdout  # progress, in a log too
    assert f"failed: patient {TUMOUR_IN_AIR}: masks/" in result.stderr
    assert f"quarantined: patient {EMPTY_MASK}: masks/" in result.stderr
    assert (cfg.paths.output / REPORT_FILE).is_file()


def test_cli_rejects_a_bad_config(tmp_path):
    toml = tmp_path / "site.toml"
    toml.write_text('site_id = "Bad Name"\n')
    result = run_cli("--config", str(toml))
    assert result.returncode == 1
    assert (
        "site_id: must match" in result.stderr and "data: required key is missing" in result.stderr
    )


@pytest.mark.slow
def test_a_run_with_no_usable_patient_keeps_the_last_table(site):
    """The image folder moved away: every patient is quarantined, the command exits 1 and says
    so, and the feature table of the last extraction stays as it was (nothing is lost)."""
    cfg = site[0]
    before = pd.read_parquet(cfg.paths.output / FEATURES_FILE)
    images = cfg.data.root / "images"
    images.rename(images.with_name("images-moved"))
    try:
        result = run_cli("--config", str(cfg.source), "--workers", "2")
    finally:
        images.with_name("images-moved").rename(images)
    assert result.returncode == 1
    assert "keeps the last extraction's patients" in result.stderr
    report = json.loads((cfg.paths.output / REPORT_FILE).read_text())
    assert report["features_file_written"] is False and report["counts"]["usable"] == 0
    pd.testing.assert_frame_equal(pd.read_parquet(cfg.paths.output / FEATURES_FILE), before)


@pytest.mark.parametrize(
    ("key", "setting", "folder", "reason"),
    [
        ("cache", "blocker/cache", "blocker/cache/extract", "Not a directory"),
        ("output", "blocker", "blocker", "a file, not a folder"),
    ],
)
def test_an_unwritable_cache_or_output_stops_the_run_before_any_work(
    cohort, tmp_path, key, setting, folder, reason
):
    """A cache or output folder that cannot be written ends the run at once, with one line that
    names the config key and the folder: not after every patient was extracted for nothing."""
    toml = make_site(cohort, tmp_path / "hospital_a")
    (toml.parent / "blocker").write_text("a file where a folder should be")
    toml.write_text(toml.read_text().replace(f'{key} = "{key}"', f'{key} = "{setting}"'))
    result = run_cli("--config", str(toml), "--workers", "1")
    assert result.returncode == 1
    assert result.stderr == f"error: paths.{key}: cannot write {toml.parent / folder}: {reason}\n"
    assert not list(toml.parent.rglob("features.json"))  # no patient was extracted


def test_progress_in_a_log_is_plain_lines_every_so_often(monkeypatch):
    """With stdout in a file (nohup, cron, systemd) the progress bar is only drawn at the end:
    plain lines come instead, at a task's first and last patient and every 30 s between."""
    from rich.console import Console

    import fedmets.cli

    clock = [0.0]
    log = io.StringIO()
    monkeypatch.setattr(fedmets.cli, "console", Console(file=log, get_time=lambda: clock[0]))
    with fedmets.cli._patient_progress() as progress:
        task = progress.add_task("extracting hospital_a", total=None)
        for done in range(1, 401):
            clock[0] += 7.0  # a patient every 7 s
            progress.update(task, completed=done, total=400)
    lines = log.getvalue().splitlines()
    assert lines[:3] == [
        "extracting hospital_a: 1/400 patients, 7s",
        "extracting hospital_a: 6/400 patients, 42s",
        "extracting hospital_a: 11/400 patients, 1m17s",
    ]
    assert lines[-1] == "extracting hospital_a: 400/400 patients, 46m40s"
    assert len(lines) == 2 + 399 // 5


def test_sigterm_stops_the_run_as_ctrl_c_does(cohort, tmp_path):
    """SIGTERM (kill, systemctl stop) mid-extraction: the command stops as on Ctrl-C, its worker
    processes end with it (not left running on their own) and the cache keeps what finished."""
    cfg = load_site_config(make_site(cohort, tmp_path / "hospital_a"))
    entries = cfg.paths.cache / "extract"
    workers: list[int] = []
    stop = threading.Event()

    def terminate_after_the_first_patient() -> None:
        while not stop.is_set() and not any(entries.glob("*/features.json")):
            time.sleep(0.02)
        if not stop.is_set():
            workers.extend(child.pid for child in multiprocessing.active_children())
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # without the fix: no effect
    sender = threading.Thread(target=terminate_after_the_first_patient)
    sender.start()
    try:
        result = run_cli("--config", str(cfg.source), "--workers", "1")
    finally:
        stop.set()
        sender.join()
        signal.signal(signal.SIGTERM, previous)
    assert result.returncode == 130, result.stdout  # as Ctrl-C
    assert "stopped: the patients extracted so far are cached" in result.stderr
    assert not (cfg.paths.output / REPORT_FILE).exists()  # stopped before the end
    assert workers and not multiprocessing.active_children()
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert len(list(entries.glob("*/features.json"))) >= 1
    assert not list(entries.rglob("*.partial"))
