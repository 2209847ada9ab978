"""Where a site keeps its files: the extracted features table and its report (under
``paths.output``), each patient's extraction cache entry and deep-model crop (under
``paths.cache/extract``), and the per-run federated state with each fold's image model (under
``paths.cache/federated/<run>``).

Plain names and paths only, so that every message of the deployed ClientApp (a fresh process
per message) can find the site's files without importing PyRadiomics, SimpleITK or MONAI.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from fedmets.shared.config import SiteConfig
from fedmets.shared.files import write_arrays, write_json

FEATURES_FILE = "features.parquet"
REPORT_FILE = "extraction_report.json"
CACHE_FOLDER = "extract"
ENTRY_FILE = "features.json"
CROP_FILE = "crop.npz"
STATE_DIR = "federated"
"""A site's per-run state folder under ``paths.cache`` (``fedmets.client.site_worker``)."""
MODEL_FILE = "image-fold{fold}.npz"
SETTINGS_FILE = "image-fold{fold}.json"


def entry_name(patient_id: str) -> str:
    """A folder name for the patient: the id itself when it is filename-safe, else a safe form
    plus a hash of the id (so two ids never share an entry)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", patient_id):
        return patient_id
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", patient_id)[:64]
    return f"{safe}-{hashlib.sha256(patient_id.encode()).hexdigest()[:12]}"


def crop_path(cfg: SiteConfig, patient_id: str) -> Path:
    """Where the deep-model crop of ``patient_id`` is cached
    (``fedmets.client.preprocess.save_crop``)."""
    return cfg.paths.cache / CACHE_FOLDER / entry_name(patient_id) / CROP_FILE


def save_fold_model(state_dir: Path, fold: int, weights: dict, settings: dict) -> None:
    """Keep the fold's global image model (weights + backbone, preset, mask channel) for
    ``fedmets.client.explain``."""
    write_arrays(state_dir / MODEL_FILE.format(fold=fold), weights)
    write_json(state_dir / SETTINGS_FILE.format(fold=fold), settings)
