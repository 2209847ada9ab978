"""Writing the model bundle (``<run output>/model/``, format ``fedmets.shared.bundle``): the final
federated model as a hospital applies it to its next patient (``fedmets site predict``), with what
it needs and what it was shown to do. Written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np

from fedmets.server.results import to_jsonable
from fedmets.shared import wire
from fedmets.shared.bundle import (
    ARRAYS_FILE,
    BUNDLE_FORMAT,
    MANIFEST_FILE,
    STANDARDISE_ARRAYS,
    THRESHOLD_RULE,
)
from fedmets.shared.clinical import encoded_columns
from fedmets.shared.config import FederationConfig


def write_bundle(out: Path, result: dict, cfg: FederationConfig) -> Path:
    """Write the bundle of a protocol result (``FederatedProtocol.run_all`` with its
    ``final`` model) into ``out`` (replaced when it exists); return ``out``."""
    final = result["final"]
    census = result["census"]
    reference = census[min(census)]
    standardise = final["standardise"]
    names = reference["radiomics_names"]
    selected = [str(names[int(i)]) for i in standardise["radiomics_columns"]]
    arrays = {k: np.asarray(v) for k, v in standardise.items() if k in STANDARDISE_ARRAYS}
    for parameter, value in (final["image"] or {}).items():
        arrays[f"image/{parameter}"] = np.asarray(value)
    for network, state in final["fusion"].items():
        for parameter, value in state.items():
            arrays[f"fusion/{network}/{parameter}"] = np.asarray(value)
    settings = cfg.model_dump(mode="json")
    model = cfg.model
    events = [c.get("positives") for c in census.values()]
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "fedmets": version("fedmets"),
            "protocol": wire.PROTOCOL_VERSION,
            "torch": version("torch"),
        },
        "run": result["run"],
        "config_fingerprint": hashlib.sha256(
            json.dumps(settings, sort_keys=True).encode()
        ).hexdigest(),
        "federation": settings,
        "mode": reference["mode"],
        "schema_hash": reference["schema_hash"],
        "params_hash": reference["params_hash"],
        "radiomics_features": selected,
        "clinical_columns": encoded_columns() if "clinical_mean" in standardise else [],
        "image": None
        if final["image"] is None
        else {
            "backbone": model.backbone,
            "image_preset": model.image_preset,
            "mask_channel": model.mask_channel,
        },
        "fusion": {
            "mode": model.fusion,
            "networks": list(final["fusion"]),
            "hidden": list(model.fusion_hidden),
            "dropout": model.fusion_dropout,
            "group_dropout": model.fusion_group_dropout,
            "dims": final["dims"],
        },
        "main_model": result["main_model"],
        "models": list(final["record"]["thresholds"]),
        "thresholds": final["record"]["thresholds"],
        "threshold_rule": THRESHOLD_RULE,
        "rounds": final["rounds"],
        "cross_validated": {name: entry["pooled"] for name, entry in result["models"].items()},
        "cohort": {
            "sites": len(census),
            "patients": int(sum(c["n"] for c in census.values())),
            "events": None if None in events else int(sum(events)),
        },
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=out.parent))
    np.savez(staging / ARRAYS_FILE, **arrays)
    (staging / MANIFEST_FILE).write_text(
        json.dumps(to_jsonable(manifest), indent=1) + "\n", encoding="utf-8"
    )
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return out
