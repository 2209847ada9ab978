"""The packed cohort (``fedmets.simulation.packed_cohort``) that carries an extracted cohort to a
GPU machine: the sites, feature tables, reports and ground truth come back byte for byte, the
masks exactly, the CT within half a step inside the image models' window (and so every model
input within that), and the study's pooled worker reads the unpacked cohort as the original."""

from __future__ import annotations

import numpy as np
import pytest

from fedmets.client.crops import HU_WINDOW, load_crops
from fedmets.client.site_files import FEATURES_FILE, crop_path
from fedmets.client.site_worker import load_site_data
from fedmets.shared.config import load_site_config
from fedmets.simulation.packed_cohort import pack_cohort, unpack_cohort

pytestmark = pytest.mark.slow  # the tiny cohort extracted (the session's shared fixture)


@pytest.fixture(scope="module")
def unpacked(tiny_extracted, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    summary = pack_cohort(tiny_extracted, root / "cohort.zip", hu_step=10.0)
    return summary, unpack_cohort(root / "cohort.zip", root / "cohort")


def _configs(cohort):
    return [load_site_config(p) for p in sorted(cohort.glob("*/site.toml"))]


def test_the_sites_come_back_byte_for_byte(tiny_extracted, unpacked):
    summary, cohort = unpacked
    originals = _configs(tiny_extracted)
    assert [c.site_id for c in _configs(cohort)] == [c.site_id for c in originals]
    for original in originals:
        for path in (original.source, original.paths.output / FEATURES_FILE):
            relative = path.resolve().relative_to(tiny_extracted.resolve())
            assert (cohort / relative).read_bytes() == path.read_bytes()
    truth = sorted(p.name for p in (tiny_extracted / "ground_truth").glob("*"))
    assert truth and sorted(p.name for p in (cohort / "ground_truth").glob("*")) == truth
    assert summary["patients"] == sum(len(load_site_data([c]).ids) for c in originals)
    assert summary["rounding_sd_hu"] == pytest.approx(10 / 12**0.5)


def test_crops_come_back_within_half_a_step_in_the_window(tiny_extracted, unpacked):
    _, cohort = unpacked
    low, high = HU_WINDOW
    for original, copy in zip(_configs(tiny_extracted), _configs(cohort), strict=True):
        data = load_site_data([original])
        for patient in data.ids:
            before = np.load(crop_path(original, patient))
            after = np.load(crop_path(copy, patient))
            for key in ("tumour", "ring", "spacing_mm", "origin_mm"):
                np.testing.assert_array_equal(after[key], before[key])
            clipped = np.clip(before["ct"], low, high)
            assert np.abs(after["ct"] - clipped).max() <= 5
        side = np.load(data.crops[0])["ct"].shape[0]
        inputs = [load_crops(load_site_data([c]).crops, side, "ring") for c in (original, copy)]
        assert np.abs(inputs[0] - inputs[1]).max() <= 5 / (high - low) + 1e-6


def test_the_study_reads_the_unpacked_cohort_as_the_original(tiny_extracted, unpacked):
    _, cohort = unpacked
    before, after = (load_site_data(_configs(c)) for c in (tiny_extracted, cohort))
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.labels, before.labels)
    assert after.radiomics.equals(before.radiomics)


def test_a_cohort_without_features_is_named(tiny_cohort, tmp_path):
    with pytest.raises(ValueError, match="no .*features.parquet; extract the site first"):
        pack_cohort(tiny_cohort, tmp_path / "x.zip")
