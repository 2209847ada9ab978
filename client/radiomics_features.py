"""PyRadiomics features of the tumour and of the peritumoral ring.

Parameter files: ``[radiomics] params = "default"`` is ``client/resources/radiomics_full.yaml``
(1502 features per region), ``"fast"`` is ``radiomics_fast.yaml`` (293 per region); any other
value is the path of a PyRadiomics parameter file. Feature names are PyRadiomics' own
(``original_firstorder_Mean``, ``log-sigma-2-0-mm-3D_glcm_Idm``, ...) prefixed with ``tumour_`` or
``ring_``; PyRadiomics' ``diagnostics_*`` entries are dropped. See docs/radiomics.md.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib import resources
from pathlib import Path

import radiomics
import SimpleITK as sitk
from radiomics.featureextractor import RadiomicsFeatureExtractor

PARAM_FILES = {"default": "radiomics_full.yaml", "fast": "radiomics_fast.yaml"}
REGIONS = ("tumour", "ring")


def params_file(params: str | Path) -> Path:
    """The parameter file that ``[radiomics] params`` names (a shipped preset or a path)."""
    if isinstance(params, str) and params in PARAM_FILES:
        return Path(str(resources.files("client.resources").joinpath(PARAM_FILES[params])))
    return Path(params)


def use_one_thread() -> None:
    """Make ITK filters (PyRadiomics' resampling and image filters) single-threaded: for worker
    processes that each extract one patient at a time."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


@lru_cache(maxsize=4)
def extractor_for(path: Path) -> RadiomicsFeatureExtractor:
    """A feature extractor configured by the parameter file at ``path`` (cached per process).
    PyRadiomics' log is limited to errors: its warnings repeat for every patient, and its errors
    surface as the patient's failure anyway."""
    radiomics.setVerbosity(logging.ERROR)
    return RadiomicsFeatureExtractor(str(path))


def region_features(
    extractor: RadiomicsFeatureExtractor, ct: sitk.Image, mask: sitk.Image, region: str
) -> dict[str, float]:
    """PyRadiomics features of ``ct`` (HU) inside ``mask`` (label 1), named ``<region>_<name>``,
    diagnostics dropped; values as Python floats (NaN where PyRadiomics returns NaN)."""
    result = extractor.execute(ct, mask, label=1)
    return {
        f"{region}_{name}": float(value)
        for name, value in result.items()
        if not name.startswith("diagnostics_")
    }
