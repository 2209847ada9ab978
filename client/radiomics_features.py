"""PyRadiomics features of the tumour and of the peritumoral ring.

Parameter files: ``[radiomics] params = "default"`` is ``client/resources/radiomics_full.yaml``
(1502 tumour features, 1488 ring features), ``"fast"`` is ``radiomics_fast.yaml`` (293 and 279);
any other value is the path of a PyRadiomics parameter file. Shape features are the tumour's
only (:data:`SHAPE_REGIONS`). Feature names are PyRadiomics' own
(``original_firstorder_Mean``, ``log-sigma-2-0-mm-3D_glcm_Idm``, ...) prefixed with ``tumour_`` or
``ring_``; PyRadiomics' ``diagnostics_*`` entries are dropped. See docs/radiomics.md.

Tumour and ring share one CT crop: when the parameter file lets PyRadiomics' filtered images
(wavelet, LoG, ...) be independent of the mask, each filter runs once for both regions
(:func:`regions_features`), with values equal to one ``extractor.execute`` call per region.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

import radiomics
import SimpleITK as sitk
from radiomics import imageoperations
from radiomics.featureextractor import RadiomicsFeatureExtractor

PARAM_FILES = {"default": "radiomics_full.yaml", "fast": "radiomics_fast.yaml"}
REGIONS = ("tumour", "ring")
SHAPE_REGIONS = ("tumour",)
"""The regions whose shape features are extracted. The ring's shape is the tumour's, dilated by
the margin and cut where air and bone begin: our construction, not the patient's biology. Its
mesh, an inner and an outer surface, took 5-7x the tumour's (PyRadiomics measures diameters
over every pair of surface points): without it a site extracts ~1.4x faster (docs/radiomics.md)."""
# PyRadiomics settings with which ``execute`` resamples or crops the image to the mask's bounding
# box, or changes the mask, before filtering (or sets a module-wide tolerance), and the image type
# whose filter reads the mask: with any of them each region runs through ``execute`` alone.
_MASK_DEPENDENT_SETTINGS = (
    "resampledPixelSpacing",
    "preCrop",
    "resegmentRange",
    "geometryTolerance",
)
_MASK_DEPENDENT_IMAGE_TYPES = ("LBP3D",)


def params_file(params: str | Path) -> Path:
    """The parameter file that ``[radiomics] params`` names (a shipped preset or a path)."""
    if isinstance(params, str) and params in PARAM_FILES:
        return Path(str(resources.files("fedmets.client.resources").joinpath(PARAM_FILES[params])))
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


@lru_cache(maxsize=4)
def restricted_extractor(path: Path, features: tuple[str, ...]) -> RadiomicsFeatureExtractor:
    """The extractor of the parameter file at ``path`` computing only what ``features`` (fedmets
    names, ``<region>_<image type>_<class>_<feature>``) need: their image types (LoG only at
    their sigmas, with the file's other settings) and their features. Each value equals the full
    extraction's: a PyRadiomics feature does not depend on which others are enabled."""
    radiomics.setVerbosity(logging.ERROR)
    extractor = RadiomicsFeatureExtractor(str(path))
    configured = dict(extractor.enabledImagetypes)
    sigmas: dict[str, set[float]] = {}
    classes: dict[str, set[str]] = {}
    for name in features:
        type_name, feature_class, feature = name.split("_", 1)[1].rsplit("_", 2)
        image_type, sigma = _image_type(type_name)
        sigmas.setdefault(image_type, set()).update([] if sigma is None else [sigma])
        classes.setdefault(feature_class, set()).add(feature)
    extractor.disableAllImageTypes()
    for image_type, needed in sigmas.items():
        custom = dict(configured.get(image_type) or {})
        if needed:
            custom["sigma"] = sorted(needed)
        extractor.enableImageTypeByName(image_type, customArgs=custom)
    extractor.disableAllFeatures()
    extractor.enableFeaturesByName(**{k: sorted(v) for k, v in classes.items()})
    return extractor


def wanted_features(features: tuple[str, ...]) -> dict[str, dict[str, dict[str, list[str]]]]:
    """``features`` (fedmets names) as region -> image type name -> feature class -> names."""
    wanted: dict[str, dict[str, dict[str, list[str]]]] = {}
    for name in features:
        region, rest = name.split("_", 1)
        type_name, feature_class, feature = rest.rsplit("_", 2)
        classes = wanted.setdefault(region, {}).setdefault(type_name, {})
        classes.setdefault(feature_class, []).append(feature)
    return wanted


def _image_type(type_name: str) -> tuple[str, float | None]:
    """PyRadiomics' image type of a feature-name prefix (``log-sigma-2-0-mm-3D`` -> ("LoG",
    2.0), ``wavelet-LLH`` -> ("Wavelet", None))."""
    if type_name.startswith("log-sigma-"):
        return "LoG", float(type_name[len("log-sigma-") : -len("-mm-3D")].replace("-", "."))
    if type_name.startswith("wavelet"):
        return "Wavelet", None
    if type_name.startswith("lbp-"):
        return ("LBP3D" if type_name.startswith("lbp-3D") else "LBP2D"), None
    known = {"squareroot": "SquareRoot"}
    return known.get(type_name, type_name.capitalize()), None


def shares_filtered_images(extractor: RadiomicsFeatureExtractor) -> bool:
    """Whether the extractor's filtered images are the same for every mask on one CT (no
    resampling, pre-cropping or resegmentation by PyRadiomics, no mask-reading filter)."""
    settings = extractor.settings
    return not any(settings.get(name) for name in _MASK_DEPENDENT_SETTINGS) and not (
        set(extractor.enabledImagetypes) & set(_MASK_DEPENDENT_IMAGE_TYPES)
    )


def regions_features(
    extractor: RadiomicsFeatureExtractor,
    ct: sitk.Image,
    masks: dict[str, sitk.Image],
    wanted: Mapping[str, Mapping[str, dict[str, list[str]]]] | None = None,
) -> dict[str, float]:
    """PyRadiomics features of ``ct`` (HU) inside each ``masks[region]`` (label 1, on the CT's
    grid), named ``<region>_<name>``, regions in the given order, diagnostics dropped; values as
    Python floats (NaN where PyRadiomics returns NaN).

    Equal, value for value, to ``extractor.execute(ct, mask, label=1)`` per region, less the
    shape features of regions outside :data:`SHAPE_REGIONS`. When
    :func:`shares_filtered_images`, PyRadiomics' own steps run with each filter applied once:
    load and check every mask, shape per mask, then every filtered image cropped to each mask.
    Raises what ``execute`` raises; a mask PyRadiomics rejects raises ValueError naming the
    region. ``wanted`` (region -> image type name -> feature class -> features, from
    :func:`wanted_features`): with shared filters, compute for each region and filtered image
    only those (at least; a class computes its matrix once whatever its features)."""
    enabled = extractor.enabledFeatures
    if not shares_filtered_images(extractor):
        features: dict[str, float] = {}
        try:
            for region, mask in masks.items():
                extractor.enabledFeatures = _region_classes(enabled, region, wanted)
                with _naming(region):
                    features |= _named(extractor.execute(ct, mask, label=1), region)
        finally:
            extractor.enabledFeatures = enabled
        return features
    settings = extractor.settings | {"label": 1}
    vectors, checked = {}, {}
    try:
        for region, mask in masks.items():
            with _naming(region):  # the loaded image is the same for every mask (shared filters)
                image, mask = extractor.loadImage(ct, mask, None, **settings)
                box, corrected = imageoperations.checkMask(image, mask, **settings)
            checked[region] = (mask if corrected is None else corrected, box)
            extractor.enabledFeatures = (
                wanted.get(region, {}).get("original", {})
                if wanted is not None
                else _region_classes(enabled, region, None)
            )
            vectors[region] = dict(extractor.computeShape(image, *checked[region], **settings))
        extractor.enabledFeatures = enabled
        for image_type, custom in extractor.enabledImagetypes.items():
            make_images = getattr(imageoperations, f"get{image_type}Image")
            for filtered, type_name, kwargs in make_images(image, None, **(settings | custom)):
                for region, (mask, box) in checked.items():
                    if wanted is not None:
                        extractor.enabledFeatures = wanted.get(region, {}).get(type_name, {})
                        if not extractor.enabledFeatures:
                            continue
                    cropped, cropped_mask = imageoperations.cropToTumorMask(filtered, mask, box)
                    vectors[region].update(
                        extractor.computeFeatures(cropped, cropped_mask, type_name, **kwargs)
                    )
    finally:
        extractor.enabledFeatures = enabled
    return {
        name: value for region in masks for name, value in _named(vectors[region], region).items()
    }


def _region_classes(
    enabled: Mapping[str, list[str] | None],
    region: str,
    wanted: Mapping[str, Mapping[str, dict[str, list[str]]]] | None,
) -> dict[str, list[str] | None]:
    """The feature classes ``enabled`` for ``region``: without shape where the region is not one
    of :data:`SHAPE_REGIONS`, unless ``wanted`` names its shape features (a bundle that asks for
    them gets them)."""
    named = wanted is not None and any(
        feature_class.startswith("shape")
        for feature_class in wanted.get(region, {}).get("original", {})
    )
    if region in SHAPE_REGIONS or named:
        return dict(enabled)
    return {name: value for name, value in enabled.items() if not name.startswith("shape")}


@contextmanager
def _naming(region: str) -> Iterator[None]:
    """Prefix a ValueError raised inside (PyRadiomics rejecting a mask) with ``<region> mask``."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{region} mask: {error}") from error


def _named(result: dict, region: str) -> dict[str, float]:
    """PyRadiomics' result as ``<region>_<name>`` -> float, diagnostics dropped."""
    return {
        f"{region}_{name}": float(value)
        for name, value in result.items()
        if not name.startswith("diagnostics_")
    }
