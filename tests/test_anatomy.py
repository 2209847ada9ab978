"""Tests for the synthetic neck-CT renderer (simulation/anatomy.py) and the OAR label convention."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from fedmets.shared.organs import ORGAN_LABELS, ORGAN_NAMES
from fedmets.simulation.anatomy import (
    SUBSITES,
    RenderedPatient,
    RenderSpec,
    render_patient,
    render_patient_with_aux,
)

FOV = (150.0, 130.0, 100.0)
DEMO = (1.0, 1.0, 2.5)
TINY = (3.0, 3.0, 4.0)


def make_spec(**kw) -> RenderSpec:
    base = dict(
        fov_mm=FOV,
        spacing_mm=DEMO,
        noise_hu=12.0,
        hu_offset=0.0,
        blur_mm=0.7,
        contrast=True,
        sex="M",
        body_scale=1.0,
        subsite="oropharynx",
        tumour_volume_cc=20.0,
        necrosis=0.3,
        heterogeneity=0.5,
        irregularity=0.5,
        infiltration=0.3,
    )
    base.update(kw)
    return RenderSpec(**base)


@lru_cache(maxsize=64)
def _render_cached(spec: RenderSpec, seed: int):
    return render_patient_with_aux(spec, np.random.default_rng(seed))


def render(seed: int = 0, **kw):
    """(RenderedPatient, aux) for make_spec(**kw) and a fresh generator seeded with ``seed``."""
    return _render_cached(make_spec(**kw), seed)


def moment_ellipsoid_iou(mask: np.ndarray, spacing_xyz) -> float:
    """IoU of a mask with the ellipsoid having the same centroid and second moments."""
    sp = np.asarray(spacing_xyz[::-1], float)  # (z, y, x)
    pts = np.argwhere(mask) * sp
    c = pts.mean(0)
    w, v = np.linalg.eigh(np.cov((pts - c).T))
    semi = np.sqrt(5.0 * w)
    grids = np.meshgrid(
        *(np.arange(n) * s for n, s in zip(mask.shape, sp, strict=True)), indexing="ij"
    )
    q = (np.stack(grids, -1) - c) @ v / semi
    ell = (q**2).sum(-1) <= 1.0
    return float((ell & mask).sum() / (ell | mask).sum())


# ---- structure of the output ------------------------------------------------------------------


def test_organ_label_convention():
    assert ORGAN_LABELS == {
        "spinal_cord": 1,
        "mandible": 2,
        "parotid_left": 3,
        "parotid_right": 4,
        "submandibular_left": 5,
        "submandibular_right": 6,
        "larynx": 7,
        "esophagus": 8,
    }
    assert all(ORGAN_NAMES[v] == k for k, v in ORGAN_LABELS.items())


def test_shapes_dtypes_and_measurements_demo():
    p, _ = render(0)
    assert isinstance(p, RenderedPatient)
    shape = (40, 130, 150)  # (nz, ny, nx) for 150 x 130 x 100 mm at 1 x 1 x 2.5 mm
    assert p.ct_hu.shape == shape and p.ct_hu.dtype == np.int16
    for m in (p.tumour_mask, p.organ_mask, p.body_mask):
        assert m.shape == shape and m.dtype == np.uint8
    assert set(np.unique(p.tumour_mask)) <= {0, 1}
    assert set(np.unique(p.body_mask)) <= {0, 1}
    assert set(np.unique(p.organ_mask)) <= {0, *ORGAN_LABELS.values()}
    assert p.spacing_mm == DEMO
    # x, y centred on the FOV; voxel (0,0,0) half a voxel inside the corner
    assert p.origin_mm[0] == pytest.approx(-(150 - 1.0) / 2)
    assert p.origin_mm[1] == pytest.approx(-(130 - 1.0) / 2)
    assert p.origin_mm[2] == pytest.approx(1.25)
    n = int(p.tumour_mask.sum())
    assert p.tumour_volume_cc == pytest.approx(n * 2.5 / 1000.0)
    assert p.tumour_mean_hu == pytest.approx(p.ct_hu[p.tumour_mask == 1].mean())
    assert p.ct_hu.min() >= -1024 and p.ct_hu.max() <= 3071


def test_tiny_geometry_and_public_wrapper():
    spec = make_spec(spacing_mm=TINY)
    p = render_patient(spec, np.random.default_rng(3))
    assert p.ct_hu.shape == (25, 43, 50)
    assert p.tumour_mask.sum() > 0
    assert p.tumour_volume_cc == pytest.approx(20.0, rel=0.3)
    # render_patient is render_patient_with_aux minus the aux dict
    q, _ = render_patient_with_aux(spec, np.random.default_rng(3))
    np.testing.assert_array_equal(p.ct_hu, q.ct_hu)


def test_deterministic_given_rng_and_seed_dependent():
    spec = make_spec(infiltration=0.7, necrosis=0.5)
    a = render_patient(spec, np.random.default_rng(11))
    b = render_patient(spec, np.random.default_rng(11))
    c = render_patient(spec, np.random.default_rng(12))
    for f in ("ct_hu", "tumour_mask", "organ_mask", "body_mask"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.tumour_volume_cc == b.tumour_volume_cc
    assert a.tumour_mean_hu == b.tumour_mean_hu
    assert not np.array_equal(a.ct_hu, c.ct_hu)
    assert not np.array_equal(a.tumour_mask, c.tumour_mask)
    assert not np.array_equal(a.body_mask, c.body_mask)  # the anatomy itself varies


def test_spec_validation():
    with pytest.raises(ValueError):
        make_spec(subsite="tongue")
    with pytest.raises(ValueError):
        make_spec(sex="X")
    with pytest.raises(ValueError):
        make_spec(necrosis=1.5)
    with pytest.raises(ValueError):
        make_spec(tumour_volume_cc=0.0)


# ---- anatomy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,kw", [(0, {}), (1, {"sex": "F", "body_scale": 0.9})])
def test_organs_present_plausible_and_inside_body(seed, kw):
    p, _ = render(seed, **kw)
    body = p.body_mask.astype(bool)
    vox_cc = np.prod(p.spacing_mm) / 1000.0
    x = p.origin_mm[0] + np.arange(p.ct_hu.shape[2]) * p.spacing_mm[0]
    assert not (p.organ_mask.astype(bool) & ~body).any()
    for name, lab in ORGAN_LABELS.items():
        m = p.organ_mask == lab
        vol = m.sum() * vox_cc
        assert vol > 1.0, f"{name} missing or tiny ({vol:.2f} cc)"
        assert vol < 60.0, f"{name} implausibly large ({vol:.1f} cc)"
        xc = x[np.nonzero(m)[2]].mean()
        if name.endswith("_left"):  # LPS: +x is the patient's left
            assert xc > 15
        elif name.endswith("_right"):
            assert xc < -15
        else:
            assert abs(xc) < 10, f"{name} should be near the midline"
    # HU sanity of the anatomy: cord is soft tissue, mandible bone
    assert 0 < np.median(p.ct_hu[p.organ_mask == ORGAN_LABELS["spinal_cord"]]) < 70
    assert np.median(p.ct_hu[p.organ_mask == ORGAN_LABELS["mandible"]]) > 300
    # the body sits inside the FOV with air around it
    assert 500 < body.sum() * vox_cc < 1600
    assert not body[:, 0, :].any() and not body[:, -1, :].any()
    assert not body[:, :, 0].any() and not body[:, :, -1].any()


def test_air_outside_body_and_fat_layer():
    p, aux = render(0)
    body = p.body_mask.astype(bool)
    far = ~ndimage.binary_dilation(body, iterations=4)
    air = p.ct_hu[far].astype(float)
    assert -1010 < air.mean() < -990
    assert 6 < air.std() < 20  # noise_hu = 12, lightly correlated, clipped at -1024
    # a subcutaneous fat layer (~ -100 HU) lies just under the skin
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, 1)  # in-plane erosion only
    band = ndimage.binary_erosion(body, st, iterations=3) & ~ndimage.binary_erosion(
        body, st, iterations=6
    )
    assert np.median(p.ct_hu[band]) < -40
    # vertebral bone is dense
    assert np.median(p.ct_hu[aux["vertebra"]]) > 250


def test_contrast_raises_vessel_hu():
    plain, aux_p = render(4, contrast=False)
    ce, aux_c = render(4, contrast=True)
    np.testing.assert_array_equal(aux_p["vessels"], aux_c["vessels"])  # same anatomy
    v = aux_c["vessels"]
    assert v.sum() * np.prod(ce.spacing_mm) / 1000 > 5.0
    core = ndimage.binary_erosion(v)  # avoid partial-volume edges
    assert 20 < plain.ct_hu[core].mean() < 70
    assert ce.ct_hu[core].mean() > 150
    assert ce.ct_hu[core].mean() - plain.ct_hu[core].mean() > 100


# ---- tumour -----------------------------------------------------------------------------------


@pytest.mark.parametrize("subsite", SUBSITES)
def test_tumour_inside_body_clear_of_spine(subsite):
    p, aux = render(5, subsite=subsite, tumour_volume_cc=45.0)
    m = p.tumour_mask.astype(bool)
    assert m.sum() > 0
    assert not (m & ~p.body_mask.astype(bool)).any()
    assert not (m & aux["vertebra"]).any()
    assert not (m & (p.organ_mask == ORGAN_LABELS["spinal_cord"])).any()
    # one connected GTV without in-plane holes (as a clinical contour)
    assert ndimage.label(m)[1] == 1
    for k in np.nonzero(m.any((1, 2)))[0]:
        np.testing.assert_array_equal(ndimage.binary_fill_holes(m[k]), m[k])
    # does not touch the FOV boundary
    assert not m[0].any() and not m[-1].any()
    assert not m[:, 0].any() and not m[:, -1].any()
    assert not m[:, :, 0].any() and not m[:, :, -1].any()


def test_tumour_position_follows_subsite():
    z = {}
    y = {}
    for s in SUBSITES:
        p, aux = render(6, subsite=s, tumour_volume_cc=8.0)
        z[s] = aux["tumour_centre_mm"][2]
        y[s] = aux["tumour_centre_mm"][1]
    assert z["nasopharynx"] > z["oropharynx"] > z["hypopharynx"]
    assert z["oral_cavity"] > z["larynx"]
    assert y["oral_cavity"] < y["nasopharynx"]  # oral cavity anterior (LPS: -y anterior)


@pytest.mark.parametrize(
    "subsite,volume", [("larynx", 5.0), ("oropharynx", 20.0), ("oral_cavity", 60.0)]
)
def test_measured_volume_close_to_target(subsite, volume):
    p, _ = render(7, subsite=subsite, tumour_volume_cc=volume)
    assert p.tumour_volume_cc == pytest.approx(volume, rel=0.15)


def test_large_tumour_volume_still_matched():
    p, aux = render(8, subsite="hypopharynx", tumour_volume_cc=120.0)
    assert p.tumour_volume_cc == pytest.approx(120.0, rel=0.15)
    assert not (p.tumour_mask.astype(bool) & aux["vertebra"]).any()


def test_tumour_is_not_an_ellipsoid():
    ious = {0.0: [], 1.0: []}
    for seed in (9, 10):
        for irr in ious:
            p, _ = render(seed, subsite="larynx", tumour_volume_cc=30.0, irregularity=irr)
            ious[irr].append(moment_ellipsoid_iou(p.tumour_mask.astype(bool), p.spacing_mm))
    # reference: a true ellipsoid of similar size on the same grid scores close to 1
    zz, yy, xx = np.meshgrid(
        np.arange(40) * 2.5, np.arange(130) * 1.0, np.arange(150) * 1.0, indexing="ij"
    )
    ell = ((xx - 75) / 22) ** 2 + ((yy - 65) / 17) ** 2 + ((zz - 50) / 19) ** 2 <= 1
    ref = moment_ellipsoid_iou(ell, DEMO)
    assert ref > 0.95
    assert max(ious[0.0]) < ref  # even smooth tumours are lobulated blobs
    assert max(ious[1.0]) < ref - 0.1  # irregular ones clearly deviate
    assert np.mean(ious[1.0]) < np.mean(ious[0.0]) - 0.05


def test_necrosis_lowers_core_hu():
    kw = dict(subsite="oropharynx", tumour_volume_cc=30.0, noise_hu=8.0, heterogeneity=0.2)
    solid, _ = render(12, necrosis=0.0, **kw)
    necrotic, _ = render(12, necrosis=0.9, **kw)
    np.testing.assert_array_equal(solid.tumour_mask, necrotic.tumour_mask)
    m = solid.tumour_mask.astype(bool)
    depth = ndimage.distance_transform_edt(m, sampling=solid.spacing_mm[::-1])
    core = depth >= 0.6 * depth.max()
    assert core.sum() > 20
    assert necrotic.ct_hu[core].mean() < solid.ct_hu[core].mean() - 12
    assert 0 < necrotic.ct_hu[core].mean() < 35
    assert necrotic.tumour_mean_hu < solid.tumour_mean_hu


def test_infiltration_raises_peritumoral_ring_only():
    kw = dict(subsite="larynx", tumour_volume_cc=20.0)
    clean, _ = render(13, infiltration=0.0, **kw)
    infil, _ = render(13, infiltration=1.0, **kw)
    np.testing.assert_array_equal(clean.tumour_mask, infil.tumour_mask)  # spicules excluded
    m = clean.tumour_mask.astype(bool)
    dist = ndimage.distance_transform_edt(~m, sampling=clean.spacing_mm[::-1])
    ring = (dist >= 2.0) & (dist <= 6.0)
    gain = infil.ct_hu[ring].mean() - clean.ct_hu[ring].mean()
    assert gain > 4.0
    far = dist > 20.0
    np.testing.assert_array_equal(clean.ct_hu[far], infil.ct_hu[far])
    # GTV interior itself is unchanged
    assert abs(infil.tumour_mean_hu - clean.tumour_mean_hu) < 3.0


def test_tumour_mean_hu_plausible_across_random_specs():
    rng = np.random.default_rng(2024)
    means = []
    for i in range(8):
        spec = make_spec(
            noise_hu=float(rng.uniform(8, 25)),
            hu_offset=float(rng.uniform(-15, 15)),
            blur_mm=float(rng.uniform(0.4, 1.0)),
            contrast=bool(rng.random() < 0.6),
            sex=str(rng.choice(["M", "F"])),
            body_scale=float(rng.uniform(0.9, 1.15)),
            subsite=SUBSITES[i % len(SUBSITES)],
            tumour_volume_cc=float(np.clip(np.exp(rng.normal(np.log(20), 0.6)), 5, 150)),
            necrosis=float(rng.uniform(0, 0.7)),
            heterogeneity=float(rng.uniform()),
            irregularity=float(rng.uniform()),
            infiltration=float(rng.uniform()),
        )
        p = render_patient(spec, np.random.default_rng(100 + i))
        assert 15.0 < p.tumour_mean_hu < 80.0, (spec, p.tumour_mean_hu)
        assert p.tumour_volume_cc == pytest.approx(spec.tumour_volume_cc, rel=0.15)
        means.append(p.tumour_mean_hu)
    assert 25.0 < np.mean(means) < 65.0


def test_hu_offset_shifts_soft_tissue():
    lo, _ = render(14, hu_offset=-10.0)
    hi, _ = render(14, hu_offset=10.0)
    body = ndimage.binary_erosion(lo.body_mask.astype(bool), iterations=3)
    diff = hi.ct_hu[body].astype(float) - lo.ct_hu[body]
    assert np.median(diff) == pytest.approx(20.0, abs=1.0)


def test_spec_is_frozen():
    spec = make_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.noise_hu = 3.0  # type: ignore[misc]
