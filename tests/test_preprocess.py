"""Preprocessing (orientation, resampling, HU window, crops) and the peritumoral ring, on real
synthetic CT volumes read through fedmets.client.ingest."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from fedmets.client.ingest import load_patient_images, read_manifest
from fedmets.client.peritumoral import peritumoral_ring
from fedmets.client.preprocess import ImageContentError, body_mask, prepare_patient, save_crop
from fedmets.shared.config import PreprocessSection, load_site_config

MARGIN_MM = 5.0


@pytest.fixture(scope="module")
def patients(tiny_cohort):
    """The first three patients of site hospital_a of a tiny cohort: (record, images) pairs."""
    cfg = load_site_config(tiny_cohort / "hospital_a" / "site.toml")
    records, problems = read_manifest(cfg)
    assert problems == []
    return [(record, load_patient_images(record, cfg)) for record in records[:3]]


@pytest.fixture(scope="module")
def prepared(patients):
    _, images = patients[0]
    return prepare_patient(images.ct, images.tumour, PreprocessSection(), MARGIN_MM)


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def volume_mm3(mask: sitk.Image) -> float:
    return float(array(mask).astype(bool).sum() * np.prod(mask.GetSpacing()))


def test_grid_is_lps_at_the_configured_spacing_with_ct_in_the_window(patients, prepared):
    _, images = patients[0]
    for image in (prepared.ct, prepared.tumour, prepared.body):
        assert image.GetSpacing() == (1.0, 1.0, 1.0)
        assert image.GetDirection() == tuple(np.eye(3).ravel())
        assert image.GetSize() == prepared.ct.GetSize()
    ct = array(prepared.ct)
    assert ct.dtype == np.float32 and ct.min() >= -1000 and ct.max() <= 1000
    assert ct.min() == -1000  # air outside the body is clipped to the window
    # 3x3x4 mm voxels -> 1 mm: with no sample halfway between two scan voxels, nearest-neighbour
    # resampling turns every tumour voxel into exactly 3 x 3 x 4 voxels
    assert volume_mm3(prepared.tumour) == volume_mm3(images.tumour)
    assert set(np.unique(array(prepared.tumour))) == {0, 1}


def test_radiomics_box_holds_the_tumour_ring_and_context(prepared):
    settings = PreprocessSection()
    box = prepared.radiomics_box
    inside = np.zeros(array(prepared.tumour).shape, bool)
    (x, y, z), (nx, ny, nz) = box.start, box.size
    inside[z : z + nz, y : y + ny, x : x + nx] = True
    tumour = array(prepared.tumour).astype(bool)
    assert tumour.sum() == (tumour & inside).sum()
    # the tumour's bounding box sits at least margin + crop_margin_mm from every side of the box
    zz, yy, xx = np.nonzero(box.array(prepared.tumour))
    context = MARGIN_MM + settings.crop_margin_mm
    for low, high, n in (
        (xx.min(), xx.max(), nx),
        (yy.min(), yy.max(), ny),
        (zz.min(), zz.max(), nz),
    ):
        assert low >= context - 1 and n - 1 - high >= context - 1


def test_same_result_whatever_the_input_orientation(patients, prepared):
    _, images = patients[0]
    for orientation in ("RAS", "AIL"):
        ct, tumour = (sitk.DICOMOrient(i, orientation) for i in (images.ct, images.tumour))
        assert ct.GetDirection() != images.ct.GetDirection()
        again = prepare_patient(ct, tumour, PreprocessSection(), MARGIN_MM)
        assert again.ct.GetOrigin() == pytest.approx(prepared.ct.GetOrigin())
        assert again.radiomics_box == prepared.radiomics_box
        np.testing.assert_array_equal(array(again.tumour), array(prepared.tumour))
        np.testing.assert_allclose(array(again.ct), array(prepared.ct), atol=1e-2)


def test_a_voxel_does_not_depend_on_how_far_the_crop_reaches(patients, prepared):
    _, images = patients[0]
    wider = prepare_patient(
        images.ct, images.tumour, PreprocessSection(crop_margin_mm=25.0), MARGIN_MM
    )
    offset = wider.ct.TransformPhysicalPointToIndex(prepared.ct.GetOrigin())
    assert wider.ct.TransformIndexToPhysicalPoint(offset) == pytest.approx(prepared.ct.GetOrigin())
    x, y, z = offset
    nx, ny, nz = prepared.ct.GetSize()
    for name in ("tumour", "body", "ct"):
        inner = array(getattr(wider, name))[z : z + nz, y : y + ny, x : x + nx]
        np.testing.assert_allclose(inner, array(getattr(prepared, name)), rtol=0, atol=1e-3)


def test_configured_spacing_window_and_interpolator_are_applied(patients):
    _, images = patients[1]
    settings = PreprocessSection(
        spacing_mm=[2.0, 1.5, 3.0], hu_window=[-150.0, 250.0], ct_interpolator="linear"
    )
    prepared = prepare_patient(images.ct, images.tumour, settings, MARGIN_MM)
    assert prepared.ct.GetSpacing() == (2.0, 1.5, 3.0)
    ct = array(prepared.ct)
    assert ct.min() == -150 and ct.max() == 250
    # linear interpolation never leaves the range of the input values (B-spline may overshoot)
    low, high = array(images.ct).min(), array(images.ct).max()
    unclipped = prepare_patient(
        images.ct, images.tumour, settings.model_copy(update={"hu_window": [-2000, 5000]}), 5
    )
    assert array(unclipped.ct).min() >= min(low, -1024) and array(unclipped.ct).max() <= high


def test_deep_crop_is_fixed_size_centred_and_saved_with_its_ring(patients, prepared, tmp_path):
    settings = PreprocessSection()
    ring = peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, MARGIN_MM)
    path = tmp_path / "crop.npz"
    save_crop(path, prepared, ring)
    assert [p.name for p in tmp_path.iterdir()] == ["crop.npz"]  # no temporary file left
    crop = np.load(path)
    shape = tuple(reversed(settings.crop_voxels))
    assert crop["ct"].shape == crop["tumour"].shape == crop["ring"].shape == shape
    assert (crop["ct"].dtype, crop["tumour"].dtype, crop["ring"].dtype) == (
        np.int16,
        np.uint8,
        np.uint8,
    )
    np.testing.assert_array_equal(crop["spacing_mm"], settings.spacing_mm)
    start = prepared.deep_box.start
    assert tuple(crop["origin_mm"]) == prepared.ct.TransformIndexToPhysicalPoint(start)
    np.testing.assert_array_equal(crop["tumour"], prepared.deep_box.array(prepared.tumour))
    np.testing.assert_array_equal(crop["ring"], prepared.deep_box.array(ring))
    np.testing.assert_array_equal(crop["ct"], np.rint(prepared.deep_box.array(prepared.ct)))


@pytest.mark.parametrize("side", [16, 128])
def test_deep_crop_is_centred_on_the_tumour_and_cuts_a_larger_one(patients, side):
    _, images = patients[0]
    settings = PreprocessSection(crop_voxels=[side, side, side])
    prepared = prepare_patient(images.ct, images.tumour, settings, MARGIN_MM)
    crop = prepared.deep_box.array(prepared.tumour)
    assert crop.shape == (side, side, side)
    tumour = array(prepared.tumour)
    # the crop's centre is within half a voxel of the centre of the tumour's bounding box
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        extent = np.flatnonzero(tumour.any(axis=other))
        first = prepared.deep_box.start[2 - axis]
        assert abs((extent.min() + extent.max()) / 2 - (first + (side - 1) / 2)) <= 0.5
    if side == 16:  # smaller than this tumour: cut at the crop's faces
        assert crop.sum() < tumour.sum() and crop[:, :, [0, -1]].any()
    else:
        assert crop.sum() == tumour.sum()


def test_body_is_the_patient_with_airways_filled(patients):
    _, images = patients[0]
    ct = sitk.DICOMOrient(images.ct, "LPS")
    body = array(body_mask(ct)).astype(bool)
    hu = array(ct)
    assert body[hu > -500].mean() > 0.99  # nearly all tissue (a stray blob may be left out)
    assert not body[0, 0, 0] and not body[-1, -1, -1]  # the corners are outside air
    assert (body & (hu < -500)).any()  # air inside the outline (airway) belongs to the body
    assert (array(images.tumour).astype(bool) <= body).all()


def test_empty_tumour_is_a_clear_error(patients):
    _, images = patients[0]
    empty = sitk.Image(images.tumour.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(images.tumour)
    with pytest.raises(ImageContentError, match="tumour mask is empty") as error:
        prepare_patient(images.ct, empty, PreprocessSection(), MARGIN_MM)
    assert error.value.image == "tumour"


# ---- peritumoral ring ---------------------------------------------------------------------------


def test_ring_is_outside_the_tumour_inside_the_body_and_soft_tissue(patients):
    settings = PreprocessSection()
    for _, images in patients:
        prepared = prepare_patient(images.ct, images.tumour, settings, MARGIN_MM)
        ring = array(peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, MARGIN_MM))
        tumour, body = array(prepared.tumour), array(prepared.body)
        hu = array(prepared.ct)[ring == 1]
        assert ring.sum() > 0.3 * tumour.sum()
        assert not (ring & tumour).any()
        assert (ring <= body).all()
        assert hu.min() >= settings.air_threshold_hu and hu.max() <= settings.bone_threshold_hu


def test_ring_thickness_is_in_mm_whatever_the_voxel_size(patients):
    """With 1 x 1 x 3 mm voxels and a 6 mm margin the ring reaches 6 mm beyond the tumour along x
    (6 voxels) and along z (2 voxels), not 6 voxels = 18 mm along z."""
    _, images = patients[2]
    margin = 6.0
    settings = PreprocessSection(spacing_mm=[1.0, 1.0, 3.0])
    prepared = prepare_patient(images.ct, images.tumour, settings, margin)
    no_hu_limits = dict(air_threshold_hu=-1000.0, bone_threshold_hu=3000.0)
    ring = array(
        peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, margin, **no_hu_limits)
    )
    tumour = array(prepared.tumour)
    spacing_zyx = np.array(prepared.ct.GetSpacing())[::-1]
    for axis, spacing in enumerate(spacing_zyx):
        other = tuple(a for a in range(3) if a != axis)
        t = np.flatnonzero(tumour.any(axis=other))
        r = np.flatnonzero((ring | tumour).any(axis=other))
        reach_mm = max(t.min() - r.min(), r.max() - t.max()) * spacing
        assert margin - spacing < reach_mm <= margin, (axis, reach_mm)
    # and it is the set of body voxels within the margin, by an independent distance transform
    distance = ndimage.distance_transform_edt(tumour == 0, sampling=spacing_zyx)
    expected = (distance > 0) & (distance <= margin) & (array(prepared.body) == 1)
    assert (ring.astype(bool) != expected).mean() < 1e-4


def test_margin_and_thresholds_change_the_ring(patients, prepared):
    ring5 = array(peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, 5.0))
    ring10 = array(peritumoral_ring(prepared.ct, prepared.tumour, prepared.body, 10.0))
    assert (ring5 <= ring10).all() and ring10.sum() > 1.5 * ring5.sum()
    narrow = array(
        peritumoral_ring(
            prepared.ct,
            prepared.tumour,
            prepared.body,
            5.0,
            air_threshold_hu=0.0,
            bone_threshold_hu=100.0,
        )
    )
    hu = array(prepared.ct)[narrow == 1]
    assert (narrow <= ring5).all() and hu.min() >= 0 and hu.max() <= 100


def test_ring_with_no_tissue_around_is_a_clear_error(prepared):
    air = sitk.Image(prepared.ct.GetSize(), sitk.sitkFloat32) - 1000.0
    air.CopyInformation(prepared.ct)
    with pytest.raises(ImageContentError, match="peritumoral ring is empty"):
        peritumoral_ring(air, prepared.tumour, prepared.body, MARGIN_MM)
