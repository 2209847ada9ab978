"""Synthetic neck CT renderer: anatomy, primary tumour, peritumoral infiltration, scanner effects.

:func:`render_patient` turns one patient's rendering parameters (:class:`RenderSpec`) and a random
generator into a CT volume in Hounsfield units with a GTVp mask and an organ-at-risk label map.

Geometry is built in physical millimetres and sampled on the voxel grid with partial-volume
occupancy (an approximate signed distance ramped over one voxel). Axes follow an LPS-like patient
frame: +x = patient left, +y = posterior, +z = superior. Arrays are (nz, ny, nx) (SimpleITK/numpy
order), so an axial slice shows anterior at the top and the patient's right on the image left.
The FOV covers the neck only: the inferior edge of the FOV is at the thyroid/upper trachea, the
superior edge at the nasopharynx; anatomical levels are placed relative to the FOV height.

The renderer is a pure function of its inputs: all randomness comes from the ``rng`` argument
(split into independent child streams per component, so e.g. changing ``infiltration`` leaves the
anatomy and the tumour shape identical for the same seed). numpy/scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fedmets.shared.organs import ORGAN_LABELS

__all__ = [
    "SUBSITES",
    "RenderSpec",
    "RenderedPatient",
    "render_patient",
    "render_patient_with_aux",
]

SUBSITES = ("oropharynx", "larynx", "hypopharynx", "nasopharynx", "oral_cavity")

HU_MIN, HU_MAX = -1024, 3071
_AIR = -1000.0
_F32 = np.float32


@dataclass(frozen=True)
class RenderSpec:
    """Rendering parameters of one patient scan.

    Axes are (x = left-right, y = anterior-posterior, z = inferior-superior); lengths in mm.
    ``noise_hu``: image-noise SD (HU); ``hu_offset``: calibration offset added everywhere (HU);
    ``blur_mm``: Gaussian PSF sigma; ``body_scale``: habitus multiplier (males are ~8% larger);
    ``tumour_volume_cc``: target GTVp volume. ``necrosis``, ``heterogeneity``, ``irregularity``
    and ``infiltration`` are in [0, 1] (0 = none).
    """

    fov_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    noise_hu: float
    hu_offset: float
    blur_mm: float
    contrast: bool
    sex: str
    body_scale: float
    subsite: str
    tumour_volume_cc: float
    necrosis: float
    heterogeneity: float
    irregularity: float
    infiltration: float

    def __post_init__(self) -> None:
        if len(self.fov_mm) != 3 or len(self.spacing_mm) != 3:
            raise ValueError("fov_mm and spacing_mm must have 3 entries (x, y, z)")
        if min(self.fov_mm) <= 0 or min(self.spacing_mm) <= 0:
            raise ValueError("fov_mm and spacing_mm must be positive")
        if self.subsite not in SUBSITES:
            raise ValueError(f"subsite must be one of {SUBSITES}, got {self.subsite!r}")
        if self.sex not in ("M", "F"):
            raise ValueError(f"sex must be 'M' or 'F', got {self.sex!r}")
        if self.tumour_volume_cc <= 0 or self.body_scale <= 0:
            raise ValueError("tumour_volume_cc and body_scale must be positive")
        if self.noise_hu < 0 or self.blur_mm < 0:
            raise ValueError("noise_hu and blur_mm must be >= 0")
        for name in ("necrosis", "heterogeneity", "irregularity", "infiltration"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")


@dataclass(frozen=True)
class RenderedPatient:
    """One rendered scan. Arrays are (nz, ny, nx); positions and spacings are (x, y, z) in mm.

    ``ct_hu`` int16 HU in [-1024, 3071]; ``tumour_mask`` uint8 0/1 GTVp (spicules excluded);
    ``organ_mask`` uint8 labels from :data:`fedmets.shared.organs.ORGAN_LABELS` (anatomical OAR
    extents, not cut by the tumour); ``body_mask`` uint8 0/1; ``origin_mm`` is the centre of voxel
    (0, 0, 0); ``tumour_volume_cc`` = mask voxels x voxel volume; ``tumour_mean_hu`` = mean of
    ``ct_hu`` inside the mask.
    """

    ct_hu: np.ndarray
    tumour_mask: np.ndarray
    organ_mask: np.ndarray
    body_mask: np.ndarray
    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    tumour_volume_cc: float
    tumour_mean_hu: float


# ---- grid and primitives ---------------------------------------------------------------------


class _Grid:
    """Voxel grid: x, y centred on 0; z from 0 (inferior FOV edge) upwards. Coordinates in mm."""

    def __init__(self, fov: tuple[float, float, float], spacing: tuple[float, float, float]):
        self.sx, self.sy, self.sz = (float(s) for s in spacing)
        self.nx = max(int(round(fov[0] / self.sx)), 8)
        self.ny = max(int(round(fov[1] / self.sy)), 8)
        self.nz = max(int(round(fov[2] / self.sz)), 4)
        self.x = ((np.arange(self.nx) - (self.nx - 1) / 2) * self.sx).astype(_F32)
        self.y = ((np.arange(self.ny) - (self.ny - 1) / 2) * self.sy).astype(_F32)
        self.z = ((np.arange(self.nz) + 0.5) * self.sz).astype(_F32)
        self.h = math.sqrt(self.sx * self.sy)  # in-plane partial-volume ramp width
        self.zlen = self.nz * self.sz
        self.shape = (self.nz, self.ny, self.nx)

    def box(self, xlo, xhi, ylo, yhi, zlo, zhi):
        """Index slices and broadcastable coordinates (Z, Y, X) of the voxels in a mm box."""

        def rng1(lo, hi, c0, d, n):
            lo, hi = (float(np.clip(v, -1e6, 1e6)) for v in (lo, hi))
            i0 = max(int(math.floor((lo - c0) / d)), 0)
            i1 = min(int(math.ceil((hi - c0) / d)) + 1, n)
            return i0, i1

        i0, i1 = rng1(xlo, xhi, float(self.x[0]), self.sx, self.nx)
        j0, j1 = rng1(ylo, yhi, float(self.y[0]), self.sy, self.ny)
        k0, k1 = rng1(zlo, zhi, float(self.z[0]), self.sz, self.nz)
        if i1 <= i0 or j1 <= j0 or k1 <= k0:
            return None
        sl = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
        return (
            sl,
            self.x[i0:i1][None, None, :],
            self.y[j0:j1][None, :, None],
            self.z[k0:k1][:, None, None],
        )


def _ell_sd(dx, dy, a, b):
    """Approximate signed distance (mm) to the ellipse (dx/a)^2 + (dy/b)^2 = 1 (first order)."""
    u = dx / a
    v = dy / b
    k0 = np.sqrt(u * u + v * v)
    k1 = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    eps = _F32(1e-3)
    return (k0 - 1) * (k0 + eps) / (k1 + eps / np.minimum(a, b))


class _Offset:
    """Smooth per-patient displacement of the deep neck structures along z (tilt, lordosis)."""

    def __init__(self, zk, ox, oy):
        self.zk, self.ox, self.oy = (np.asarray(v, float) for v in (zk, ox, oy))
        self._last: tuple[object, tuple] | None = None

    def at(self, Z):
        # many shapes query the same Z array in a row; holding a reference keeps `is` safe
        if self._last is not None and self._last[0] is Z:
            return self._last[1]
        out = (
            np.interp(Z, self.zk, self.ox).astype(_F32),
            np.interp(Z, self.zk, self.oy).astype(_F32),
        )
        self._last = (Z, out)
        return out


class _Shape:
    """Base class: in-plane signed distance ``sd`` plus a z extent [z0, z1] with soft ends."""

    z0 = -np.inf
    z1 = np.inf
    off: _Offset | None = None
    rough = 0.0  # boundary roughness amplitude (mm), applied by the canvas

    def rough_(self, rough: float) -> _Shape:
        """Set the boundary roughness (mm) and return self."""
        self.rough = float(rough)
        return self

    def sd(self, X, Y, Z):  # pragma: no cover - interface
        raise NotImplementedError

    def sd3(self, X, Y, Z):
        """3-D signed distance including the z end caps."""
        s = self.sd(X, Y, Z)
        if np.isfinite(self.z0) or np.isfinite(self.z1):
            s = np.maximum(s, np.maximum(self.z0 - Z, Z - self.z1))
        return s

    def zocc(self, Z, dz):
        """Fraction of each slice's slab [Z - dz/2, Z + dz/2] inside [z0, z1]."""
        if not (np.isfinite(self.z0) or np.isfinite(self.z1)):
            return None
        lo = np.maximum(Z - dz / 2, self.z0)
        hi = np.minimum(Z + dz / 2, self.z1)
        return np.clip((hi - lo) / dz, 0, 1).astype(_F32)

    def _offs(self, Z):
        if self.off is None:
            return 0.0, 0.0
        return self.off.at(Z)

    def _offrange(self):
        if self.off is None:
            return 0.0, 0.0, 0.0, 0.0
        return self.off.ox.min(), self.off.ox.max(), self.off.oy.min(), self.off.oy.max()


class _Ell(_Shape):
    """Elliptic cylinder with centre, semi-axes and rotation interpolated along z (knots zk, mm).

    ``b2`` (optional) is the posterior (+y) semi-axis, giving an egg shape; ``ang`` in degrees
    rotates the ``a`` axis from +x towards +y.
    """

    def __init__(self, zk, cx, cy, a, b, *, b2=None, ang=None, z0=-np.inf, z1=np.inf, off=None):
        zk = np.atleast_1d(np.asarray(zk, float))
        n = zk.size

        def f(v):
            return np.broadcast_to(np.asarray(v, float), (n,)).astype(float)

        self.zk = zk
        self.cx, self.cy, self.a, self.b = f(cx), f(cy), f(a), f(b)
        self.b2 = None if b2 is None else f(b2)
        self.ang = None if ang is None else np.deg2rad(f(ang))
        self.z0, self.z1, self.off = float(z0), float(z1), off

    def _p(self, v, Z):
        if v.size == 1 or v[0] == v[-1] and np.all(v == v[0]):
            return _F32(v[0])
        return np.interp(Z, self.zk, v).astype(_F32)

    def sd(self, X, Y, Z):
        ox, oy = self._offs(Z)
        dx = X - (self._p(self.cx, Z) + ox)
        dy = Y - (self._p(self.cy, Z) + oy)
        if self.ang is not None:
            an = self._p(self.ang, Z)
            c, s = np.cos(an), np.sin(an)
            dx, dy = c * dx + s * dy, c * dy - s * dx
        a = self._p(self.a, Z)
        b = self._p(self.b, Z)
        if self.b2 is not None:
            b = np.where(dy > 0, self._p(self.b2, Z), b)
        return _ell_sd(dx, dy, a, b)

    def bbox(self, pad):
        r = max(self.a.max(), self.b.max(), 0 if self.b2 is None else self.b2.max()) + pad
        oxl, oxh, oyl, oyh = self._offrange()
        return (
            self.cx.min() - r + oxl,
            self.cx.max() + r + oxh,
            self.cy.min() - r + oyl,
            self.cy.max() + r + oyh,
            self.z0 - pad,
            self.z1 + pad,
        )


class _Band(_Shape):
    """U-shaped (or closed, ``ycut=inf``) elliptic band of thickness ``th``: mandible, cartilage."""

    def __init__(self, cx, cy, a, b, th, ycut, *, z0=-np.inf, z1=np.inf, off=None):
        self.cx, self.cy, self.a, self.b, self.th, self.ycut = (
            float(v) for v in (cx, cy, a, b, th, ycut)
        )
        self.z0, self.z1, self.off = float(z0), float(z1), off

    def sd(self, X, Y, Z):
        ox, oy = self._offs(Z)
        dx = X - (self.cx + ox)
        dy = Y - (self.cy + oy)
        s = np.maximum(
            _ell_sd(dx, dy, _F32(self.a), _F32(self.b)),
            -_ell_sd(dx, dy, _F32(self.a - self.th), _F32(self.b - self.th)),
        )
        if np.isfinite(self.ycut):
            s = np.maximum(s, dy - _F32(self.ycut))
        return s

    def bbox(self, pad):
        r = max(self.a, self.b) + pad
        oxl, oxh, oyl, oyh = self._offrange()
        return (
            self.cx - r + oxl,
            self.cx + r + oxh,
            self.cy - r + oyl,
            min(self.cy + r, self.cy + self.ycut + pad) + oyh,
            self.z0 - pad,
            self.z1 + pad,
        )


class _Cap(_Shape):
    """In-plane capsule (segment p0-p1 with radius r), constant along z within [z0, z1]."""

    def __init__(self, p0, p1, r, *, z0=-np.inf, z1=np.inf, off=None):
        self.p0 = (float(p0[0]), float(p0[1]))
        self.p1 = (float(p1[0]), float(p1[1]))
        self.r = float(r)
        self.z0, self.z1, self.off = float(z0), float(z1), off

    def sd(self, X, Y, Z):
        ox, oy = self._offs(Z)
        dx = X - (self.p0[0] + ox)
        dy = Y - (self.p0[1] + oy)
        vx, vy = self.p1[0] - self.p0[0], self.p1[1] - self.p0[1]
        l2 = max(vx * vx + vy * vy, 1e-9)
        t = np.clip((dx * vx + dy * vy) * (1.0 / l2), 0, 1)
        ex = dx - t * vx
        ey = dy - t * vy
        return np.sqrt(ex * ex + ey * ey) - _F32(self.r)

    def bbox(self, pad):
        oxl, oxh, oyl, oyh = self._offrange()
        r = self.r + pad
        return (
            min(self.p0[0], self.p1[0]) - r + oxl,
            max(self.p0[0], self.p1[0]) + r + oxh,
            min(self.p0[1], self.p1[1]) - r + oyl,
            max(self.p0[1], self.p1[1]) + r + oyh,
            self.z0 - pad,
            self.z1 + pad,
        )


class _Ellipsoid(_Shape):
    """Axis-aligned 3-D ellipsoid (lymph nodes); ``zocc`` is folded into the 3-D distance."""

    def __init__(self, c, semi):
        self.c = tuple(float(v) for v in c)
        self.s = tuple(float(v) for v in semi)

    def sd(self, X, Y, Z):
        u = (X - self.c[0]) / self.s[0]
        v = (Y - self.c[1]) / self.s[1]
        w = (Z - self.c[2]) / self.s[2]
        k0 = np.sqrt(u * u + v * v + w * w)
        k1 = np.sqrt((u / self.s[0]) ** 2 + (v / self.s[1]) ** 2 + (w / self.s[2]) ** 2)
        eps = 1e-3
        return (k0 - 1) * (k0 + eps) / (k1 + eps / min(self.s))

    def zocc(self, Z, dz):
        return None

    def bbox(self, pad):
        c, s = self.c, self.s
        return (
            c[0] - s[0] - pad,
            c[0] + s[0] + pad,
            c[1] - s[1] - pad,
            c[1] + s[1] + pad,
            c[2] - s[2] - pad,
            c[2] + s[2] + pad,
        )


class _Shell(_Shape):
    """Thin elliptic shell (fat plane) of width ``w`` mm, kept where dy > ``ycut`` (posterior)."""

    def __init__(self, ell: _Ell, w: float, ycut: float = -np.inf):
        self.e, self.w, self.ycut = ell, float(w), float(ycut)
        self.z0, self.z1, self.off = ell.z0, ell.z1, ell.off

    def sd(self, X, Y, Z):
        s = np.abs(self.e.sd(X, Y, Z)) - _F32(self.w / 2)
        if np.isfinite(self.ycut):
            _, oy = self._offs(Z)
            s = np.maximum(s, _F32(self.ycut + self.e.cy[0]) + oy - Y)
        return s

    def bbox(self, pad):
        return self.e.bbox(pad + self.w)


class _Body(_Ell):
    """Neck outline: egg-shaped ellipse plus low-order angular harmonics (mm) varying along z."""

    def __init__(self, zk, a, b, b2, harm_lo, harm_hi, phases, z_lo, z_hi):
        super().__init__(zk, 0.0, 0.0, a, b, b2=b2)
        self.h_lo = np.asarray(harm_lo, float)
        self.h_hi = np.asarray(harm_hi, float)
        self.ph = np.asarray(phases, float)
        self.z_lo, self.z_hi = float(z_lo), float(z_hi)

    def sd(self, X, Y, Z):
        s = super().sd(X, Y, Z)
        th = np.arctan2(Y, X)
        w = np.clip((Z - self.z_lo) / (self.z_hi - self.z_lo), 0, 1)
        for k, (lo, hi, ph) in enumerate(zip(self.h_lo, self.h_hi, self.ph, strict=True)):
            amp = _F32(lo) + _F32(hi - lo) * w
            s = s - amp * np.cos(_F32(k + 2) * th + _F32(ph))
        return s

    def bbox(self, pad):
        lo = super().bbox(pad)
        m = float(np.abs(self.h_lo).sum() + np.abs(self.h_hi).sum())
        return (lo[0] - m, lo[1] + m, lo[2] - m, lo[3] + m, lo[4], lo[5])


def _smooth_field(rng: np.random.Generator, zc, yc, xc, corr_mm: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field on the grid of 1-D coordinates (z, y, x) in mm.

    Sum of Gaussian bumps (width ``corr_mm``) on a node lattice of the same spacing, evaluated as
    three small matrix products. Returns float32 (len(zc), len(yc), len(xc)).
    """
    mats = []
    for c in (np.asarray(zc, float).ravel(), np.asarray(yc, float).ravel(), np.asarray(xc, float)):
        c = c.ravel()
        lo, hi = c.min() - 2 * corr_mm, c.max() + 2 * corr_mm
        k = max(int(math.ceil((hi - lo) / corr_mm)) + 1, 2)
        nodes = np.linspace(lo, hi, k)
        w = np.exp(-0.5 * ((c[:, None] - nodes[None, :]) / corr_mm) ** 2)
        w /= np.sqrt((w * w).sum(axis=1, keepdims=True))
        mats.append(w.astype(_F32))
    wz, wy, wx = mats
    g = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1]), dtype=_F32)
    # plain einsum (no BLAS): steady timing, no thread oversubscription in worker pools
    g = np.einsum("abk,xk->abx", g, wx)  # (Kz, Ky, nx)
    g = np.einsum("yb,abx->ayx", wy, g)  # (Kz, ny, nx)
    return np.einsum("za,ayx->zyx", wz, g)


def _periodic_frac(Z, dz, period, phase, width, nsub=9):
    """Fraction of each slab [Z - dz/2, Z + dz/2] where ((z - phase) mod period) < width."""
    sub = (np.arange(nsub) + 0.5) / nsub - 0.5
    zz = np.asarray(Z, float).reshape(-1, 1) + dz * sub[None, :]
    inside = np.mod(zz - phase, period) < width
    return inside.mean(axis=1).astype(_F32).reshape(np.shape(Z))


# ---- canvas ----------------------------------------------------------------------------------


class _Canvas:
    """HU volume and label map being painted (painter's algorithm with soft occupancy)."""

    def __init__(self, grid: _Grid, rng: np.random.Generator):
        self.g = grid
        self.hu = np.full(grid.shape, _AIR, dtype=_F32)
        self.lab = np.zeros(grid.shape, dtype=np.uint8)
        self.within: dict[str, np.ndarray] = {}
        self.aux: dict[str, np.ndarray] = {}
        # two smooth unit fields shared by all boundaries (roughness, patchy fat planes)
        self.f1 = _smooth_field(rng, grid.z, grid.y, grid.x, 5.0)
        self.f2 = _smooth_field(rng, grid.z, grid.y, grid.x, 2.5)
        self._mix: dict[int, tuple[float, float]] = {}

    def field(self, shape, sl):
        """Per-shape mix of the shared fields on a box (same field for halo and shape)."""
        key = id(shape)
        if key not in self._mix:
            a = len(self._mix) * 2.399963
            self._mix[key] = (math.cos(a), math.sin(a))
        c, s = self._mix[key]
        return _F32(c) * self.f1[sl] + _F32(s) * self.f2[sl]

    def _sd(self, shape: _Shape, pad: float):
        """(slices, signed distance, per-slice z occupancy or None) on the shape's box."""
        g = self.g
        box = g.box(*shape.bbox(pad + 2 * g.h))
        if box is None:
            return None
        sl, X, Y, Z = box
        sd = shape.sd(X, Y, Z)
        if shape.rough:
            sd = sd + _F32(shape.rough) * self.field(shape, sl)
        return sl, sd, shape.zocc(Z, g.sz)

    def _finish(self, sl, sd, zo, dilate, within):
        occ = np.clip(0.5 - (sd - _F32(dilate)) * _F32(1.0 / self.g.h), 0, 1)
        if zo is not None:
            occ = occ * zo
        bshape = tuple(s.stop - s.start for s in sl)
        if occ.shape != bshape:
            occ = np.broadcast_to(occ, bshape)
        if within is not None:
            occ = occ * self.within[within][sl]
        return occ

    def occ(self, shape: _Shape, dilate: float = 0.0, within: str | None = None):
        """(slices, occupancy) of ``shape`` grown by ``dilate`` mm, or None if off-grid."""
        r = self._sd(shape, max(dilate, 0.0))
        if r is None:
            return None
        sl, sd, zo = r
        return sl, self._finish(sl, sd, zo, dilate, within)

    def fill(
        self, shape, value, *, label=0, dilate=0.0, within="skin", aux=None, weight=1.0, patchy=0.0
    ):
        """Blend ``value`` (HU scalar) into the volume with the shape's occupancy.

        ``weight`` scales the occupancy; ``patchy`` > 0 makes it vary smoothly (fat planes).
        """
        r = self.occ(shape, dilate, within)
        if r is None:
            return None
        sl, occ = r
        if weight != 1.0:
            occ = occ * _F32(weight)
        if patchy:
            occ = occ * np.clip(0.55 + _F32(patchy) * self.f2[sl], 0, 1)
        v = self.hu[sl]
        v += occ * (value - v)
        if label:
            self.lab[sl][occ >= 0.5] = label
        if aux is not None:
            self.aux[aux][sl] |= occ >= 0.5
        return sl, occ

    def bone(self, shape, cortex, marrow, thk, *, frac=None, label=0, aux=None, within="skin"):
        """Bone with a cortical shell of thickness ``thk`` mm; ``frac`` (per slice) scales it."""
        r = self._sd(shape, 0.0)
        if r is None:
            return
        sl, sd, zo = r
        outer = self._finish(sl, sd, zo, 0.0, within)
        inner = self._finish(sl, sd, zo, -thk, within)
        if frac is not None:
            f = frac[sl[0]].reshape(-1, 1, 1)
            outer = outer * f
            inner = inner * f
        v = self.hu[sl]
        v += outer * (cortex - v)
        v += inner * (marrow - v)
        if label:
            self.lab[sl][outer >= 0.5] = label
        if aux is not None:
            self.aux[aux][sl] |= outer >= 0.5


def _mirror(x, side):
    return [side * v for v in np.atleast_1d(x)]


# ---- neck anatomy ----------------------------------------------------------------------------


class _Neck:
    """Per-patient anatomy (shapes + tissue HU) sampled from ``rng`` and painted on a canvas."""

    def __init__(self, spec: RenderSpec, grid: _Grid, rng: np.random.Generator):
        self.spec, self.g = spec, grid
        sexf = 1.08 if spec.sex == "M" else 1.0
        self.sb = sb = sexf * spec.body_scale  # outline scale
        self.so = so = sexf * spec.body_scale**0.3  # skeleton / organ scale
        zl = grid.zlen
        dt = rng.uniform(-0.03, 0.03)  # patient positioning along z

        def zt(t):
            return (np.asarray(t, float) + dt) * zl

        self.zt = zt
        self.ct = spec.contrast
        u = rng.uniform

        # tissue HU (plain / contrast)
        self.fat = u(-115, -85)
        ct = 1.0 if self.ct else 0.0  # draws are unconditional: contrast keeps the anatomy

        def enh(plain, lo, hi):
            return plain + ct * u(lo, hi)

        self.muscle = enh(u(45, 60), 5, 12)
        self.skin = u(20, 40)
        self.parotid = enh(u(-15, 20), 10, 25)
        self.smg = enh(u(30, 45), 25, 45)
        self.thyroid = enh(u(80, 100), 50, 100)
        art, ven = (u(38, 48), u(180, 300)), (u(36, 46), u(140, 240))
        self.artery = art[1] if self.ct else art[0]
        self.vein = ven[1] if self.ct else ven[0]
        self.node = enh(u(28, 40), 15, 30)
        self.cart = u(100, 160)
        self.cart_oss = u(0.0, 1.0) * (1.2 if spec.sex == "M" else 0.7)
        self.v_cortex, self.v_marrow, self.disc = u(900, 1250), u(200, 320), u(70, 95)
        self.m_cortex, self.m_marrow = u(1400, 1800), u(300, 550)
        self.hyoid = u(500, 800)
        self.csf, self.cord = u(4, 14), u(30, 40)

        # smooth neck axis displacement
        tk = np.linspace(0, 1, 11)
        gx1, gx2 = rng.normal(0, 2.5), rng.normal(0, 1.2)
        lord, gy1 = u(0, 5), rng.normal(0, 3)
        self.off = off = _Offset(
            zt(tk),
            gx1 * (tk - 0.5) + gx2 * np.sin(np.pi * tk),
            -lord * np.sin(np.pi * tk) + gy1 * (tk - 0.5),
        )

        # body outline (no offset): egg with anterior b, posterior b2
        bt = [0.0, 0.2, 0.45, 0.62, 0.78, 0.9, 1.0]
        jit = 1 + 0.03 * rng.standard_normal((3, len(bt)))
        fx, fy = spec.fov_mm[0], spec.fov_mm[1]
        a = np.minimum(np.array([62, 56, 53, 55, 60, 62, 62]) * sb * jit[0], 0.47 * fx)
        b_ant = np.minimum(np.array([45, 45, 46, 50, 55, 57, 57]) * sb * jit[1], 0.46 * fy)
        b_post = np.minimum(np.array([56, 54, 52, 51, 51, 52, 53]) * sb * jit[2], 0.46 * fy)
        nh = 4
        hk = 1.6 / np.sqrt(np.arange(2, 2 + nh))
        self.body = _Body(
            zt(bt),
            a,
            b_ant,
            b_post,
            rng.normal(0, 1, nh) * hk,
            rng.normal(0, 1, nh) * hk,
            rng.uniform(0, 2 * np.pi, nh),
            zt(0.0),
            zt(1.0),
        )
        fat_k = spec.body_scale**3
        f_l = np.clip(u(6, 12) * fat_k, 3, 18)
        f_a = np.clip(u(3, 6) * fat_k, 2.5, 12)
        f_p = np.clip(u(6, 12) * fat_k, 3, 18)
        self.core = _Body(
            zt(bt),
            a - f_l,
            b_ant - f_a,
            b_post - f_p,
            self.body.h_lo,
            self.body.h_hi,
            self.body.ph,
            zt(0.0),
            zt(1.0),
        ).rough_(2.0)
        self.skin_thk = u(1.5, 2.2)

        # vertebral column (with offset)
        self.vb = _Ell(0, 0, 4 * so, 9 * so, 7.5 * so, off=off)
        self.canal = _Ell(0, 0, 18.5 * so, 10.5 * so, 6.5 * so, off=off)
        self.cordsh = _Ell(0, 0, 18.0 * so, 5.5 * so, 4.0 * so, off=off)
        self.arch = _Ell(0, 0, 19.5 * so, 14 * so, 10.5 * so, off=off)
        self.spinous = _Cap((0, 28 * so), (0, 39 * so), 3.0 * so, off=off)
        self.tp = [
            _Cap((s * 8 * so, 5 * so), (s * 22 * so, 8 * so), 2.6 * so, off=off) for s in (-1, 1)
        ]
        self.vert_a = [
            _Ell(0, s * 16.5 * so, 6.5 * so, 2.3 * so, 2.3 * so, off=off) for s in (-1, 1)
        ]
        self.period = u(17, 21) * so**0.5
        self.phase = u(0, self.period)
        self.disc_w = u(3.5, 5.0)

        # mandible: U-shaped body + rami (z-limited), teeth
        zm0, zm1 = zt(0.66), zt(0.84)
        self.mand = _Band(0, 0, 38 * so, 45 * so, 8.0 * so, 0.0, z0=zm0, z1=zm1, off=off)
        # constraint copy reaching up to the crowns of the teeth
        self.mand_c = _Band(0, 0, 38 * so, 45 * so, 8.0 * so, 0.0, z0=zm0, z1=zt(0.875), off=off)
        self.rami = [
            _Ell(0, s * 39 * so, -6 * so, 3.5 * so, 12 * so, ang=s * 8, z0=zt(0.74), off=off)
            for s in (-1, 1)
        ]
        self.teeth = []
        n_teeth = 14
        phis = np.linspace(np.pi + 0.3, 2 * np.pi - 0.3, n_teeth)
        present = rng.random(n_teeth) < 0.88
        metal = rng.random(n_teeth) < 0.1
        am, bm = (38 - 4.0) * so, (45 - 4.0) * so
        for k in range(n_teeth):
            if present[k]:
                c = (am * np.cos(phis[k]), bm * np.sin(phis[k]))
                tang = np.degrees(np.arctan2(bm * np.cos(phis[k]), -am * np.sin(phis[k])))
                t = _Ell(
                    0, c[0], c[1], 3.6 * so, 2.8 * so, ang=tang, z0=zt(0.80), z1=zt(0.875), off=off
                )
                self.teeth.append((t, 3071.0 if metal[k] else u(2000, 2800)))

        # airway (pharynx -> larynx -> trachea)
        at = [0.0, 0.28, 0.34, 0.40, 0.46, 0.53, 0.60, 0.72, 0.86, 0.93, 1.0]
        acy = np.array([-23, -23, -24, -25, -23, -20, -16, -13, -13, -12, -14.0]) * so
        aa = np.array([8, 7.5, 6, 3.5, 7, 11, 12, 10, 10, 12, 13.0]) * so
        ab = np.array([7, 7, 7, 8.5, 9, 7, 6.5, 5.5, 5, 5, 6.0]) * so
        fa, fb = u(0.8, 1.15), u(0.8, 1.15)
        aa *= fa
        ab *= fb
        self.airway = _Ell(zt(at), 0.0, acy, aa, ab, off=off)
        self.piriform = [
            _Ell(
                0,
                s * 14 * so,
                -14 * so,
                2.5 * so * u(0.6, 1.2),
                4.5 * so,
                z0=zt(0.36),
                z1=zt(0.5),
                off=off,
            )
            for s in (-1, 1)
        ]
        self.larynx_oar = _Ell(0, 0, -22 * so, 17 * so, 14 * so, z0=zt(0.33), z1=zt(0.57), off=off)
        self.thyroid_cart = _Band(
            0, -22 * so, 18 * so, 15 * so, 1.8 * so, 9 * so, z0=zt(0.36), z1=zt(0.56), off=off
        )
        self.cricoid = _Band(
            0, -23 * so, 11.5 * so, 11 * so, 2.4 * so, np.inf, z0=zt(0.30), z1=zt(0.355), off=off
        )
        self.hyoid_b = _Band(
            0, -18 * so, 18 * so, 17 * so, 3 * so, -4 * so, z0=zt(0.565), z1=zt(0.61), off=off
        )
        self.esoph = _Ell(0, 2.5 * so, -9.5 * so, 7.5 * so, 4.5 * so, z1=zt(0.34), off=off)
        self.esoph_air = (
            _Ell(0, 2.5 * so, -9.5 * so, 2.5 * so, 1.0 * so, z1=zt(0.3), off=off)
            if rng.random() < 0.6
            else None
        )

        # glands
        self.thy = [
            _Ell(0, s * 15.5 * so, -21 * so, 6 * so, 11 * so, ang=-s * 25, z1=zt(0.24), off=off)
            for s in (-1, 1)
        ]
        self.isthmus = _Ell(0, 0, -33.5 * so, 8 * so, 2.5 * so, z0=zt(0.03), z1=zt(0.12), off=off)
        pt = [0.72, 0.85, 1.0]
        self.parotids = []
        for s in (1, -1):  # left (+x) first
            sc = u(0.85, 1.15)
            self.parotids.append(
                _Ell(
                    zt(pt),
                    _mirror([40, 43, 43], s * so),
                    np.array([14, 14, 12.0]) * so,
                    np.array([7, 9, 9.0]) * so * sc,
                    np.array([9, 11, 12.0]) * so * sc,
                    ang=-s * 10,
                    z0=zt(0.72),
                    off=off,
                )
            )
        self.smgs = []
        for s in (1, -1):
            sc = u(0.85, 1.15)
            self.smgs.append(
                _Ell(
                    0,
                    s * 24 * so,
                    -29 * so,
                    10 * so * sc,
                    9 * so * sc,
                    ang=s * 15,
                    z0=zt(0.50),
                    z1=zt(0.69),
                    off=off,
                )
            )

        # muscles (with fat halo), fat spaces
        self.scm = []
        st = [0.0, 0.3, 0.6, 0.85, 1.0]
        for s in (1, -1):
            self.scm.append(
                _Ell(
                    zt(st),
                    _mirror([30, 31, 38, 43, 45], s * so),
                    np.array([-26, -24, -10, 8, 26.0]) * so,
                    np.array([10, 11, 12, 12, 11.0]) * so,
                    np.array([5, 5, 5, 5.5, 6.0]) * so,
                    ang=[(v if s > 0 else 180 - v) for v in (30, 38, 55, 68, 80)],
                    off=off,
                )
            )
        self.strap = [
            _Ell(
                zt([0, 0.3, 0.5]),
                s * 9 * so,
                np.array([-38, -38, -40.0]) * so,
                7 * so,
                2.2 * so,
                ang=-s * 10,
                z1=zt(0.55),
                off=off,
            )
            for s in (1, -1)
        ]
        self.med_ptery = [
            _Ell(0, s * 31 * so, -14 * so, 4.5 * so, 10 * so, ang=-s * 20, z0=zt(0.78), off=off)
            for s in (1, -1)
        ]
        self.masseter = [
            _Ell(0, s * 46 * so, -8 * so, 4 * so, 11 * so, ang=s * 5, z0=zt(0.74), off=off)
            for s in (1, -1)
        ]
        self.ppfat = [
            _Ell(0, s * 22 * so, -8 * so, 5 * so, 6 * so, z0=zt(0.72), off=off) for s in (1, -1)
        ]
        ptt = [0.0, 0.4, 0.7]
        self.post_tri = [
            _Ell(
                zt(ptt),
                _mirror([40, 37, 36], s * so),
                np.array([12, 14, 16.0]) * so,
                np.array([12, 8, 5.0]) * so,
                np.array([14, 10, 6.0]) * so,
                z1=zt(0.72),
                off=off,
            )
            for s in (1, -1)
        ]
        self.car_fat = [
            _Ell(0, s * 27 * so, -7 * so, 10.5 * so, 7.5 * so, z1=zt(0.9), off=off) for s in (1, -1)
        ]
        # posterior neck: fat planes between trapezius / splenius / semispinalis, nuchal line
        self.fat_planes = [
            _Cap((0, 38 * so), (0, 56 * so), 1.0, off=off),
            _Shell(_Ell(0, 0, 20 * so, 25 * so, 15 * so, off=off), 1.0, ycut=5 * so).rough_(1.0),
            _Shell(_Ell(0, 0, 17 * so, 36 * so, 25 * so, off=off), 1.2, ycut=2 * so).rough_(1.5),
        ]
        for s in (1, -1):
            self.fat_planes += [
                _Cap((s * 9 * so, 27 * so), (s * 28 * so, 38 * so), 0.9, off=off).rough_(0.6),
            ]
        self.levator = [
            _Ell(0, s * 29 * so, 20 * so, 7 * so, 5 * so, ang=s * 35, z1=zt(0.8), off=off).rough_(
                1.0
            )
            for s in (1, -1)
        ]
        self.tongue_fat = [
            _Cap((0, -42 * so), (0, -14 * so), 0.8, z0=zt(0.68), z1=zt(0.84), off=off),
        ] + [
            _Ell(0, s * 13 * so, -30 * so, 3 * so, 7 * so, z0=zt(0.66), z1=zt(0.76), off=off)
            for s in (1, -1)
        ]

        # vessels
        self.arteries = []
        self.veins = []
        for s in (1, -1):
            self.arteries += [
                _Ell(
                    zt([0, 0.45, 0.5]),
                    s * np.array([23, 21.5, 21]) * so,
                    -10 * so,
                    np.array([4, 4, 4.6]) * so,
                    np.array([4, 4, 4.6]) * so,
                    z1=zt(0.52),
                    off=off,
                ),
                _Ell(
                    zt([0.48, 0.75, 1.0]),
                    s * np.array([20, 21, 23]) * so,
                    np.array([-8, -4, 2.0]) * so,
                    2.9 * so,
                    2.9 * so,
                    z0=zt(0.48),
                    off=off,
                ),
                _Ell(
                    zt([0.48, 0.65, 0.85]),
                    s * np.array([21, 24, 28]) * so,
                    np.array([-13, -16, -12.0]) * so,
                    2.4 * so,
                    2.4 * so,
                    z0=zt(0.48),
                    z1=zt(0.85),
                    off=off,
                ),
            ]
            vs = u(0.6, 1.1) if s > 0 else u(0.9, 1.4)  # right IJV usually larger
            self.veins.append(
                _Ell(
                    zt([0, 0.5, 0.8, 1.0]),
                    s * np.array([31, 30, 30, 28.0]) * so,
                    np.array([-6, -4, 2, 12.0]) * so,
                    np.array([6, 5.5, 5, 4.5]) * so * vs,
                    4.5 * so * vs,
                    off=off,
                )
            )
        self.arteries += self.vert_a

        # lymph nodes along the jugular chain
        self.nodes = []
        n_nodes = int(rng.integers(2, 7))
        for _ in range(n_nodes):
            t = u(0.2, 0.85)
            s = 1 if rng.random() < 0.5 else -1
            vz = zt(t)
            ox, oy = off.at(np.float32(vz))
            vx = s * float(np.interp(t, [0, 0.5, 0.8, 1.0], [31, 30, 30, 28])) * so
            vy = float(np.interp(t, [0, 0.5, 0.8, 1.0], [-6, -4, 2, 12])) * so
            c = (vx + s * u(-2, 6) + float(ox), vy + u(-10, 4) + float(oy), vz)
            self.nodes.append(_Ellipsoid(c, (u(2.5, 4.5), u(2.5, 4.0), u(4, 8))))
        self._cart_rng = np.random.default_rng(int(rng.integers(0, 2**62)))

    # --- painting ---

    def paint(self, cv: _Canvas) -> None:
        g = self.g
        L = ORGAN_LABELS
        cv.aux["vertebra"] = np.zeros(g.shape, bool)
        cv.aux["vessels"] = np.zeros(g.shape, bool)
        cv.aux["airway"] = np.zeros(g.shape, bool)
        Z = g.z[:, None, None]
        Y = g.y[None, :, None]
        X = g.x[None, None, :]

        # body: skin, subcutaneous fat, muscle core (full volume)
        sd = self.body.sd(X, Y, Z)
        occ = np.clip(0.5 - sd * _F32(1 / g.h), 0, 1)
        cv.aux["body"] = occ >= 0.5
        cv.hu += occ * _F32(self.skin - _AIR)
        occ_s = np.clip(0.5 - (sd + _F32(self.skin_thk)) * _F32(1 / g.h), 0, 1)
        cv.hu += occ_s * (_F32(self.fat) - cv.hu)
        del sd, occ
        cv.within["skin"] = occ_s
        full = (slice(None),) * 3
        sdc = self.core.sd(X, Y, Z) + _F32(self.core.rough) * cv.field(self.core, full)
        occ_c = np.clip(0.5 - sdc * _F32(1 / g.h), 0, 1)
        del sdc
        occ_c *= occ_s
        cv.hu += occ_c * (_F32(self.muscle) - cv.hu)
        cv.within["core"] = occ_c

        fat, mus = self.fat, self.muscle
        # boundary roughness (mm) of the soft-tissue structures
        for group, rough in (
            (self.post_tri + self.car_fat + self.ppfat, 2.5),
            (self.tongue_fat, 0.8),
            (self.scm + self.strap + self.med_ptery + self.masseter, 1.0),
            (self.thy + [self.isthmus] + self.parotids + self.smgs, 1.2),
            ([self.airway, self.esoph] + self.piriform, 0.7),
            (self.veins + self.nodes, 0.5),
        ):
            for sh in group:
                sh.rough_(rough)
        # fat spaces inside the muscle core
        for sh in self.post_tri + self.car_fat:
            cv.fill(sh, fat + 25, within="core", patchy=0.6)
        for sh in self.ppfat:
            cv.fill(sh, fat + 10, within="core")
        for sh in self.fat_planes + self.tongue_fat:
            cv.fill(sh, fat, within="core", patchy=0.9)
        # muscles with (patchy) fat halos
        muscles = self.scm + self.strap + self.med_ptery + self.masseter + self.levator
        for sh in muscles:
            cv.fill(sh, fat, dilate=1.1, within="core", patchy=0.9)
        for sh in muscles:
            cv.fill(sh, mus + 3)

        # larynx / pharynx region
        larynx = cv.occ(self.larynx_oar, within="skin")
        if larynx is not None:
            sl, occ = larynx
            cv.lab[sl][occ >= 0.5] = L["larynx"]
        for sh in self.thyroid_cart, self.cricoid:
            self._cartilage(cv, sh)
        cv.fill(self.esoph, mus - 5, label=L["esophagus"])
        if self.esoph_air is not None:
            cv.fill(self.esoph_air, _AIR, aux="airway")

        # glands
        for sh in self.thy + [self.isthmus]:
            cv.fill(sh, self.thyroid)
        cv.fill(self.parotids[0], self.parotid, label=L["parotid_left"])
        cv.fill(self.parotids[1], self.parotid, label=L["parotid_right"])
        cv.fill(self.smgs[0], self.smg, label=L["submandibular_left"])
        cv.fill(self.smgs[1], self.smg, label=L["submandibular_right"])
        for sh in self.nodes:
            cv.fill(sh, self.node)

        # vessels
        for sh in self.veins:
            cv.fill(sh, self.vein, aux="vessels")
        for sh in self.arteries[:-2]:
            cv.fill(sh, self.artery, aux="vessels")

        # airway
        cv.fill(self.airway, _AIR, aux="airway")
        for sh in self.piriform:
            cv.fill(sh, _AIR, aux="airway")

        # vertebral column
        zc = g.z
        disc = _periodic_frac(zc, g.sz, self.period, self.phase, self.disc_w)
        bonef = (1 - disc).astype(_F32)
        archf = _periodic_frac(
            zc, g.sz, self.period, self.phase + 0.15 * self.period, 0.62 * self.period
        )
        spinf = _periodic_frac(
            zc, g.sz, self.period, self.phase + 0.2 * self.period, 0.45 * self.period
        )
        tpf = _periodic_frac(
            zc, g.sz, self.period, self.phase + 0.3 * self.period, 0.35 * self.period
        )
        cv.fill(self.canal, self.csf)
        cv.fill(self.cordsh, self.cord, label=L["spinal_cord"])
        cv.bone(self.vb, self.v_cortex, self.v_marrow, 1.4, frac=bonef, aux="vertebra")
        r = cv.occ(self.vb)
        if r is not None:
            sl, occ = r
            v = cv.hu[sl]
            v += occ * disc[sl[0]].reshape(-1, 1, 1) * (_F32(self.disc) - v)
        arch = _ArchRing(self.arch, self.canal, 11.5 * self.so)
        cv.bone(arch, self.v_cortex, self.v_marrow, 1.3, frac=archf, aux="vertebra")
        cv.bone(self.spinous, self.v_cortex, self.v_marrow, 1.3, frac=spinf, aux="vertebra")
        for sh in self.tp:
            cv.bone(sh, self.v_cortex, self.v_marrow, 1.3, frac=tpf, aux="vertebra")
        for sh in self.vert_a:
            cv.fill(sh, self.artery, aux="vessels")

        # hyoid, mandible, teeth
        cv.bone(self.hyoid_b, self.hyoid * 1.3, self.hyoid * 0.6, 1.0)
        cv.bone(self.mand, self.m_cortex, self.m_marrow, 2.0, label=L["mandible"])
        for sh in self.rami:
            cv.bone(sh, self.m_cortex, self.m_marrow, 1.5, label=L["mandible"])
        for sh, hu in self.teeth:
            cv.fill(sh, hu)

    def _cartilage(self, cv: _Canvas, shape: _Shape) -> None:
        r = cv.occ(shape)
        if r is None:
            return
        sl, occ = r
        zz, yy, xx = (self.g.z[sl[0]], self.g.y[sl[1]], self.g.x[sl[2]])
        fld = _smooth_field(self._cart_rng, zz, yy, xx, 4.0)
        val = self.cart + self.cart_oss * 700 * np.clip(fld - 0.3, 0, None)
        v = cv.hu[sl]
        v += occ * (val - v)

    # --- constraint for the tumour: > 0 where the tumour may be ---

    def vert_sd(self, X, Y, Z):
        s = np.minimum(self.vb.sd(X, Y, Z), self.arch.sd(X, Y, Z))
        s = np.minimum(s, self.canal.sd(X, Y, Z))
        s = np.minimum(s, self.spinous.sd(X, Y, Z))
        for sh in self.tp:
            s = np.minimum(s, sh.sd(X, Y, Z))
        return s

    def allowed(self, X, Y, Z):
        """Signed clearance (mm) of points for the tumour: body inset, spine, mandible, FOV."""
        g = self.g
        c = -self.body.sd(X, Y, Z) - 3.0
        c = np.minimum(c, self.vert_sd(X, Y, Z) - 1.5)
        c = np.minimum(c, self.mand_c.sd3(X, Y, Z) - 1.0)
        for sh in self.rami:
            c = np.minimum(c, sh.sd3(X, Y, Z) - 1.0)
        mx = float(g.x[-1]) - 2 * g.sx
        my = float(g.y[-1]) - 2 * g.sy
        c = np.minimum(c, mx - np.abs(X))
        c = np.minimum(c, my - np.abs(Y))
        c = np.minimum(c, np.minimum(Z - 1.5 * g.sz, g.zlen - 1.5 * g.sz - Z))
        return c


class _ArchRing(_Shape):
    """Posterior vertebral arch: ellipse minus the canal, behind the vertebral body."""

    def __init__(self, outer: _Ell, canal: _Ell, y_front: float):
        self.outer, self.canal, self.yf, self.off = outer, canal, float(y_front), outer.off

    def sd(self, X, Y, Z):
        _, oy = self._offs(Z)
        s = np.maximum(self.outer.sd(X, Y, Z), -self.canal.sd(X, Y, Z))
        return np.maximum(s, (self.yf + oy) - Y)

    def bbox(self, pad):
        return self.outer.bbox(pad)


# ---- tumour ----------------------------------------------------------------------------------

_NT, _NP = 41, 80  # direction table resolution (theta, phi)


def _dir_table(rng, n_low, n_high, low_amp, high_amp, nt=_NT, npp=_NP):
    """Radial function r(direction) on a (theta, phi) grid: 1 + smooth lobes + sharper bumps."""
    th = np.linspace(0, np.pi, nt)
    ph = np.linspace(-np.pi, np.pi, npp, endpoint=False)
    st = np.sin(th)[:, None]
    u = np.stack(
        [st * np.cos(ph)[None, :], st * np.sin(ph)[None, :], np.cos(th)[:, None] + 0 * ph], -1
    )
    r = np.ones((nt, npp))
    for n, kap_lo, kap_hi, amp in ((n_low, 1.5, 4.0, low_amp), (n_high, 8.0, 30.0, high_amp)):
        d = rng.standard_normal((n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        kap = rng.uniform(kap_lo, kap_hi, n)
        w = rng.normal(0, 1, n) * amp
        if n:
            r += (np.exp(kap[None, None, :] * (u @ d.T - 1)) * w).sum(-1)
    return np.clip(r, 0.35, None).astype(_F32)


def _lookup(table, ux, uy, uz):
    """Bilinear lookup of a (theta, phi) direction table at unit vectors (any shape)."""
    nt, npp = table.shape
    ft = np.arccos(np.clip(uz, -1, 1)) * _F32((nt - 1) / np.pi)
    i0 = np.minimum(ft.astype(np.int32), nt - 2)
    wt = ft - i0
    fp = (np.arctan2(uy, ux) + _F32(np.pi)) * _F32(npp / (2 * np.pi))
    j0 = np.floor(fp)
    wp = fp - j0
    j0 = j0.astype(np.int32) % npp
    j1 = (j0 + 1) % npp
    tf = table.ravel()
    r0 = tf[i0 * npp + j0] * (1 - wp) + tf[i0 * npp + j1] * wp
    r1 = tf[(i0 + 1) * npp + j0] * (1 - wp) + tf[(i0 + 1) * npp + j1] * wp
    return r0 * (1 - wt) + r1 * wt


class _Comp:
    """One tumour component in units of r0: centre, size, direction table, stretch matrices."""

    def __init__(self, centre, scale, table, A):
        self.c = np.asarray(centre, float)
        self.scale = float(scale)
        self.table = table
        self.A = np.asarray(A, float)
        self.Ai = np.linalg.inv(self.A)
        self.rmax = float(table.max()) * self.scale * float(np.linalg.norm(self.A, 2))

    def eval(self, dx, dy, dz, r0):
        """(signed distance mm, normalised radius, unit direction) at offsets from the centre."""
        px = dx - _F32(self.c[0] * r0)
        py = dy - _F32(self.c[1] * r0)
        pz = dz - _F32(self.c[2] * r0)
        Ai = self.Ai.astype(_F32)
        qx = Ai[0, 0] * px + Ai[0, 1] * py + Ai[0, 2] * pz
        qy = Ai[1, 0] * px + Ai[1, 1] * py + Ai[1, 2] * pz
        qz = Ai[2, 0] * px + Ai[2, 1] * py + Ai[2, 2] * pz
        rho = np.sqrt(qx * qx + qy * qy + qz * qz) + _F32(1e-4)
        inv = 1 / rho
        r = _lookup(self.table, qx * inv, qy * inv, qz * inv) * _F32(self.scale * r0)
        dist = np.sqrt(px * px + py * py + pz * pz) + _F32(1e-4)
        sd = (rho - r) * (dist * inv)
        dinv = 1 / dist
        return sd, rho / r, (px * dinv, py * dinv, pz * dinv)

    def surface(self, dirs, r0):
        """Surface points (N, 3) in mm relative to the tumour centre along unit ``dirs``."""
        r = _lookup(self.table, dirs[:, 0], dirs[:, 1], dirs[:, 2]) * self.scale
        q = dirs * r[:, None]
        return (q @ self.A.T + self.c) * r0


def _fib_sphere(n):
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], 1)


class _TumourShape:
    """Irregular tumour: lobulated radial function, mild anisotropy, 0-3 daughter lobes."""

    def __init__(self, rng: np.random.Generator, irregularity: float):
        irr = float(irregularity)
        main_t = _dir_table(rng, 5, 40, 0.14 + 0.06 * irr, 0.04 + 0.22 * irr)
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        s = np.exp(rng.normal(0, 0.13, 3))
        s /= np.prod(s) ** (1 / 3)
        A = q @ np.diag(s) @ q.T
        self.comps = [_Comp((0, 0, 0), 1.0, main_t, A)]
        # daughter lobes: fixed number of draws, activation grows with irregularity
        act = rng.random(3) < np.array([0.25, 0.12, 0.05]) + np.array([0.45, 0.35, 0.25]) * irr
        for k in range(3):
            d = rng.standard_normal(3)
            d /= np.linalg.norm(d)
            frac, sc = rng.uniform(0.6, 0.85), rng.uniform(0.28, 0.5)
            tab = _dir_table(rng, 3, 10, 0.12, 0.15 * irr, nt=21, npp=40)
            if act[k]:
                rm = float(_lookup(main_t, d[0:1], d[1:2], d[2:3])[0])
                self.comps.append(_Comp(A @ (d * rm * frac), sc, tab, np.eye(3)))
        self.extent = max(np.linalg.norm(c.c) + c.rmax for c in self.comps)
        self.unit_volume = self._unit_volume()

    def _unit_volume(self, n=40):
        """Volume of the shape at r0 = 1 (grid count), in unit^3; keeps the interior points."""
        e = self.extent * 1.02
        ax = ((np.arange(n) + 0.5) / n * 2 - 1).astype(_F32) * _F32(e)
        dz, dy, dx = ax[:, None, None], ax[None, :, None], ax[None, None, :]
        inside = self.sd(dx, dy, dz, 1.0)[0] < 0
        k = np.nonzero(inside)
        self.inside_pts = np.stack([ax[k[2]], ax[k[1]], ax[k[0]]], 1).astype(float)  # (x, y, z)
        return float(inside.sum()) * (2 * e / n) ** 3

    def sd(self, dx, dy, dz, r0):
        """(signed distance mm, main-component normalised radius, main direction)."""
        sd, s, d = self.comps[0].eval(dx, dy, dz, r0)
        for c in self.comps[1:]:
            sd = np.minimum(sd, c.eval(dx, dy, dz, r0)[0])
        return sd, s, d

    def surface(self, r0, n=240):
        dirs = _fib_sphere(n)
        return np.concatenate([c.surface(dirs, r0) for c in self.comps], 0)


_SITE_CENTRES = {
    # (x |mm| range, y mm, t range): x sign random (laterality), y anterior negative
    "oropharynx": None,  # handled in _site_centre (tonsil vs base of tongue)
    "larynx": ((2, 7), -26, (0.36, 0.50)),
    "hypopharynx": ((10, 15), -13, (0.30, 0.45)),
    "nasopharynx": ((0, 6), -5, (0.88, 0.95)),
    "oral_cavity": ((0, 12), -28, (0.72, 0.84)),
}


def _site_centre(subsite, rng, neck: _Neck) -> np.ndarray:
    so = neck.so
    side = 1.0 if rng.random() < 0.5 else -1.0
    u1, u2, u3 = rng.random(3)
    jit = rng.normal(0, 2.0, 3)
    if subsite == "oropharynx":
        if u1 < 0.6:  # tonsil / lateral wall
            xr, y, tr = (8, 13), -13, (0.64, 0.78)
        else:  # base of tongue
            xr, y, tr = (0, 5), -25, (0.60, 0.70)
    else:
        xr, y, tr = _SITE_CENTRES[subsite]
    x = side * (xr[0] + u2 * (xr[1] - xr[0])) * so
    z = float(neck.zt(tr[0] + u3 * (tr[1] - tr[0])))
    ox, oy = neck.off.at(np.float32(z))
    return np.array([x + float(ox), y * so + float(oy), z]) + jit


def _grad(neck: _Neck, P: np.ndarray, eps: float = 0.5) -> np.ndarray:
    """Central-difference gradient (N, 3) of the clearance at points P (N, 3)."""
    cols = []
    for e in np.eye(3) * eps:
        hp = neck.allowed(*(P + e).T)
        hm = neck.allowed(*(P - e).T)
        cols.append((hp - hm) / (2 * eps))
    return np.stack(cols, 1)


def _place(neck: _Neck, shape: _TumourShape, c: np.ndarray, target_mm3: float):
    """Centre (mm) and scale r0 (mm) so the tumour sits in the allowed region with its volume.

    Interior sample points of the unit shape are shifted away from forbidden regions (skin, spine,
    mandible, FOV edge) by the mean penetration; where the tumour cannot fit, the part outside
    the allowed region is later clipped, and r0 grows so the clipped volume still matches.
    """
    c = np.asarray(c, float).copy()
    pts = shape.inside_pts
    pts = pts[:: max(1, len(pts) // 3000)]  # deterministic subsample: ~3k interior points
    v_unit = shape.unit_volume
    r0 = r_init = (target_mm3 / v_unit) ** (1 / 3)
    for _ in range(14):
        P = c + pts * r0
        h = neck.allowed(*P.T)
        bad = np.nonzero(h < 0)[0]
        frac = 1.0 - bad.size / h.size
        n = 0.0
        if bad.size:
            bad = bad[:: max(1, bad.size // 300)]
            g = _grad(neck, P[bad])
            g /= np.linalg.norm(g, axis=1, keepdims=True) + 1e-9
            step = (-(h[bad])[:, None] * g).mean(0)
            n = float(np.linalg.norm(step))
            if n > 1e-9:
                step *= (n + 0.3) / n
            c += step
        vol = max(frac, 1e-3) * v_unit * r0**3
        r0 = min(r0 * float(np.clip((target_mm3 / vol) ** (1 / 3), 0.9, 1.25)), 2.0 * r_init)
        if n < 0.25 and abs(vol / target_mm3 - 1) < 0.015:
            break
    return c, r0


class _Tumour:
    """Rendered tumour inside its bounding box: occupancy, mask, HU and peritumoral ring."""

    def __init__(self, spec: RenderSpec, neck: _Neck, rng_shape, rng_site):
        self.spec, self.neck = spec, neck
        self.shape = _TumourShape(rng_shape, spec.irregularity)
        self.target_mm3 = spec.tumour_volume_cc * 1000.0
        self.c0 = _site_centre(spec.subsite, rng_site, neck)

    def geometry(self, margin: float):
        """Evaluate the placed shape on its bounding box grown by ``margin`` mm; return mm^3."""
        g = self.neck.g
        ext = self.shape.extent * self.r0 + margin
        c = self.c
        box = g.box(c[0] - ext, c[0] + ext, c[1] - ext, c[1] + ext, c[2] - ext, c[2] + ext)
        sl, X, Y, Z = box
        dx, dy, dz = X - _F32(c[0]), Y - _F32(c[1]), Z - _F32(c[2])
        sd, s, (nx, ny, nz) = self.shape.sd(dx, dy, dz, self.r0)
        heff = np.sqrt((nx * g.sx) ** 2 + (ny * g.sy) ** 2 + (nz * g.sz) ** 2)
        occ = np.clip(0.5 - sd / heff, 0, 1)
        # keep clear of bone / skin / FOV edge
        idx = np.nonzero(occ > 0)
        if idx[0].size:
            pz = g.z[sl[0]][idx[0]]
            py = g.y[sl[1]][idx[1]]
            px = g.x[sl[2]][idx[2]]
            bad = self.neck.allowed(px, py, pz) < 0
            occ[tuple(i[bad] for i in idx)] = 0
        # a GTV is one connected object: drop fragments cut off by the clipping
        mask = occ >= 0.5
        lab, n = ndimage.label(mask)
        if n > 1:
            keep = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
            occ[ndimage.binary_dilation(mask & ~keep) & ~keep] = 0
            mask = keep
        # ... and has no holes within a slice: fill clefts enclosed in-plane
        st = np.zeros((3, 3, 3), bool)
        st[1] = ndimage.generate_binary_structure(2, 1)
        add = ndimage.binary_fill_holes(mask, st) & ~mask
        if add.any():
            idx = np.nonzero(add)
            ok = self.neck.allowed(g.x[sl[2]][idx[2]], g.y[sl[1]][idx[1]], g.z[sl[0]][idx[0]]) >= 0
            idx = tuple(i[ok] for i in idx)
            occ[idx] = 1.0
            mask[idx] = True
            sd[idx] = np.minimum(sd[idx], -0.5)
        self.sl, self.sd_box, self.s_main, self.occ = sl, sd, s, occ
        self.mask = mask
        return float(mask.sum()) * g.sx * g.sy * g.sz

    def build(self, margin: float = 11.0):
        self.c, self.r0 = _place(self.neck, self.shape, self.c0, self.target_mm3)
        vol = self.geometry(margin)
        if vol > 0 and abs(vol / self.target_mm3 - 1) > 0.03:
            self.r0 *= float(np.clip((self.target_mm3 / vol) ** (1 / 3), 0.9, 1.15))
            vol = self.geometry(margin)
        return vol


def _paint_spicules(cv: _Canvas, tum: _Tumour, rng, infiltration: float, value: float):
    g = cv.g
    n = 40
    dirs = rng.standard_normal((n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    tilt = rng.standard_normal((n, 3)) * 0.35
    length = rng.uniform(3, 10, n) * (0.6 + 0.4 * infiltration)
    rad = rng.uniform(0.5, 1.0, n)
    act = rng.random(n) < 0.9 * infiltration
    bump = rng.uniform(20, 40, n)
    main = tum.shape.comps[0]
    start = main.surface(dirs, tum.r0) + tum.c
    for k in range(n):
        if not act[k]:
            continue
        v = dirs[k] + tilt[k]
        v /= np.linalg.norm(v)
        p0 = start[k] - 1.5 * v
        p1 = start[k] + length[k] * v
        if _neck_clear(tum.neck, p1) < 1.0:
            continue
        lo = np.minimum(p0, p1) - rad[k] - 2 * g.sz
        hi = np.maximum(p0, p1) + rad[k] + 2 * g.sz
        box = g.box(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
        if box is None:
            continue
        sl, X, Y, Z = box
        ax, ay, az = X - _F32(p0[0]), Y - _F32(p0[1]), Z - _F32(p0[2])
        L = float(np.linalg.norm(p1 - p0))
        vx, vy, vz = (_F32(c) for c in v)
        t = np.clip((ax * vx + ay * vy + az * vz) * _F32(1 / L), 0, 1)
        ex, ey, ez = ax - t * (vx * L), ay - t * (vy * L), az - t * (vz * L)
        dist = np.sqrt(ex * ex + ey * ey + ez * ez) + _F32(1e-4)
        r = _F32(rad[k]) * (1 - t) + _F32(0.3) * t
        inv = 1 / dist
        heff = np.sqrt((ex * inv * g.sx) ** 2 + (ey * inv * g.sy) ** 2 + (ez * inv * g.sz) ** 2)
        occ = np.clip(0.5 - (dist - r) / heff, 0, 1) * _F32(0.9)
        hu = cv.hu[sl]
        occ *= _tissue_weight(hu)
        # soft-tissue strand: tumour-like over fat, slightly hyperdense over muscle
        hu += occ * np.maximum(_F32(value) - hu, _F32(bump[k]))


def _neck_clear(neck: _Neck, p) -> float:
    return float(neck.allowed(*np.asarray(p, float)[:, None])[0])


def _tissue_weight(hu):
    """1 over fat/soft tissue (-150..150 HU), 0 over air and bone, linear in between."""
    return np.clip((hu + 250) * _F32(0.01), 0, 1) * np.clip((250 - hu) * _F32(0.01), 0, 1)


def _paint_tumour(cv: _Canvas, tum: _Tumour, spec: RenderSpec, rng) -> None:
    g = cv.g
    sl = tum.sl
    zz, yy, xx = g.z[sl[0]], g.y[sl[1]], g.x[sl[2]]
    u = rng.uniform
    ct = 1.0 if spec.contrast else 0.0
    base = rng.normal(43, 5) + ct * rng.normal(10, 4)
    rim_plain, rim_ct = u(4, 9), u(15, 30)
    rim_amp = rim_ct if spec.contrast else rim_plain
    rim_thk = u(2.0, 4.0)
    het_amp = spec.heterogeneity * u(10, 16)
    nec_hu = u(10, 25)
    corr = u(2.5, 4.5)
    f1 = _smooth_field(rng, zz, yy, xx, corr)
    f2 = _smooth_field(rng, zz, yy, xx, 5.0)
    depth = -tum.sd_box
    val = _F32(base) + _F32(rim_amp) * np.clip(1 - depth * _F32(1 / rim_thk), 0, 1)
    val += _F32(het_amp) * f1
    if spec.necrosis > 0:
        qn = (0.5 * spec.necrosis) ** (1 / 3)
        ramp = max(2.0 / tum.r0, 0.05)
        w = np.clip((_F32(qn) * (1 + _F32(0.12) * f2) - tum.s_main) * _F32(1 / ramp) + 0.5, 0, 1)
        w *= _F32(min(1.0, spec.necrosis / 0.05))
        val += w * (_F32(nec_hu) + _F32(0.3 * het_amp) * f1 - val)
    hu = cv.hu[sl]
    # mucosal surface: where the tumour faces the airway lumen, a thin soft-tissue layer just
    # outside the GTV (contours stay off the air interface, as clinical GTVs do)
    thk = _F32(max(1.5, 0.6 * g.sz))
    sd = tum.sd_box
    coat = np.clip((thk - sd) / thk * 2, 0, 1) * (sd > 0)
    coat *= np.clip((-150 - hu) * _F32(1 / 300), 0, 1)
    hu += coat * (_F32(base) - hu)
    hu += tum.occ * (val - hu)


def _paint_haze(cv: _Canvas, tum: _Tumour, rng, infiltration: float) -> None:
    g = cv.g
    sl = tum.sl
    amp = rng.uniform(12, 22)
    f3 = _smooth_field(rng, g.z[sl[0]], g.y[sl[1]], g.x[sl[2]], 2.0)
    if infiltration <= 0:
        return
    sd = tum.sd_box
    w = np.clip(sd * _F32(1 / 1.5), 0, 1) * np.clip((_F32(9.0) - sd) * _F32(0.25), 0, 1)
    w *= np.clip(0.55 + 0.45 * f3, 0, None)
    hu = cv.hu[sl]
    fatty = np.clip(-hu * _F32(1 / 80), 0, 1)
    w *= _tissue_weight(hu) * (1 + _F32(0.8) * fatty)
    w[tum.mask] = 0
    hu += w * _F32(infiltration * amp)


# ---- scanner ---------------------------------------------------------------------------------


def _noise_norm(sigma: float) -> float:
    if sigma <= 0:
        return 1.0
    imp = np.zeros(41)
    imp[20] = 1.0
    k = ndimage.gaussian_filter1d(imp, sigma, truncate=3.0)
    return float(np.sqrt((k * k).sum()))


def _scanner(cv: _Canvas, spec: RenderSpec, rng) -> np.ndarray:
    g = cv.g
    hu = cv.hu
    sig = [spec.blur_mm / g.sz, spec.blur_mm / g.sy, spec.blur_mm / g.sx]
    sig = [s if s >= 0.2 else 0.0 for s in sig]
    if any(sig):
        hu = ndimage.gaussian_filter(hu, sig, mode="nearest", truncate=3.0)
    if spec.noise_hu > 0:
        ns = 0.6  # in-plane noise correlation (voxels)
        noise = rng.standard_normal(g.shape, dtype=_F32)
        noise = ndimage.gaussian_filter(noise, (0, ns, ns), mode="wrap", truncate=3.0)
        noise *= _F32(spec.noise_hu / _noise_norm(ns) ** 2)
        hu += noise
    hu += _F32(spec.hu_offset)
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu.astype(np.int16)


def _texture(cv: _Canvas, rng) -> None:
    g = cv.g
    f = _smooth_field(rng, g.z, g.y, g.x, 2.5)
    hu = cv.hu
    w = _tissue_weight(hu)
    w *= 4 + 6 * np.clip(-hu * _F32(1 / 80), 0, 1)
    w *= f
    hu += w


# ---- public API ------------------------------------------------------------------------------


def render_patient_with_aux(
    spec: RenderSpec, rng: np.random.Generator
) -> tuple[RenderedPatient, dict[str, np.ndarray]]:
    """Render one patient; also return auxiliary boolean masks for QA/tests.

    Aux keys (each bool (nz, ny, nx)): ``vertebra`` (vertebral bone), ``vessels`` (carotid,
    jugular, vertebral vessels), ``airway``, ``body``; plus ``tumour_centre_mm`` (x, y, z).
    """
    grid = _Grid(spec.fov_mm, spec.spacing_mm)
    seeds = rng.integers(0, 2**62, size=8)
    r_anat, r_shape, r_site, r_hu, r_spic, r_haze, r_tex, r_noise = (
        np.random.default_rng(int(s)) for s in seeds
    )
    neck = _Neck(spec, grid, r_anat)
    cv = _Canvas(grid, r_tex)
    neck.paint(cv)

    tum = _Tumour(spec, neck, r_shape, r_site)
    tum.build()
    spic_hu = 42.0 + (10.0 if spec.contrast else 0.0)
    _paint_spicules(cv, tum, r_spic, spec.infiltration, spic_hu)
    _paint_tumour(cv, tum, spec, r_hu)
    _paint_haze(cv, tum, r_haze, spec.infiltration)
    _texture(cv, r_tex)

    ct = _scanner(cv, spec, r_noise)
    mask = np.zeros(grid.shape, np.uint8)
    mask[tum.sl] = tum.mask
    body = cv.aux["body"]
    organ = np.where(body, cv.lab, 0).astype(np.uint8)
    vox = grid.sx * grid.sy * grid.sz
    n = int(mask.sum())
    mean_hu = float(ct[mask.astype(bool)].mean()) if n else float("nan")
    out = RenderedPatient(
        ct_hu=ct,
        tumour_mask=mask,
        organ_mask=organ,
        body_mask=body.astype(np.uint8),
        origin_mm=(float(grid.x[0]), float(grid.y[0]), float(grid.z[0])),
        spacing_mm=(grid.sx, grid.sy, grid.sz),
        tumour_volume_cc=n * vox / 1000.0,
        tumour_mean_hu=mean_hu,
    )
    aux = {k: cv.aux[k] for k in ("vertebra", "vessels", "airway", "body")}
    aux["tumour_centre_mm"] = np.asarray(tum.c, float)
    return out, aux


def render_patient(spec: RenderSpec, rng: np.random.Generator) -> RenderedPatient:
    """Render one synthetic neck CT with its GTVp mask and organ-at-risk labels.

    Returns int16 HU (nz, ny, nx) clipped to [-1024, 3071], uint8 masks of the same shape, and
    the measured tumour volume (cc) and mean HU. Deterministic given the state of ``rng``.
    """
    return render_patient_with_aux(spec, rng)[0]
