"""An extracted cohort in one file, for running the study on a machine that has neither the
sites' raw files nor PyRadiomics or SimpleITK (a lent GPU machine, with 64 MiB carried).

:func:`pack_cohort` writes one ZIP (LZMA): every site's ``site.toml``, feature table and
extraction report and the cohort's ground truth byte for byte, and the deep-model crops
(``crop.npz``: ``ct`` int16 HU, ``tumour`` and ``ring`` masks, spacing, origin) in one
``crops.npz``. To fit, the CT is clipped to the image models' window
(``fedmets.client.crops.HU_WINDOW``: the models read nothing outside it, so the clip changes no
model input) and rounded to ``hu_step`` HU (uint8; the rounding error is uniform, SD
``hu_step / sqrt(12)`` HU, against ~38 HU of image noise in the demo cohort); the masks are
bit-packed. :func:`unpack_cohort` writes the sites back, each crop as its ``crop.npz`` where
the site config expects it, so ``fedmets study --cohort`` runs on it unchanged.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from fedmets.client.crops import HU_WINDOW
from fedmets.client.site_files import FEATURES_FILE, REPORT_FILE, crop_path
from fedmets.shared.config import SiteConfig, load_site_config
from fedmets.shared.files import write_arrays, write_atomically

FORMAT = "fedmets-packed-cohort-2"
CROPS = "crops.npz"
MANIFEST = "packed.json"


def _site_files(cohort: Path, configs: list[SiteConfig]) -> list[Path]:
    """The files of ``cohort`` (its sites ``configs``) that travel as they are (relative
    paths)."""
    files = [Path(cfg.source).resolve().relative_to(cohort.resolve()) for cfg in configs]
    for cfg in configs:
        for name in (FEATURES_FILE, REPORT_FILE):
            path = cfg.paths.output / name
            if name == FEATURES_FILE and not path.is_file():
                raise ValueError(f"{cfg.site_id}: no {path}; extract the site first")
            if path.is_file():
                files.append(path.resolve().relative_to(cohort.resolve()))
    files += [p.relative_to(cohort) for p in sorted((cohort / "ground_truth").glob("*"))]
    files += [Path("cohort.json")] if (cohort / "cohort.json").is_file() else []
    return files


def pack_cohort(cohort: Path, path: Path, hu_step: float = 10.0) -> dict:
    """Pack the extracted image cohort ``cohort`` (``*/site.toml``) into ``path``; returns its
    summary (patients, MiB, the CT window, step and rounding SD)."""
    cohort = Path(cohort)
    low, high = HU_WINDOW
    if round((high - low) / hu_step) > 255:
        raise ValueError(f"{(high - low) / hu_step:.0f} CT levels do not fit uint8: widen hu_step")
    configs = [load_site_config(toml) for toml in sorted(cohort.glob("*/site.toml"))]
    if not configs:
        raise ValueError(f"no site configs (*/site.toml) under {cohort}")
    files = _site_files(cohort, configs)
    arrays: dict[str, list] = {k: [] for k in ("ct", "tumour", "ring", "spacing_mm", "origin_mm")}
    patients, sites = [], []
    for cfg in configs:
        table = pd.read_parquet(cfg.paths.output / FEATURES_FILE, columns=["patient_id"])
        for patient in table["patient_id"].astype(str):
            with np.load(crop_path(cfg, patient)) as crop:
                ct = np.clip(crop["ct"].astype(np.float64), low, high)
                arrays["ct"].append(np.round((ct - low) / hu_step).astype(np.uint8))
                for mask in ("tumour", "ring"):
                    arrays[mask].append(np.packbits(crop[mask].astype(bool)))
                arrays["spacing_mm"].append(crop["spacing_mm"])
                arrays["origin_mm"].append(crop["origin_mm"])
            patients.append(patient)
            sites.append(cfg.site_id)
    shapes = {a.shape for a in arrays["ct"]}
    if len(shapes) != 1:
        raise ValueError(f"the cohort's crops have shapes {shapes}; pack_cohort needs one size")
    (shape,) = shapes
    buffer = io.BytesIO()
    np.savez(
        buffer,
        **{k: np.stack(v) for k, v in arrays.items()},
        patient=np.array(patients),
        site=np.array(sites),
    )
    manifest = {"format": FORMAT, "hu_window": [low, high], "hu_step": hu_step, "shape": shape}

    def write(partial: Path) -> None:
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_LZMA) as archive:
            for name in files:
                archive.write(cohort / name, name.as_posix())
            archive.writestr(CROPS, buffer.getvalue())
            archive.writestr(MANIFEST, json.dumps(manifest))

    write_atomically(path, write)
    return {
        "patients": len(patients),
        "mib": Path(path).stat().st_size / 2**20,
        "hu_window": [low, high],
        "hu_step": hu_step,
        "rounding_sd_hu": hu_step / 12**0.5,
    }


def unpack_cohort(path: Path, into: Path) -> Path:
    """Write the cohort packed in ``path`` into the folder ``into`` (its sites, feature tables,
    reports, ground truth and crops); returns ``into``."""
    into = Path(into)
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read(MANIFEST))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file")
        for name in archive.namelist():
            if name not in (CROPS, MANIFEST):
                archive.extract(name, into)
        with np.load(io.BytesIO(archive.read(CROPS))) as crops:
            packed = {k: crops[k] for k in crops.files}
    low, step = manifest["hu_window"][0], manifest["hu_step"]
    shape = tuple(manifest["shape"])
    configs = {cfg.site_id: cfg for cfg in map(load_site_config, into.glob("*/site.toml"))}
    for i, (patient, site) in enumerate(zip(packed["patient"], packed["site"], strict=True)):
        masks = {
            m: np.unpackbits(packed[m][i])[: np.prod(shape)].reshape(shape)
            for m in ("tumour", "ring")
        }
        write_arrays(
            crop_path(configs[str(site)], str(patient)),
            {
                "ct": (packed["ct"][i] * step + low).round().astype(np.int16),
                **masks,
                "spacing_mm": packed["spacing_mm"][i],
                "origin_mm": packed["origin_mm"][i],
            },
        )
    return into
