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

- ``bundle.sha256``: :func:`bundle_digest` of the two, written with them; :func:`load_bundle`
  refuses a bundle whose content no longer matches it (damaged, or edited by hand: a changed
  threshold would otherwise score every patient by it). It names the content; it is no
  signature (whoever edits the files can write a new digest too).

Nothing in it is per patient. The centre writes it (:func:`save_bundle`) and sends it to every
site in a final message (wire route ``query.model_bundle``), which keeps it under
``<paths.output>/model/``; both sides name its content by :func:`bundle_digest`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zipfile
import zlib
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
DIGEST_FILE = "bundle.sha256"
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
    (staging / DIGEST_FILE).write_text(bundle_digest(manifest, arrays) + "\n", encoding="utf-8")
    (staging / MODEL_CARD_FILE).write_text(model_card(manifest), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    return out


def load_bundle(path: Path) -> Bundle:
    """The bundle in ``path``; ValueError naming the file when it is missing, unreadable, of
    another format, or no longer the content its ``bundle.sha256`` names."""
    path = Path(path)
    manifest_file, arrays_file = path / MANIFEST_FILE, path / ARRAYS_FILE
    digest_file = path / DIGEST_FILE
    for needed in (manifest_file, arrays_file, digest_file):
        if not needed.is_file():
            inside = [  # a run or server output folder given for its bundle
                str(path / where)
                for where in ("federated/model", "model")
                if (path / where / MANIFEST_FILE).is_file()
            ]
            hint = f" (a run's folder: its bundle is {inside[0]})" if inside else ""
            raise ValueError(f"{needed}: missing; is {path} a fedmets model bundle?{hint}")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_file}: not readable JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{manifest_file}: format {found!r}, this fedmets reads {BUNDLE_FORMAT!r}")
    try:
        with np.load(arrays_file) as stored:
            arrays = {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{arrays_file}: unreadable or truncated ({error!r})") from error
    bundle = Bundle(manifest, arrays)
    expected = digest_file.read_text(encoding="utf-8").strip()
    if bundle.digest() != expected:
        raise ValueError(
            f"{path}: its manifest.json and arrays.npz are not the bundle {DIGEST_FILE} names "
            f"({expected[:16]}..., now {bundle.digest()[:16]}...): damaged or edited since it "
            "was written; use the bundle as the run wrote it"
        )
    return bundle
