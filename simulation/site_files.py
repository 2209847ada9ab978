"""Site folder files: site.toml, and re-partitioning a cohort folder or feature table into new
site folders (`fedmets split`). Images are never copied or read: manifests point at the originals.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmets.simulation.partition import assign_sites, summarise

IMAGE_PATH_MODALITIES = {
    "ct_path": "ct",
    "tumour_mask_path": "tumour_mask",
    "organ_mask_path": "organ_mask",
}
CLINICAL_COLUMNS = ("age", "sex", "smoking", "alcohol", "t_stage", "n_stage", "hpv", "subsite")
TABULAR_MODALITIES = ["radiomics_table", "clinical"]
MANIFEST = "manifest.csv"
FEATURES = "features.csv"
TRUTH = Path("ground_truth") / "truth.csv"


def write_site_config(
    site_dir: Path,
    site_id: str,
    *,
    mode: str,
    modalities: list[str],
    seed: int,
    manifest: str = "manifest.csv",
    id_column: str = "patient_id",
    label_column: str = "dm",
    workers: int = 2,
    peritumoral_margin_mm: float = 5.0,
    radiomics_params: str = "default",
    crop_voxels: int | None = None,
    policy: Mapping[str, Any] | None = None,
) -> Path:
    """Write site_dir/site.toml (data.root = "." i.e. the site folder itself) and return its
    path. ``radiomics_params``: "default", "fast" or a parameter file path; ``crop_voxels``:
    the side of the deep-model crops (default: ``[preprocess]``'s, 64); ``policy``: keys of
    the site's ``[policy]`` beside ``randomness = "seeded"``, which every simulated site gets
    (reproducible folds and DP noise; a hospital keeps the default, "secure")."""
    q = json.dumps  # a JSON string literal is a valid TOML basic string
    text = f"""\
# Site configuration for fedmets (see shared/config.py). Paths are relative to this file's folder.
site_id = {q(site_id)}
seed = {int(seed)}

[data]
root = "."  # relative to the TOML file's folder
manifest = {q(manifest)}  # relative to data.root
mode = {q(mode)}  # images | tabular
modalities = [{", ".join(q(m) for m in modalities)}]
id_column = {q(id_column)}
label_column = {q(label_column)}

[compute]
device = "auto"
workers = {int(workers)}

[paths]
cache = "cache"
output = "output"

[radiomics]
params = {q(radiomics_params)}
peritumoral_margin_mm = {float(peritumoral_margin_mm)!r}
"""
    if crop_voxels is not None:
        side = int(crop_voxels)
        text += f"\n[preprocess]\ncrop_voxels = [{side}, {side}, {side}]\n"
    text += (  # the last table: keys appended to the file land in it
        "\n[policy]\n# A simulated site: folds and DP noise from `seed`, so runs repeat (a hospital"
        '\n# keeps the default, "secure").\n'
    )
    for key, value in {"randomness": "seeded", **(policy or {})}.items():
        text += f"{key} = {json.dumps(value)}\n"
    site_dir = Path(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    path = site_dir / "site.toml"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class PooledInput:
    """Rows to split, cells kept verbatim as text; image paths of a cohort made absolute."""

    path: Path
    kind: str  # "cohort" | "table"
    table: pd.DataFrame
    source_site: pd.Series | None  # cohort: original site folder name per row
    truth: pd.DataFrame | None  # cohort: ground_truth/truth.csv, if present
    settings: dict[str, Any] | None = None  # cohort: write_site_config keys its sites share
    differing: list[str] | None = None  # cohort: settings its sites disagree on (defaults)


def is_cohort_folder(path: Path) -> bool:
    """A folder with cohort.json or with <site>/manifest.csv files."""
    path = Path(path)
    return path.is_dir() and ((path / "cohort.json").is_file() or any(path.glob(f"*/{MANIFEST}")))


def read_input(path: Path, id_column: str = "patient_id") -> PooledInput:
    """Pool the site manifests of a cohort folder, or read a feature table CSV."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"input not found: {path}")
    if path.is_dir():
        if not is_cohort_folder(path):
            raise ValueError(f"{path} is not a cohort folder (no cohort.json or */{MANIFEST})")
        pooled = _read_cohort(path)
    else:
        pooled = PooledInput(path, "table", _read_csv(path), None, None)
    _check_ids(pooled.table, id_column, path)
    if pooled.truth is not None:
        needed = {_truth_key(pooled.truth, id_column), "site_id"}
        if not needed <= set(pooled.truth.columns):
            raise ValueError(f"{path / TRUTH} needs the columns {', '.join(sorted(needed))}")
    return pooled


def split_input(
    input_path: Path,
    out: Path,
    scheme: str,
    *,
    n_sites: int | None = None,
    alpha: float = 0.5,
    column: str | None = None,
    label_column: str = "dm",
    id_column: str = "patient_id",
    seed: int = 0,
    min_per_site: int = 2,
) -> dict:
    """Re-partition INPUT into site folders under OUT; return what was written to split.json."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} already exists and is not empty")
    pooled = read_input(input_path, id_column)
    sites = assign_sites(
        pooled.table,
        scheme,
        n_sites=n_sites,
        label_column=label_column,
        seed=seed,
        alpha=alpha,
        column=column,
        min_per_site=min_per_site,
    )
    parameters = {"column": column} if scheme == "column" else {"n_sites": n_sites}
    if scheme in ("dirichlet", "quantity"):
        parameters["alpha"] = alpha
    parameters |= {
        "label_column": label_column,
        "id_column": id_column,
        "min_per_site": min_per_site,
    }
    summary = summarise(pooled.table, sites, label_column)
    record = {
        "created_by": "fedmets split",
        "input": str(pooled.path.resolve()),
        "input_kind": pooled.kind,
        "scheme": scheme,
        "parameters": parameters,
        "seed": seed,
        "n_rows": len(pooled.table),
        "positives": int(summary["positives"].sum()),
        "moved_rows": int(sites.attrs.get("moved_rows", 0)),
        "sites": [],
        "ground_truth": None,
    }
    if pooled.kind == "cohort":  # what the new sites' site.toml keep of the old ones'
        record["site_settings"] = {"kept": pooled.settings, "differing": pooled.differing}
    for number, row in enumerate(summary.itertuples(index=False), start=1):
        mask = (sites == row.site_id).to_numpy()
        site_dir = out / row.site_id
        _write_site(pooled, mask, site_dir, row.site_id, 1000 * seed + number, parameters)
        sources = None
        if pooled.source_site is not None:
            counts = pooled.source_site[mask].value_counts()
            sources = {str(k): int(counts[k]) for k in sorted(counts.index)}
        record["sites"].append(
            {
                "site_id": row.site_id,
                "n": int(row.n),
                "positives": int(row.positives),
                "prevalence": round(float(row.prevalence), 4),
                "source_sites": sources,
            }
        )
    if pooled.truth is not None:
        record["ground_truth"] = _write_truth(pooled, sites, out, id_column)
    (out / "split.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _read_csv(path: Path) -> pd.DataFrame:
    """The table's cells as text; ValueError naming the file when it is no comma-separated
    UTF-8 table (a workbook, semicolons: the site check's words, ``read_text_table``)."""
    from fedmets.client.ingest import read_text_table  # SimpleITK and the rest: here only

    read_text_table(Path(path))
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path} as CSV: {exc}") from exc


def _read_cohort(cohort: Path) -> PooledInput:
    manifests = sorted(p for p in cohort.glob(f"*/{MANIFEST}") if p.parent.name != "ground_truth")
    if not manifests:
        raise ValueError(f"no site manifests (*/{MANIFEST}) in {cohort}")
    frames, source = [], []
    for manifest in manifests:
        frame = _read_csv(manifest)
        for col in frame.columns.intersection(list(IMAGE_PATH_MODALITIES)):
            frame[col] = [
                os.path.abspath(os.path.join(manifest.parent, p)) if p else "" for p in frame[col]
            ]
        frames.append(frame)
        source += [manifest.parent.name] * len(frame)
    table = pd.concat(frames, ignore_index=True).fillna("")
    truth = _read_csv(cohort / TRUTH) if (cohort / TRUTH).is_file() else None
    settings, differing = _shared_settings([m.parent / "site.toml" for m in manifests])
    source_site = pd.Series(source, name="source_site")
    return PooledInput(cohort, "cohort", table, source_site, truth, settings, differing)


def _shared_settings(tomls: list[Path]) -> tuple[dict[str, Any], list[str]]:
    """The :func:`write_site_config` keys the cohort's sites (``tomls``, those that exist) set
    alike -- radiomics parameters and margin, crop size, ``[policy]`` keys -- so that the new
    sites extract and cross-validate as the old ones did; and the keys they set differently
    (left at the default). A parameter file's path is made absolute."""
    found: list[dict[str, Any]] = []
    for toml in tomls:
        if not toml.is_file():
            continue
        data = tomllib.loads(toml.read_text(encoding="utf-8-sig"))
        radiomics, preprocess = data.get("radiomics", {}), data.get("preprocess", {})
        params = radiomics.get("params", "default")
        if params not in ("default", "fast"):
            params = os.path.abspath(os.path.join(toml.parent, params))
        keys = {"radiomics_params": params}
        if "peritumoral_margin_mm" in radiomics:
            keys["peritumoral_margin_mm"] = float(radiomics["peritumoral_margin_mm"])
        if "crop_voxels" in preprocess:
            keys["crop_voxels"] = int(preprocess["crop_voxels"][0])
        keys |= {f"policy.{k}": v for k, v in data.get("policy", {}).items()}
        found.append(keys)
    names = sorted({k for keys in found for k in keys})
    shared = {
        k: found[0][k] for k in names if all(keys.get(k) == found[0].get(k) for keys in found)
    }
    policy = {k.removeprefix("policy."): v for k, v in shared.items() if k.startswith("policy.")}
    settings = {k: v for k, v in shared.items() if not k.startswith("policy.")}
    return settings | ({"policy": policy} if policy else {}), sorted(set(names) - set(shared))


def _check_ids(table: pd.DataFrame, id_column: str, path: Path) -> None:
    if id_column not in table.columns:
        raise ValueError(f"id column {id_column!r} not found in {path} (use --id)")
    ids = table[id_column].astype(str).str.strip()
    if ids.eq("").any():
        raise ValueError(f"id column {id_column!r} is empty in {int(ids.eq('').sum())} rows")
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        raise ValueError(
            f"id column {id_column!r} has {len(duplicated)} duplicated ids, e.g. {duplicated[0]!r}"
        )


def _write_site(
    pooled: PooledInput, mask: np.ndarray, site_dir: Path, site_id: str, seed: int, parameters: dict
) -> None:
    rows = pooled.table[mask].copy()
    site_dir.mkdir(parents=True)
    if pooled.kind == "table":
        rows.to_csv(site_dir / FEATURES, index=False)
        mode, modalities, manifest = "tabular", TABULAR_MODALITIES, FEATURES
    else:
        modalities = []
        for col, modality in IMAGE_PATH_MODALITIES.items():
            if col in rows.columns:
                rows[col] = [
                    Path(os.path.relpath(p, os.path.abspath(site_dir))).as_posix() if p else ""
                    for p in rows[col]
                ]
                if rows[col].ne("").any():
                    modalities.append(modality)
        if rows.columns.intersection(list(CLINICAL_COLUMNS)).size:
            modalities.append("clinical")
        rows.to_csv(site_dir / MANIFEST, index=False)
        mode, manifest = "images", MANIFEST
    write_site_config(
        site_dir,
        site_id,
        mode=mode,
        modalities=modalities,
        seed=seed,
        manifest=manifest,
        id_column=parameters["id_column"],
        label_column=parameters["label_column"],
        **(pooled.settings or {}),
    )


def _write_truth(pooled: PooledInput, sites: pd.Series, out: Path, id_column: str) -> dict:
    truth = pooled.truth
    key = _truth_key(truth, id_column)
    new_site = dict(zip(pooled.table[id_column].astype(str), sites, strict=True))
    matched = truth[key].isin(list(new_site))
    truth = truth[matched].copy()
    truth["site_id"] = truth[key].map(new_site)
    (out / TRUTH.parent).mkdir(parents=True, exist_ok=True)
    truth.to_csv(out / TRUTH, index=False)
    return {"rows": len(truth), "unmatched_rows_dropped": int((~matched).sum())}


def _truth_key(truth: pd.DataFrame, id_column: str) -> str:
    """The patient id column of truth.csv: the manifests' id column, else patient_id."""
    return id_column if id_column in truth.columns else "patient_id"
