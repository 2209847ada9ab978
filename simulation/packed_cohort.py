"""A pooled study cohort in one file, for running the centralised study on a machine that has
neither the sites' raw files nor PyRadiomics or SimpleITK (a lent GPU machine, say).

:func:`pack_cohort` writes what ``fedmets.simulation.study.load_cohort`` pooled -- ids, labels,
sites, subsites, radiomics and clinical tables, the oracle and true risks of a synthetic cohort --
and every patient's deep crop (``crop.npz``: ``ct`` (z, y, x) HU, ``tumour`` and ``ring`` masks)
into one ``.npz`` (LZMA-compressed: a fifth smaller than ``np.savez_compressed``, and slow
to write: about two minutes for the 400-patient demo cohort). To keep it small the CT is
clipped to ``hu_window`` and quantised to ``hu_step`` HU (uint8): values outside the window
read back as its edges, so the file serves studies whose CT window lies inside
``hu_window``; the rounding error is uniform, SD ``hu_step / sqrt(12)`` HU.
:func:`unpack_cohort` writes the crops back as ``crop.npz`` files and returns the
``StudyData``, so the study runs unchanged on it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from fedmets.client.crops import HU_WINDOW
from fedmets.simulation.study import StudyData

FORMAT = "fedmets-packed-cohort-1"


def pack_cohort(
    data: StudyData,
    path: Path,
    hu_window: tuple[float, float] = HU_WINDOW,
    hu_step: float = 5.0,
) -> dict:
    """Write ``data`` (with crops) to ``path`` (.npz); return its summary (patients, bytes,
    quantisation)."""
    if data.crops is None:
        raise ValueError("pack_cohort needs a cohort with crops (image mode)")
    low, high = hu_window
    levels = round((high - low) / hu_step)
    if levels > 255:
        raise ValueError(f"{levels + 1} CT levels do not fit uint8: widen hu_step")
    ct, tumour, ring = [], [], []
    for crop in data.crops:
        with np.load(crop) as arrays:
            ct.append(np.round((np.clip(arrays["ct"], low, high) - low) / hu_step).astype(np.uint8))
            tumour.append(arrays["tumour"].astype(np.uint8))
            ring.append(arrays["ring"].astype(np.uint8))
    meta = {
        "format": FORMAT,
        "source": data.source,
        "mode": data.mode,
        "notes": data.notes,
        "oracle": data.oracle,
        "hu_window": [low, high],
        "hu_step": hu_step,
        "radiomics_columns": list(data.radiomics.columns),
        "clinical_columns": None if data.clinical is None else list(data.clinical.columns),
    }
    arrays = {
        "meta": np.array(json.dumps(meta)),
        "ids": data.ids.astype(str),
        "labels": data.labels,
        "site": data.site.astype(str),
        "subsite": data.subsite.astype(str),
        "radiomics": data.radiomics.to_numpy(np.float64),
        "ct": np.stack(ct),
        "tumour": np.packbits(np.stack(tumour), axis=-1),
        "ring": np.packbits(np.stack(ring), axis=-1),
    }
    if data.clinical is not None:
        arrays["clinical"] = data.clinical.to_numpy(np.float64)
    if data.true_risk is not None:
        arrays["true_risk"] = data.true_risk
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_LZMA) as packed:
        for name, array in arrays.items():  # an .npz that np.load reads, LZMA-compressed
            with packed.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    partial.replace(path)
    return {
        "patients": len(data.ids),
        "bytes": path.stat().st_size,
        "hu_window": [low, high],
        "hu_step": hu_step,
        "ct_rounding_sd_hu": hu_step / np.sqrt(12),
    }


def unpack_cohort(path: Path, crops_dir: Path) -> StudyData:
    """The ``StudyData`` packed in ``path``, its crops written to ``crops_dir/<id>.npz``
    (``ct`` int16 HU, ``tumour`` and ``ring`` uint8, as ``fedmets.client.extract`` writes them)."""
    with np.load(path) as packed:
        meta = json.loads(str(packed["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a packed cohort ({FORMAT})")
        arrays = {key: packed[key] for key in packed.files}
    low, _ = meta["hu_window"]
    side = arrays["ct"].shape[-1]
    crops_dir = Path(crops_dir)
    crops_dir.mkdir(parents=True, exist_ok=True)
    crops = []
    for i, patient in enumerate(arrays["ids"]):
        crop = crops_dir / f"{patient}.npz"
        np.savez(
            crop,
            ct=(arrays["ct"][i].astype(np.float32) * meta["hu_step"] + low).astype(np.int16),
            tumour=np.unpackbits(arrays["tumour"][i], axis=-1, count=side),
            ring=np.unpackbits(arrays["ring"][i], axis=-1, count=side),
        )
        crops.append(crop)
    clinical = None
    if meta["clinical_columns"] is not None:
        clinical = pd.DataFrame(arrays["clinical"], columns=meta["clinical_columns"])
    return StudyData(
        source=meta["source"],
        mode=meta["mode"],
        ids=arrays["ids"].astype(object),
        labels=arrays["labels"],
        site=arrays["site"].astype(object),
        subsite=arrays["subsite"].astype(object),
        radiomics=pd.DataFrame(arrays["radiomics"], columns=meta["radiomics_columns"]),
        clinical=clinical,
        crops=crops,
        true_risk=arrays.get("true_risk"),
        oracle=meta["oracle"],
        notes=[
            *meta["notes"],
            f"unpacked from {Path(path).name}: CT in {meta['hu_step']} HU steps",
        ],
    )
