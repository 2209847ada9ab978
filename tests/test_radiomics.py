"""PyRadiomics features of tumour and ring on real synthetic patients: the shipped parameter
files, their feature counts, and equality with a direct PyRadiomics call."""

import math
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from radiomics.featureextractor import RadiomicsFeatureExtractor

from fedmets.client.ingest import load_patient_images, read_manifest
from fedmets.client.peritumoral import peritumoral_ring
from fedmets.client.preprocess import prepare_patient
from fedmets.client.radiomics_features import (
    SHAPE_REGIONS,
    extractor_for,
    params_file,
    regions_features,
    restricted_extractor,
    shares_filtered_images,
    use_one_thread,
    wanted_features,
)
from fedmets.shared.config import PreprocessSection, load_site_config

MARGIN_MM = 5.0
TEXTURE_PER_IMAGE = {"firstorder": 18, "glcm": 24, "glrlm": 16, "glszm": 16, "gldm": 14, "ngtdm": 5}


@pytest.fixture(scope="module")
def regions(tiny_cohort):
    """{patient_id: (ct, tumour, ring)} radiomics crops of three hospital_b patients."""
    cfg = load_site_config(tiny_cohort / "hospital_b" / "site.toml")
    crops = {}
    for record in read_manifest(cfg)[0][:3]:
        images = load_patient_images(record, cfg)
        prepared = prepare_patient(images.ct, images.tumour, PreprocessSection(), MARGIN_MM)
        ring = peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, MARGIN_MM)
        box = prepared.radiomics_box
        crops[record.patient_id] = (
            box.crop(prepared.ct),
            box.crop(prepared.tumour),
            box.crop(ring),
        )
    return crops


def test_presets_ship_inside_the_client_package():
    package = Path(str(resources.files("fedmets.client.resources")))
    assert params_file("default") == package / "radiomics_full.yaml"
    assert params_file("fast") == package / "radiomics_fast.yaml"
    for name in ("default", "fast"):
        settings = yaml.safe_load(params_file(name).read_text())["setting"]
        assert settings["binWidth"] == 25 and settings["label"] == 1
        assert "resampledPixelSpacing" not in settings  # preprocessing owns the grid
        assert shares_filtered_images(extractor_for(params_file(name)))
    assert params_file(Path("/site/custom.yaml")) == Path("/site/custom.yaml")


def direct_features(extractor: RadiomicsFeatureExtractor, ct, masks: dict) -> dict[str, float]:
    """One plain ``execute`` per region, named as fedmets names them, the ring's shape features
    left out (``SHAPE_REGIONS``)."""
    return {
        f"{region}_{name}": float(value)
        for region, mask in masks.items()
        for name, value in extractor.execute(ct, mask).items()
        if not name.startswith("diagnostics_")
        and not (region not in SHAPE_REGIONS and name.startswith("original_shape_"))
    }


def assert_same_values(mine: dict[str, float], direct: dict[str, float]) -> None:
    assert list(mine) == list(direct)
    for name, value in mine.items():
        assert value == direct[name] or (math.isnan(value) and math.isnan(direct[name])), name


@pytest.mark.slow
@pytest.mark.parametrize("resampled", [False, True], ids=["shared filters", "execute per region"])
def test_features_equal_one_direct_pyradiomics_call_per_region(regions, tmp_path, resampled):
    """Each filter runs once for both regions, yet every value is the one PyRadiomics gives each
    region alone; a file that resamples (filtered images depend on the mask) runs them apart."""
    settings = yaml.safe_load(params_file("fast").read_text())
    if resampled:
        settings["setting"]["resampledPixelSpacing"] = [1, 1, 1]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(settings))
    extractor = extractor_for(path)
    assert shares_filtered_images(extractor) is not resampled
    direct_extractor = RadiomicsFeatureExtractor(str(path))
    for ct, tumour, ring in regions.values():
        masks = {"tumour": tumour, "ring": ring}
        assert_same_values(
            regions_features(extractor, ct, masks), direct_features(direct_extractor, ct, masks)
        )


def test_a_rejected_mask_names_its_region(regions):
    ct, tumour, ring = next(iter(regions.values()))
    empty = sitk.Image(ring)
    empty[:, :, :] = 0
    extractor = extractor_for(params_file("fast"))
    for masks in ({"tumour": tumour, "ring": empty}, {"ring": empty, "tumour": tumour}):
        with pytest.raises(ValueError, match="^ring mask: No labels found"):
            regions_features(extractor, ct, masks)


def counts(features: dict[str, float], region: str) -> tuple[Counter, Counter]:
    """(features per image type, features per class of the original image)."""
    names = [name.removeprefix(f"{region}_") for name in features]
    assert len(names) == len(features)  # every name carries the prefix
    image_types = Counter(name.split("_")[0] for name in names)
    classes = Counter(name.split("_")[1] for name in names if name.startswith("original_"))
    return image_types, classes


def test_fast_preset_gives_293_tumour_and_279_ring_features(regions):
    ct, tumour, ring = next(iter(regions.values()))
    extractor = extractor_for(params_file("fast"))
    for region, mask, shape in (("tumour", tumour, 14), ("ring", ring, 0)):
        features = regions_features(extractor, ct, {region: mask})
        image_types, classes = counts(features, region)
        assert len(features) == 279 + shape
        assert image_types == {
            "original": 93 + shape,
            "log-sigma-2-0-mm-3D": 93,
            "log-sigma-4-0-mm-3D": 93,
        }
        assert classes == TEXTURE_PER_IMAGE | ({"shape": shape} if shape else {})
        assert not any("diagnostics" in name for name in features)


@pytest.mark.slow
def test_a_bundle_asking_for_ring_shape_features_gets_them(regions):
    """Names that a model trained before the ring lost its shape features still extract."""
    ct, tumour, ring = next(iter(regions.values()))
    names = ("ring_original_shape_VoxelVolume", "tumour_original_firstorder_Mean")
    extractor = restricted_extractor(params_file("fast"), names)
    features = regions_features(
        extractor, ct, {"tumour": tumour, "ring": ring}, wanted_features(names)
    )
    direct = RadiomicsFeatureExtractor(str(params_file("fast"))).execute(ct, ring)
    assert features["ring_original_shape_VoxelVolume"] == direct["original_shape_VoxelVolume"]


@pytest.mark.slow
def test_full_preset_gives_about_1500_features_per_region(regions):
    """Run once, on the patient with the smallest tumour (the slow part of this file)."""
    ct, tumour, ring = min(regions.values(), key=lambda r: sitk.GetArrayViewFromImage(r[1]).sum())
    extractor = extractor_for(params_file("default"))
    for region, mask in (("tumour", tumour), ("ring", ring)):
        features = regions_features(extractor, ct, {region: mask})
        image_types, _ = counts(features, region)
        assert len(features) == 1488 + (14 if region == "tumour" else 0)  # 16 x 93 (+ shape)
        wavelets = [t for t in image_types if t.startswith("wavelet-")]
        logs = [t for t in image_types if t.startswith("log-sigma-")]
        assert len(wavelets) == 8 and len(logs) == 5
        assert image_types["square"] == image_types["squareroot"] == 93
        assert np.isfinite([v for k, v in features.items() if "_shape_" in k]).all()
        assert any("_shape_" in k for k in features) == (region == "tumour")


def test_a_custom_parameter_file_from_the_site_config(regions, tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "mine.yaml").write_text(
        "imageType: {Original: {}}\nfeatureClass: {firstorder: [Mean, Median]}\n"
        "setting: {binWidth: 10, label: 1}\n"
    )
    (tmp_path / "site.toml").write_text(
        'site_id = "hospital_z"\n[data]\nroot = "."\nmanifest = "m.csv"\n'
        '[radiomics]\nparams = "params/mine.yaml"\n'
    )
    path = params_file(load_site_config(tmp_path / "site.toml").radiomics.params)
    assert path == tmp_path / "params" / "mine.yaml"
    ct, tumour, _ = next(iter(regions.values()))
    features = regions_features(extractor_for(path), ct, {"tumour": tumour})
    mean = float(sitk.GetArrayViewFromImage(ct)[sitk.GetArrayViewFromImage(tumour) == 1].mean())
    assert list(features) == [
        "tumour_original_firstorder_Mean",
        "tumour_original_firstorder_Median",
    ]
    assert features["tumour_original_firstorder_Mean"] == pytest.approx(mean, rel=1e-6)


def test_workers_run_itk_on_one_thread():
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        use_one_thread()
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
