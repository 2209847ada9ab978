"""Put one patient's CT and tumour mask on the site's analysis grid and crop around the tumour.

Steps (SimpleITK): reorient to LPS (``DICOMOrient``), find the body (largest connected component
of HU > ``body_threshold_hu``, holes filled per axial slice), then resample CT (B-spline or linear),
tumour and body (nearest neighbour) in one pass onto an axis-aligned LPS grid of
``[preprocess] spacing_mm`` that covers both

- the **radiomics box**: the tumour's bounding box grown by the peritumoral margin plus
  ``crop_margin_mm`` (what PyRadiomics and the ring see), and
- the **deep crop**: ``crop_voxels`` voxels centred (within half a voxel) on the tumour's
  bounding-box centre (what the deep model reads; a tumour larger than the crop is cut at its
  edges).

The grid is anchored to the scan, not to the crop (its voxel centres sit a third of a voxel past
the scan's first voxel centre), so a voxel's value does not depend on how far the crop reaches.

The CT is then clipped to ``hu_window``; voxels outside the scan's field of view read -1024 HU.

Deep crops are saved as ``.npz`` (see :func:`save_crop`): arrays in numpy (z, y, x) order,
``ct`` int16 HU, ``tumour`` and ``ring`` uint8 0/1, ``spacing_mm`` and ``origin_mm`` (x, y, z) of
the crop in LPS millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedmets.shared.config import PreprocessSection
from fedmets.shared.files import write_atomically

OUTSIDE_FOV_HU = -1024.0
_INTERPOLATORS = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear}


class ImageContentError(ValueError):
    """An image whose content makes a step impossible; ``image`` is "ct" or "tumour"."""

    def __init__(self, image: str, message: str) -> None:
        self.image = image
        super().__init__(message)


@dataclass(frozen=True)
class Box:
    """A box of voxels on an image grid: ``start`` and ``size`` in (x, y, z) voxel order."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    def crop(self, image: sitk.Image) -> sitk.Image:
        """The box cut out of ``image`` (physical position kept)."""
        (x, y, z), (nx, ny, nz) = self.start, self.size
        return image[x : x + nx, y : y + ny, z : z + nz]

    def array(self, image: sitk.Image) -> np.ndarray:
        """The box of ``image`` as a numpy array, shape (nz, ny, nx)."""
        (x, y, z), (nx, ny, nz) = self.start, self.size
        return sitk.GetArrayViewFromImage(image)[z : z + nz, y : y + ny, x : x + nx].copy()


@dataclass
class PreparedPatient:
    """One patient on the analysis grid (LPS, ``spacing_mm``): ``ct`` float32 HU clipped to the
    window, ``tumour`` and ``body`` uint8 0/1; ``radiomics_box`` and ``deep_box`` index it."""

    ct: sitk.Image
    tumour: sitk.Image
    body: sitk.Image
    radiomics_box: Box
    deep_box: Box


def to_lps(image: sitk.Image) -> sitk.Image:
    """``image`` with its axes permuted and flipped to LPS (x: right->left, y: anterior->posterior,
    z: inferior->superior); voxel values untouched."""
    return sitk.DICOMOrient(image, "LPS")


def body_mask(ct: sitk.Image, threshold_hu: float = -500.0) -> sitk.Image:
    """The patient's body, uint8 0/1 on ``ct``'s grid: the largest 3-D connected component of
    HU > ``threshold_hu`` with the holes of each axial slice (airway, mouth) filled. ``ct`` must be
    in LPS orientation (axial slices along the third axis)."""
    components = sitk.ConnectedComponent(ct > threshold_hu)
    largest = sitk.RelabelComponent(components, sortByObjectSize=True) == 1
    if not sitk.GetArrayViewFromImage(largest).any():
        raise ImageContentError("ct", f"no voxel above {threshold_hu:g} HU: no body found")
    slices = [sitk.BinaryFillhole(largest[:, :, k]) for k in range(largest.GetSize()[2])]
    body = sitk.JoinSeries(slices)
    body.CopyInformation(largest)
    return sitk.Cast(body, sitk.sitkUInt8)


def prepare_patient(
    ct: sitk.Image, tumour: sitk.Image, settings: PreprocessSection, ring_margin_mm: float
) -> PreparedPatient:
    """Reorient, resample, clip and crop one patient (see the module docstring).

    ``ct`` in HU and ``tumour`` (0/1) share one grid in any orientation; ``ring_margin_mm`` is the
    peritumoral margin the radiomics box must leave room for."""
    ct = sitk.Cast(to_lps(ct), sitk.sitkFloat32)
    tumour = to_lps(tumour) > 0
    body = body_mask(ct, settings.body_threshold_hu)

    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(tumour)
    if not shape.HasLabel(1):
        raise ImageContentError("tumour", "tumour mask is empty (no voxel > 0)")
    start, size = np.split(np.array(shape.GetBoundingBox(1)), 2)
    corners = np.array(
        [
            tumour.TransformContinuousIndexToPhysicalPoint(
                [float(s - 0.5 + c * n) for s, c, n in zip(start, corner, size, strict=True)]
            )
            for corner in np.ndindex(2, 2, 2)
        ]
    )  # outer faces of the tumour's bounding box, LPS mm
    low, high = corners.min(axis=0), corners.max(axis=0)

    # Grid voxel centres sit a third of a grid voxel past the scan's first voxel centre, whatever
    # the crop: nearest-neighbour resampling then never meets a sample exactly halfway between
    # two scan voxels when one spacing is a whole multiple of the other (up or down), where the
    # outcome would hang on rounding.
    spacing = np.array(settings.spacing_mm)
    anchor = np.array(ct.GetOrigin()) + spacing / 3
    n_deep = np.array(settings.crop_voxels)
    deep_first = np.rint(((low + high) / 2 - anchor) / spacing - (n_deep - 1) / 2).astype(int)
    context = ring_margin_mm + settings.crop_margin_mm
    first = np.floor((low - context - anchor) / spacing).astype(int)
    last = np.ceil((high + context - anchor) / spacing).astype(int)
    grid_first = np.minimum(first, deep_first)
    grid_size = np.maximum(last, deep_first + n_deep - 1) - grid_first + 1

    def resample(image: sitk.Image, interpolator: int, default: float, pixel: int) -> sitk.Image:
        return sitk.Resample(
            image,
            [int(n) for n in grid_size],
            sitk.Transform(),
            interpolator,
            [float(o) for o in anchor + grid_first * spacing],
            [float(s) for s in spacing],
            np.eye(3).ravel().tolist(),
            default,
            pixel,
        )

    interpolator = _INTERPOLATORS[settings.ct_interpolator]
    ct = resample(ct, interpolator, OUTSIDE_FOV_HU, sitk.sitkFloat32)
    ct = sitk.Clamp(ct, sitk.sitkFloat32, *map(float, settings.hu_window))
    tumour = resample(tumour, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    body = resample(body, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(tumour).any():
        raise ImageContentError(
            "tumour",
            f"tumour mask has no voxel left after resampling to {_mm(spacing)} mm"
            f" (smallest original extent {_mm(high - low)} mm)",
        )
    return PreparedPatient(
        ct=ct,
        tumour=tumour,
        body=body,
        radiomics_box=_box(first - grid_first, last - first + 1),
        deep_box=_box(deep_first - grid_first, n_deep),
    )


def save_crop(path: Path, prepared: PreparedPatient, ring: sitk.Image) -> None:
    """Write the deep crop of ``prepared`` (+ ``ring`` on the same grid) to ``path`` (.npz)
    atomically: ``ct`` int16 HU, ``tumour``/``ring`` uint8, all (z, y, x) = ``crop_voxels``
    reversed; ``spacing_mm`` and ``origin_mm`` (x, y, z, LPS mm)."""
    box = prepared.deep_box
    origin = prepared.ct.TransformIndexToPhysicalPoint(box.start)

    def write(partial: Path) -> None:
        with open(partial, "wb") as handle:
            np.savez_compressed(
                handle,
                ct=np.rint(box.array(prepared.ct)).astype(np.int16),
                tumour=box.array(prepared.tumour),
                ring=box.array(ring),
                spacing_mm=np.array(prepared.ct.GetSpacing()),
                origin_mm=np.array(origin),
            )

    write_atomically(path, write)


def _box(start: np.ndarray, size: np.ndarray) -> Box:
    return Box(tuple(int(v) for v in start), tuple(int(v) for v in size))


def _mm(values: np.ndarray) -> str:
    return "x".join(f"{v:.3g}" for v in values)
