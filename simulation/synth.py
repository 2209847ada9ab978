"""Write a synthetic multi-site cohort to disk, laid out as hospitals would prepare it.

```
OUT/
  cohort.json                  preset, seed, sites (scanner, size, prevalence), oracle AUCs
  ground_truth/truth.csv       true risk, logits, latent factors (never read by site code)
  ground_truth/oracle.json     oracle AUC pooled / per site / per part of the risk model
  hospital_a/site.toml         a site config valid for `fedmets config check`
  hospital_a/manifest.csv      patient_id, ct_path, tumour_mask_path, organ_mask_path, clinical, dm
  hospital_a/images/<id>_ct.nii.gz        int16 HU
  hospital_a/masks/<id>_tumour.nii.gz     uint8 0/1 (GTVp)
  hospital_a/masks/<id>_organs.nii.gz     uint8 labels (fedmets.shared.organs.ORGAN_LABELS)
```
Rendering is parallel over patients; each patient has its own random stream, so the files are
identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from fedmets.shared.files import check_writable
from fedmets.simulation.anatomy import RenderSpec, render_patient
from fedmets.simulation.cohort import (
    MANIFEST_CLINICAL_COLUMNS,
    PRESETS,
    CohortTables,
    SiteSpec,
    oracle_aucs,
    sample_cohort,
)
from fedmets.simulation.site_files import write_site_config

GENERATOR_VERSION = "1"
IMAGE_MODALITIES = ["ct", "tumour_mask", "organ_mask", "clinical"]


@dataclass(frozen=True)
class PatientJob:
    """Everything one worker needs to render and write one patient."""

    patient_id: str
    spec: RenderSpec
    seed_key: tuple[int, ...]  # SeedSequence entropy of this patient's random stream
    ct_path: Path
    tumour_path: Path
    organs_path: Path


def _write_image(array: np.ndarray, spacing, origin, path: Path) -> int:
    """Write a (z, y, x) array as compressed NIfTI; return its size in bytes."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    sitk.WriteImage(image, str(path), useCompression=True)
    return path.stat().st_size


def render_and_write(job: PatientJob) -> dict:
    """Render one patient and write its CT, tumour mask and organ mask; return measured traits."""
    rng = np.random.default_rng(np.random.SeedSequence(list(job.seed_key)))
    patient = render_patient(job.spec, rng)
    geometry = (patient.spacing_mm, patient.origin_mm)
    n_bytes = (
        _write_image(patient.ct_hu, *geometry, job.ct_path)
        + _write_image(patient.tumour_mask, *geometry, job.tumour_path)
        + _write_image(patient.organ_mask, *geometry, job.organs_path)
    )
    return {
        "patient_id": job.patient_id,
        "rendered_volume_cc": round(patient.tumour_volume_cc, 3),
        "rendered_mean_hu": round(patient.tumour_mean_hu, 2),
        "shape_zyx": "x".join(str(d) for d in patient.ct_hu.shape),
        "bytes": n_bytes,
    }


def patient_jobs(tables: CohortTables, out_dir: Path, fov_mm, seed: int) -> list[PatientJob]:
    """One render job per patient of `tables`, writing under out_dir/<site_id>/."""
    sites = {site.site_id: site for site in tables.sites}
    truth = tables.truth.set_index("patient_id")
    jobs = []
    for number, row in enumerate(tables.manifest.itertuples(index=False)):
        site: SiteSpec = sites[row.site_id]
        latent = truth.loc[row.patient_id]
        site_dir = out_dir / site.site_id
        spec = RenderSpec(
            fov_mm=fov_mm,
            spacing_mm=site.spacing_mm,
            noise_hu=site.noise_hu,
            hu_offset=site.hu_offset,
            blur_mm=site.blur_mm,
            contrast=bool(latent["contrast"]),
            sex=row.sex,
            body_scale=float(latent["body_scale"]),
            subsite=row.subsite,
            tumour_volume_cc=float(latent["tumour_volume_cc"]),
            necrosis=float(latent["necrosis"]),
            heterogeneity=float(latent["heterogeneity"]),
            irregularity=float(latent["irregularity"]),
            infiltration=float(latent["infiltration"]),
        )
        jobs.append(
            PatientJob(
                patient_id=row.patient_id,
                spec=spec,
                seed_key=(seed, 3, site.index, number),
                ct_path=site_dir / "images" / f"{row.patient_id}_ct.nii.gz",
                tumour_path=site_dir / "masks" / f"{row.patient_id}_tumour.nii.gz",
                organs_path=site_dir / "masks" / f"{row.patient_id}_organs.nii.gz",
            )
        )
    return jobs


def _run_jobs(jobs: list[PatientJob], workers: int) -> Iterator[dict]:
    if workers <= 1:
        yield from map(render_and_write, jobs)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(render_and_write, jobs, chunksize=1)


def _site_manifest(tables: CohortTables, site: SiteSpec) -> pd.DataFrame:
    rows = tables.manifest[tables.manifest["site_id"] == site.site_id]
    ids = rows["patient_id"]
    return pd.DataFrame(
        {
            "patient_id": ids,
            "ct_path": "images/" + ids + "_ct.nii.gz",
            "tumour_mask_path": "masks/" + ids + "_tumour.nii.gz",
            "organ_mask_path": "masks/" + ids + "_organs.nii.gz",
            **{column: rows[column] for column in MANIFEST_CLINICAL_COLUMNS},
            "dm": rows["dm"],
        }
    )


def generate_cohort(
    preset_name: str,
    n_sites: int | None,
    seed: int,
    out_dir: Path,
    workers: int = 1,
    overwrite: bool = False,
    on_patient_done: Callable[[int, int], None] | None = None,
    crop_voxels: int | None = None,
) -> dict:
    """Sample, render and write a cohort; return the summary that is also saved as cohort.json.

    `on_patient_done(done, total)` is called after each patient (for progress bars);
    `crop_voxels` sets the sites' deep-crop side (`[preprocess] crop_voxels`, e.g. 96 for the
    `gpu` image preset; default 64)."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    n_sites = preset.default_sites if n_sites is None else n_sites
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out: {out_dir} is a file, not a folder for the cohort")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    check_writable(out_dir, "--out")

    tables = sample_cohort(preset, n_sites, seed)
    for site in tables.sites:
        (out_dir / site.site_id / "images").mkdir(parents=True, exist_ok=True)
        (out_dir / site.site_id / "masks").mkdir(parents=True, exist_ok=True)
    jobs = patient_jobs(tables, out_dir, preset.fov_mm, seed)
    rendered = []
    for done, result in enumerate(_run_jobs(jobs, workers), start=1):
        rendered.append(result)
        if on_patient_done:
            on_patient_done(done, len(jobs))

    merged = tables.truth.merge(pd.DataFrame(rendered), on="patient_id", validate="one_to_one")
    bytes_by_site = merged.groupby("site_id")["bytes"].sum()
    truth = merged.drop(columns="bytes")
    (out_dir / "ground_truth").mkdir(exist_ok=True)
    truth.to_csv(out_dir / "ground_truth" / "truth.csv", index=False)
    oracle = oracle_aucs(truth)
    (out_dir / "ground_truth" / "oracle.json").write_text(json.dumps(oracle, indent=2) + "\n")

    site_summaries = []
    for site in tables.sites:
        site_dir = out_dir / site.site_id
        manifest = _site_manifest(tables, site)
        manifest.to_csv(site_dir / "manifest.csv", index=False)
        write_site_config(
            site_dir,
            site.site_id,
            mode="images",
            modalities=IMAGE_MODALITIES,
            seed=seed * 1000 + site.index + 1,
            radiomics_params=preset.radiomics_params,
            crop_voxels=crop_voxels,
            policy={
                "folds": preset.site_folds,
                "validation_fraction": preset.site_validation_fraction,
                "min_patients": preset.site_min_patients,
            },
        )
        site_truth = truth[truth["site_id"] == site.site_id]
        site_summaries.append(
            {
                **asdict(site),
                "positives": int(manifest["dm"].sum()),
                "prevalence": round(float(manifest["dm"].mean()), 4),
                "expected_prevalence": round(float(site_truth["true_risk"].mean()), 4),
                "contrast_share": round(float(site_truth["contrast"].mean()), 3),
                "median_volume_cc": round(float(site_truth["rendered_volume_cc"].median()), 2),
                "mb_per_patient": round(bytes_by_site[site.site_id] / site.n_patients / 1e6, 3),
                "oracle_auc": oracle["per_site"][site.site_id],
            }
        )
    summary = {
        "generator_version": GENERATOR_VERSION,
        "preset": preset_name,
        "seed": seed,
        "n_sites": n_sites,
        "n_patients": len(truth),
        "positives": int(truth["dm"].sum()),
        "prevalence": round(float(truth["dm"].mean()), 4),
        "fov_mm": preset.fov_mm,
        "risk_model": asdict(tables.risk_model),
        "oracle_auc": oracle,
        "mb_per_patient": round(bytes_by_site.sum() / len(truth) / 1e6, 3),
        "sites": site_summaries,
    }
    (out_dir / "cohort.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
