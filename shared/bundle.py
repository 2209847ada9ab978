"""The model bundle's format (``<run output>/model/``), read by both sides: the centre writes it
(``fedmets.server.bundle``), a site applies it (``fedmets.client.predict``).

- ``arrays.npz``: the pooled standardisation of the selected radiomics columns
  (``radiomics_mean``/``radiomics_scale``, (k,)) and of the clinical columns (``clinical_*``,
  (q,)); the deep-feature centring and projection (``deep_mean`` (D,), ``deep_projection``
  (D, c) or ``deep_scale`` (D,)); the image model's weights (``image/<parameter>``) and each
  fusion network's (``fusion/<network>/<parameter>``); with ComBat harmonisation the pooled
  fit of the selected columns (``combat_grand_mean``, ``combat_effects`` (q, k),
  ``combat_variance``, ``combat_mean``: the imputation mean), which a site that was not in the
  federation fits its own batch with (``fedmets.client.harmonise``).
- ``manifest.json``: format and versions; the run, its config's fingerprint and the sites'
  schema and extraction-settings hashes; the selected radiomics features by their PyRadiomics
  names; the harmonisation (method, covariates, the sites that took part); the image model's
  settings; the fusion networks and how they make each model; each
  model's threshold and how it was chosen; the rounds each network trained; each model's
  cross-validated pooled metrics with their CIs; the training cohort in counts.

Nothing in it is per patient. The centre writes it (:func:`save_bundle`) and sends it to every
site in a final message (wire route ``query.model_bundle``), which keeps it under
``<paths.output>/model/``; both sides name its content by :func:`bundle_digest`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmets.shared.model_card import model_card

BUNDLE_FORMAT = "fedmets-model-1"
MANIFEST_FILE = "manifest.json"
ARRAYS_FILE = "arrays.npz"
MODEL_CARD_FILE = "MODEL_CARD.md"
THRESHOLD_RULE = "Youden J on the final model's pooled training scores (every patient)"
STANDARDISE_ARRAYS = (
    "radiomics_mean",
    "radiomics_scale",
    "clinical_mean",
    "clinical_scale",
    "deep_mean",
    "deep_scale",
    "deep_projection",
)


@dataclass
class Bundle:
    """A loaded bundle: ``manifest`` (manifest.json) and ``arrays`` (name -> array)."""

    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def standardise(self) -> dict[str, np.ndarray]:
        """The standardisation arrays (``fedmets.client.scoring.standardised_groups``)."""
        return {k: v for k, v in self.arrays.items() if k in STANDARDISE_ARRAYS}

    def image_weights(self) -> dict[str, np.ndarray]:
        """The image model's state dict."""
        return {k[len("image/") :]: v for k, v in self.arrays.items() if k.startswith("image/")}

    def digest(self) -> str:
        """:func:`bundle_digest` of this bundle."""
        return bundle_digest(self.manifest, self.arrays)

    def fusion_weights(self) -> dict[str, dict[str, np.ndarray]]:
        """Each fusion network's state dict, by network name."""
        states: dict[str, dict[str, np.ndarray]] = {}
        for key, value in self.arrays.items():
            if key.startswith("fusion/"):
                network, parameter = key[len("fusion/") :].rsplit("/", 1)
                states.setdefault(network, {})[parameter] = value
        return states


def bundle_digest(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a bundle's content: its manifest (canonical JSON) and every array (name,
    dtype, shape, bytes) in name order. Equal wherever the same bundle is held."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_bundle(out: Path, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write a bundle into ``out`` atomically (a staging folder beside it, then renamed; an
    earlier bundle there is replaced); return ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=out.parent))
    np.savez(staging / ARRAYS_FILE, **{k: np.asarray(v) for k, v in arrays.items()})
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    (staging / MODEL_CARD_FILE).write_text(model_card(manifest), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return out


def load_bundle(path: Path) -> Bundle:
    """The bundle in ``path``; ValueError naming the file when it is missing or of another
    format."""
    path = Path(path)
    manifest_file, arrays_file = path / MANIFEST_FILE, path / ARRAYS_FILE
    for needed in (manifest_file, arrays_file):
        if not needed.is_file():
            raise ValueError(f"{needed}: missing; is {path} a fedmets model bundle?")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(
            f"{manifest_file}: format {manifest.get('format')!r}, this fedmets reads "
            f"{BUNDLE_FORMAT!r}"
        )
    with np.load(arrays_file) as stored:
        arrays = {k: stored[k] for k in stored.files}
    return Bundle(manifest, arrays)
