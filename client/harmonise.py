"""A site's ComBat corrections (``fedmets.shared.harmonisation``) outside the cross-validation:
the final model's, kept with the model bundle, and applied by ``fedmets site predict``.

The final model's ``query.combat_apply`` fits each of the site's batches on every patient and
keeps the corrections in the run's state (:func:`save_adjustments`); when the bundle arrives
(``query.model_bundle``) they are copied beside it, ``<paths.output>/harmonisation.npz``, with
the bundle's content hash (:func:`keep_with_bundle`). They never leave the site.

:func:`harmonised_for_bundle` applies them to the columns a bundle reads. A site that was not in
the federation (a held-out site, a new hospital) has none: it fits its own batch on its
patients with the bundle's pooled ComBat fit (the centre's grand mean, covariate effects and
variance of the selected columns), as ComBat does for a new batch; labels are not used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmets.shared.files import write_arrays
from fedmets.shared.harmonisation import (
    MIN_OWN_BATCH,
    BatchAdjustment,
    covariate_design,
    impute,
)

if TYPE_CHECKING:
    from fedmets.client.site_worker import SiteData
    from fedmets.shared.bundle import Bundle

ADJUSTMENTS_FILE = "harmonisation.npz"


def save_adjustments(
    path: Path,
    adjustments: Mapping[str, BatchAdjustment],
    columns: list[str],
    covariates: list[str],
    mean: np.ndarray,
    bundle_sha256: str = "",
) -> None:
    """Write the batches' corrections (each over ``columns``, the radiomics names), the
    ``covariates`` and the imputation ``mean`` (p,) atomically to ``path``."""
    header = {
        "batches": sorted(adjustments),
        "columns": columns,
        "covariates": covariates,
        "bundle_sha256": bundle_sha256,
    }
    arrays = {f"{b}:{k}": v for b, a in adjustments.items() for k, v in a.arrays().items()}
    write_arrays(path, {"header": np.array(json.dumps(header)), "mean": mean, **arrays})


def load_adjustments(path: Path) -> tuple[dict, np.ndarray, dict[str, BatchAdjustment]]:
    """(header, imputation mean, batch -> correction) of :func:`save_adjustments`."""
    with np.load(path) as stored:
        header = json.loads(str(stored["header"]))
        adjustments = {
            b: BatchAdjustment.from_arrays(
                {k.split(":", 1)[1]: stored[k] for k in stored.files if k.startswith(f"{b}:")}
            )
            for b in header["batches"]
        }
        return header, stored["mean"], adjustments


def keep_with_bundle(state_file: Path, root: Path, bundle_sha256: str) -> None:
    """Copy the final model's corrections (``state_file``, when the run harmonised) to
    ``<root>/harmonisation.npz``, stamped with the bundle's hash; drop an older one."""
    target = root / ADJUSTMENTS_FILE
    if not state_file.is_file():
        target.unlink(missing_ok=True)
        return
    header, mean, adjustments = load_adjustments(state_file)
    save_adjustments(
        target, adjustments, header["columns"], header["covariates"], mean, bundle_sha256
    )


def harmonised_for_bundle(
    data: SiteData, bundle: Bundle, site_id: str, output: Path
) -> tuple[SiteData, str]:
    """``data`` with the bundle's radiomics columns harmonised as the bundle's run did, and
    how: ``"site"`` (the site's own correction from the run), ``"own-batch"`` (fitted here on
    these patients) or ``"none"`` (the bundle does not harmonise). A missing value is
    harmonised at its imputed value and kept, as the run's ``combat_apply`` did (with the
    site's correction at the fill the run used; fitted here, at the bundle's mean).
    ValueError when the site has no correction and too few patients to fit one."""
    spec = bundle.manifest.get("harmonisation") or {"method": "none"}
    if spec["method"] == "none":
        return data, "none"
    names = list(bundle.manifest["radiomics_features"])
    c = covariate_design(data.clinical, spec["covariates"])
    raw = data.radiomics[names].to_numpy()
    stored = output / ADJUSTMENTS_FILE
    header, mean, adjustments = load_adjustments(stored) if stored.is_file() else (None,) * 3
    if header and header["bundle_sha256"] == bundle.digest() and site_id in header["batches"]:
        index = [header["columns"].index(n) for n in names]
        full = adjustments[site_id]
        adjustment = BatchAdjustment(**{k: v[..., index] for k, v in full.arrays().items()})
        how, mean = "site", mean[index]
    else:
        arrays = bundle.arrays
        mean = arrays["combat_mean"]
        if len(raw) < MIN_OWN_BATCH:
            raise ValueError(
                f"{site_id}: the bundle harmonises radiomics with ComBat and this site has no "
                f"correction from its run; fitting one needs >= {MIN_OWN_BATCH} of the site's "
                f"patients, got {len(raw)} (extract the site's cohort and predict on it)"
            )
        adjustment = BatchAdjustment.fit(
            impute(raw, mean),
            c,
            arrays["combat_grand_mean"],
            arrays["combat_effects"],
            arrays["combat_variance"],
        )
        how = "own-batch"
    radiomics = data.radiomics.copy()
    radiomics[names] = adjustment.apply(impute(raw, mean), c, mean)
    return replace(data, radiomics=radiomics), how
