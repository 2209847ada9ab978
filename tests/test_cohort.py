"""Synthetic cohort tables: marginals against the real cohorts' figures, the risk model's oracle
AUC, non-IID sites and determinism (no images: see test_synth.py for the files)."""

import numpy as np
import pandas as pd
import pytest

from fedmets.simulation.cohort import PRESETS, oracle_aucs, sample_cohort, site_name, site_sizes


@pytest.fixture(scope="module")
def paper():
    """Three paper-sized cohorts (~4500 patients) pooled, for tight marginal checks."""
    cohorts = [sample_cohort(PRESETS["paper"], 6, seed) for seed in (1, 2, 3)]
    return cohorts


def _pooled(cohorts, attribute):
    return pd.concat([getattr(c, attribute) for c in cohorts], ignore_index=True)


def test_same_seed_same_tables_and_different_seed_differs():
    a = sample_cohort(PRESETS["demo"], 4, 11)
    b = sample_cohort(PRESETS["demo"], 4, 11)
    c = sample_cohort(PRESETS["demo"], 4, 12)
    pd.testing.assert_frame_equal(a.manifest, b.manifest)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    assert not a.truth["true_risk"].equals(c.truth["true_risk"])


def test_clinical_marginals_match_real_cohorts(paper):
    manifest = _pooled(paper, "manifest")
    assert manifest["age"].mean() == pytest.approx(62, abs=1.5)
    assert manifest["age"].std() == pytest.approx(11, abs=1.5)
    assert (manifest["sex"] == "M").mean() == pytest.approx(0.79, abs=0.03)
    smoking = manifest["smoking"].value_counts(normalize=True)
    assert smoking["current"] == pytest.approx(0.34, abs=0.04)
    assert smoking["ex"] == pytest.approx(0.39, abs=0.04)
    assert smoking["never"] == pytest.approx(0.27, abs=0.04)
    assert (manifest["alcohol"].dropna() == "yes").mean() == pytest.approx(0.62, abs=0.05)
    subsite = manifest["subsite"].value_counts(normalize=True)
    assert 0.45 <= subsite["oropharynx"] <= 0.68
    assert 0.13 <= subsite["larynx"] <= 0.28
    assert 0.07 <= subsite["nasopharynx"] <= 0.14
    assert 0.03 <= subsite["hypopharynx"] <= 0.08
    assert 0.01 <= subsite["oral_cavity"] <= 0.05


def test_missing_values_are_explicit_not_imputed(paper):
    manifest = paper[0].manifest
    for column, low, high in (("hpv", 0.1, 0.3), ("alcohol", 0.1, 0.2), ("smoking", 0.01, 0.08)):
        share = manifest[column].isna().mean()
        assert low <= share <= high, f"{column}: {share:.2f} missing"
    assert manifest[["age", "sex", "t_stage", "n_stage", "subsite", "dm"]].notna().all().all()


def test_tumour_volume_is_lognormal_around_20cc_and_larger_in_dm(paper):
    truth = _pooled(paper, "truth")
    q25, median, q75 = np.percentile(truth["tumour_volume_cc"], [25, 50, 75])
    assert median == pytest.approx(20, abs=3)
    assert q25 == pytest.approx(10, abs=3)
    assert q75 == pytest.approx(45, abs=8)
    by_label = truth.groupby("dm")["tumour_volume_cc"].median()
    assert 1.5 <= by_label[1] / by_label[0] <= 3.0


def test_dm_prevalence_overall_and_per_site(paper):
    for cohort in paper:
        assert cohort.truth["true_risk"].mean() == pytest.approx(0.12, abs=0.01)
        assert cohort.manifest["dm"].mean() == pytest.approx(0.12, abs=0.03)
        expected = cohort.truth.groupby("site_id")["true_risk"].mean()
        assert expected.between(0.049, 0.271).all(), expected.to_dict()
        assert expected.max() - expected.min() > 0.04  # sites differ


def test_dm_rises_with_stage_and_is_higher_in_hpv_negative(paper):
    manifest = _pooled(paper, "manifest")
    by_n = manifest.groupby("n_stage")["dm"].mean()
    by_t = manifest.groupby("t_stage")["dm"].mean()
    assert by_n["N0"] < by_n["N1"] < by_n["N2"] < by_n["N3"]
    assert by_t["T1"] < by_t["T2"] < by_t["T3"] < by_t["T4"]
    assert 0.02 <= by_n["N0"] <= 0.09 and 0.2 <= by_n["N3"] <= 0.4
    by_hpv = manifest.groupby("hpv")["dm"].mean()
    assert by_hpv["negative"] > 1.3 * by_hpv["positive"]


def test_oracle_auc_in_range_and_both_parts_carry_signal(paper):
    for cohort in paper:
        oracle = oracle_aucs(cohort.truth)
        assert 0.85 <= oracle["pooled"] <= 0.91
        # Image-only and clinical-only ceilings are both informative and both below the whole.
        assert 0.6 < oracle["clinical_part_only"] < oracle["pooled"] - 0.1
        assert 0.75 < oracle["image_part_only"] < oracle["pooled"]


def test_sites_are_non_iid(paper):
    cohort = paper[0]
    sizes = [site.n_patients for site in cohort.sites]
    assert sum(sizes) == 1497 and min(sizes) <= 50 and max(sizes) >= 550
    spacings = {site.spacing_mm for site in cohort.sites}
    assert len(spacings) == len(cohort.sites)
    for site in cohort.sites:
        assert 0.7 <= site.spacing_mm[0] <= 1.2 and 1.25 <= site.spacing_mm[2] <= 3.0
    oropharynx_share = cohort.manifest.groupby("site_id")["subsite"].apply(
        lambda s: (s == "oropharynx").mean()
    )
    assert oropharynx_share.max() - oropharynx_share.min() > 0.05


def test_site_sizes_and_names():
    assert site_sizes(400, 4, 4.0) == [178, 110, 69, 43]
    assert sum(site_sizes(1497, 7, 15.0)) == 1497
    with pytest.raises(ValueError, match="cannot fill"):
        site_sizes(10, 4, 2.0)
    assert site_name(0) == ("hospital_a", "HA")
    assert site_name(27) == ("hospital_ab", "HAB")


def test_tiny_preset_has_positives_in_every_site():
    cohort = sample_cohort(PRESETS["tiny"], 3, 7)
    assert (cohort.manifest.groupby("site_id")["dm"].sum() >= 2).all()
