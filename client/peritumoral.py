"""The peritumoral ring: tissue within a margin (mm) around the tumour.

ring = {voxels outside the tumour whose centre lies within ``margin_mm`` of a tumour voxel centre,
measured in millimetres (SimpleITK signed Maurer distance map with the image spacing, so the ring
is equally thick along every axis whatever the voxel size)}
∩ body (``fedmets.client.preprocess.body_mask``)
∩ {air_threshold_hu <= HU <= bone_threshold_hu} (air and bone removed).

Defaults (site config ``[radiomics] peritumoral_margin_mm`` and ``[preprocess]``): margin 5 mm,
body > -500 HU, air < -200 HU, bone > 300 HU.
"""

from __future__ import annotations

import SimpleITK as sitk

from fedmets.client.preprocess import ImageContentError


def peritumoral_ring(
    ct: sitk.Image,
    tumour: sitk.Image,
    body: sitk.Image,
    margin_mm: float,
    air_threshold_hu: float = -200.0,
    bone_threshold_hu: float = 300.0,
) -> sitk.Image:
    """The ring as uint8 0/1 on the grid shared by ``ct`` (HU), ``tumour`` and ``body`` (0/1).

    Raises ImageContentError when no voxel is left (tumour surrounded by air, bone or the edge of
    the body)."""
    distance_mm = sitk.SignedMaurerDistanceMap(
        tumour > 0, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    shell = (distance_mm > 0) & (distance_mm <= margin_mm)
    tissue = (ct >= air_threshold_hu) & (ct <= bone_threshold_hu)
    ring = shell & (body > 0) & tissue
    if not sitk.GetArrayViewFromImage(ring).any():
        raise ImageContentError(
            "tumour",
            f"peritumoral ring is empty: no body voxel within {margin_mm:g} mm of the tumour has"
            f" {air_threshold_hu:g} <= HU <= {bone_threshold_hu:g}",
        )
    return sitk.Cast(ring, sitk.sitkUInt8)
