"""Radiomics extraction speed: `extract_site` (cold, then warm from its cache) against a plain
single-process loop calling PyRadiomics with the same parameters on the same patients.

    .venv/bin/python benchmarks/bench_extract.py [--patients 12] [--params fast|default]
                                                  [--workers 2] [--seed 7]

The patients are an evenly spread sample of the demo preset (its per-site scanners: 0.5-1 mm
in-plane, 1.25-3 mm slices), rendered into one temporary site. The plain loop does the same work
per patient as a worker (load, preprocess, ring, PyRadiomics on tumour and ring) with ITK's
default threading, but no site check, hashing, cache or crop files. Memory: the peak resident
set of each worker (ru_maxrss, as reported by the workers) and of this process.
"""

import argparse
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import pandas as pd
import radiomics
import SimpleITK as sitk
from radiomics.featureextractor import RadiomicsFeatureExtractor

from fedmets.client.extract import extract_site
from fedmets.client.ingest import load_patient_images, read_manifest
from fedmets.client.peritumoral import peritumoral_ring
from fedmets.client.preprocess import prepare_patient
from fedmets.client.radiomics_features import params_file
from fedmets.shared.config import SiteConfig, load_site_config
from fedmets.simulation.cohort import MANIFEST_CLINICAL_COLUMNS, PRESETS, sample_cohort
from fedmets.simulation.site_files import write_site_config
from fedmets.simulation.synth import IMAGE_MODALITIES, patient_jobs, render_and_write


def demo_site(folder: Path, n_patients: int, seed: int, params: str, workers: int) -> Path:
    """Render ``n_patients`` demo-preset patients (spread over its sites) into one site folder;
    return its site.toml."""
    preset = PRESETS["demo"]
    tables = sample_cohort(preset, preset.default_sites, seed)
    jobs = patient_jobs(tables, folder, preset.fov_mm, seed)
    jobs = jobs[:: max(1, len(jobs) // n_patients)][:n_patients]
    site = folder / "bench"
    rows = tables.manifest.set_index("patient_id").loc[[job.patient_id for job in jobs]]
    renamed = [  # every patient into the one site folder
        replace(
            job,
            ct_path=site / "images" / f"{job.patient_id}_ct.nii.gz",
            tumour_path=site / "masks" / f"{job.patient_id}_tumour.nii.gz",
            organs_path=site / "masks" / f"{job.patient_id}_organs.nii.gz",
        )
        for job in jobs
    ]
    for sub in ("images", "masks"):
        (site / sub).mkdir(parents=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(render_and_write, renamed))
    manifest = pd.DataFrame(
        {
            "patient_id": rows.index,
            "ct_path": [f"images/{i}_ct.nii.gz" for i in rows.index],
            "tumour_mask_path": [f"masks/{i}_tumour.nii.gz" for i in rows.index],
            "organ_mask_path": [f"masks/{i}_organs.nii.gz" for i in rows.index],
            **{column: rows[column].to_numpy() for column in MANIFEST_CLINICAL_COLUMNS},
            "dm": rows["dm"].to_numpy(),
        }
    )
    manifest.to_csv(site / "manifest.csv", index=False)
    return write_site_config(
        site,
        "bench",
        mode="images",
        modalities=IMAGE_MODALITIES,
        seed=seed,
        workers=workers,
        radiomics_params=params,
    )


def plain_loop(cfg: SiteConfig) -> float:
    """Seconds for one process to extract tumour and ring features of every patient."""
    started = time.perf_counter()
    extractor = RadiomicsFeatureExtractor(str(params_file(cfg.radiomics.params)))
    margin = cfg.radiomics.peritumoral_margin_mm
    for record in read_manifest(cfg)[0]:
        images = load_patient_images(record, cfg)
        prepared = prepare_patient(images.ct, images.tumour, cfg.preprocess, margin)
        ring = peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, margin)
        box = prepared.radiomics_box
        for mask in (prepared.tumour, ring):
            extractor.execute(box.crop(prepared.ct), box.crop(mask))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--params", choices=["fast", "default"], default="fast")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    radiomics.setVerbosity(40)  # errors only, as in the workers
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, PyRadiomics {radiomics.__version__}, ITK threads "
        f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} (plain loop), load average"
        f" {os.getloadavg()[0]:.2f} before"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_site_config(
            demo_site(Path(tmp), args.patients, args.seed, args.params, args.workers)
        )
        n = args.patients
        plain = plain_loop(cfg)
        cold = extract_site(cfg, workers=args.workers)
        warm = extract_site(cfg, workers=args.workers)
        assert cold["counts"]["extracted"] == warm["counts"]["cached"] == n, cold["failed"]
        per_region = cold["features_per_region"]
        children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(
        f"{n} demo-geometry patients, params {args.params!r} ({per_region['tumour']} tumour +"
        f" {per_region['ring']} ring features), {args.workers} workers"
    )
    rows = [
        ("plain loop, 1 process", plain, ""),
        (f"extract_site cold, {args.workers} workers", cold["seconds"], ">= 1.8x"),
        ("extract_site warm (cached)", warm["seconds"], ">= 20x"),
    ]
    print(f"{'run':34s} {'seconds':>8s} {'s/patient':>10s} {'patients/min':>13s} {'speed-up':>9s}")
    for name, seconds, target in rows:
        print(
            f"{name:34s} {seconds:8.2f} {seconds / n:10.3f} {60 * n / seconds:13.1f}"
            f" {plain / seconds:8.2f}x  target {target or '-'}"
        )
    print(
        f"per patient inside a worker: {cold['mean_seconds_per_extracted_patient']:.3f} s;"
        f" peak RSS per worker {cold['peak_worker_rss_mb']:.0f} MB (largest child process"
        f" {children_mb:.0f} MB); this process {self_mb:.0f} MB; load average"
        f" {os.getloadavg()[0]:.2f} after"
    )


if __name__ == "__main__":
    main()
