"""Synthetic multi-site HNSCC cohort: presets, per-site scanner traits, per-patient clinical
variables and latent tumour factors, and the distant-metastasis (DM) risk model.

This module only samples tables (fast, vectorised); `fedmets.simulation.synth` renders the images
and writes the files. The risk model is documented in docs/synthetic_cohort.md.

Latent image factors (z_*) are standard normal; the tumour traits handed to the renderer are
derived from them (volume in cc, necrosis/heterogeneity/irregularity/infiltration in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import expit, ndtr
from sklearn.metrics import roc_auc_score

SUBSITES = ("oropharynx", "larynx", "hypopharynx", "nasopharynx", "oral_cavity")
# Subsite mix of real cohorts (../shared/data/real/README.md), normalised.
SUBSITE_BASE_MIX = np.array([0.57, 0.21, 0.05, 0.10, 0.03]) / 0.96
SMOKING_LEVELS = ("never", "ex", "current")
SMOKING_MIX = np.array([0.27, 0.39, 0.34])
T_STAGE_MIX = np.array([0.15, 0.35, 0.28, 0.22])  # T1..T4
N_STAGE_MIX = np.array([0.30, 0.15, 0.45, 0.10])  # N0..N3
SLICE_THICKNESSES_MM = (1.25, 2.0, 2.5, 3.0)
# Subsite shift of log tumour volume (larynx small, nasopharynx/hypopharynx large).
SUBSITE_LOG_VOLUME_SHIFT = {
    "oropharynx": 0.0,
    "larynx": -0.35,
    "hypopharynx": 0.25,
    "nasopharynx": 0.2,
    "oral_cavity": -0.2,
}
MANIFEST_CLINICAL_COLUMNS = (
    "age",
    "sex",
    "smoking",
    "alcohol",
    "t_stage",
    "n_stage",
    "hpv",
    "subsite",
)


@dataclass(frozen=True)
class RiskModel:
    """Log-odds weights of the DM risk model. Image weights act on standard-normal latents;
    clinical weights on the encoded variables. `scale` multiplies every weight (signal strength);
    each site's intercept is then solved so that its expected prevalence hits its target."""

    log_volume: float = 0.65
    necrosis: float = 0.55
    heterogeneity: float = 0.25
    irregularity: float = 0.55
    infiltration: float = 0.65
    n_stage: float = 0.55  # per N step (N0..N3)
    hpv_negative: float = 0.75  # HPV-negative or unknown-negative disease
    hypopharynx: float = 0.6
    nasopharynx: float = 0.35
    current_smoker: float = 0.3
    age_per_decade: float = 0.1
    scale: float = 1.2

    def image_logit(self, latents: pd.DataFrame) -> np.ndarray:
        """Image part of the log-odds, shape (n,), from the z_* latent columns."""
        return self.scale * (
            self.log_volume * latents["z_log_volume"].to_numpy()
            + self.necrosis * latents["z_necrosis"].to_numpy()
            + self.heterogeneity * latents["z_heterogeneity"].to_numpy()
            + self.irregularity * latents["z_irregularity"].to_numpy()
            + self.infiltration * latents["z_infiltration"].to_numpy()
        )

    def clinical_logit(self, clinical: pd.DataFrame, hpv_true: np.ndarray) -> np.ndarray:
        """Clinical part of the log-odds, shape (n,). Uses the true HPV status (also when the
        manifest reports it missing)."""
        n_step = clinical["n_stage"].str[1].astype(int).to_numpy() - 1.5
        subsite = clinical["subsite"].to_numpy()
        return self.scale * (
            self.n_stage * n_step
            + self.hpv_negative * (~hpv_true).astype(float)
            + self.hypopharynx * (subsite == "hypopharynx")
            + self.nasopharynx * (subsite == "nasopharynx")
            + self.current_smoker * (clinical["smoking"].to_numpy() == "current")
            + self.age_per_decade * (clinical["age"].to_numpy() - 62.0) / 10.0
        )


@dataclass(frozen=True)
class Preset:
    """Cohort size and image geometry of a preset."""

    name: str
    default_sites: int
    total_patients: int
    largest_to_smallest: float  # ratio of the largest to the smallest site
    fov_mm: tuple[float, float, float]  # (x, y, z)
    fixed_spacing_mm: tuple[float, float, float] | None  # None: per-site scanner spacing
    prevalence_range: tuple[float, float]  # range of per-site target prevalences
    description: str
    # Draw exactly round(target * n) positives per site (weighted by true risk) instead of one
    # Bernoulli per patient: keeps every fold of a tiny site supplied with positives.
    fixed_positive_count: bool = False
    # PyRadiomics parameter set written into the site configs ("default" = full, "fast" = CPU).
    radiomics_params: str = "default"
    # The sites' [policy]: their own folds, inner validation share and release floor.
    site_folds: int = 5
    site_validation_fraction: float = 0.2
    site_min_patients: int = 5


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        default_sites=3,
        total_patients=48,
        largest_to_smallest=1.0,
        fov_mm=(150.0, 130.0, 100.0),
        fixed_spacing_mm=(3.0, 3.0, 4.0),
        prevalence_range=(0.25, 0.35),
        description="plumbing tests: a dozen patients per site, coarse voxels, enriched DM",
        fixed_positive_count=True,
        radiomics_params="fast",
        site_folds=3,  # 16-24 patients a site: 5-8 per fold
        site_validation_fraction=0.3,  # inner validation sets of 3-5 patients
        site_min_patients=3,
    ),
    "demo": Preset(
        name="demo",
        default_sites=4,
        total_patients=400,
        largest_to_smallest=4.0,
        fov_mm=(150.0, 130.0, 100.0),
        fixed_spacing_mm=None,
        prevalence_range=(0.05, 0.27),
        description="~400 patients over 4 sites, realistic scanners; minutes on 2 CPU cores",
    ),
    "quickstart": Preset(
        name="quickstart",
        default_sites=4,
        total_patients=240,
        largest_to_smallest=3.0,
        fov_mm=(150.0, 130.0, 100.0),
        fixed_spacing_mm=None,
        prevalence_range=(0.12, 0.30),
        description=(
            "the README's main job: ~240 patients over 4 sites, realistic scanners, DM enriched"
            " to ~20 %, fast radiomics, 3 folds; ~11 minutes end to end on 2 CPU cores"
        ),
        radiomics_params="fast",
        site_folds=3,
        # 31-97 patients a site: inner validation sets of 7-23 patients, 1-4 score groups of 5
        # behind each validation loss (0.2: 4-13 patients, at most 2 groups; docs/federated.md)
        site_validation_fraction=0.35,
    ),
    "paper": Preset(
        name="paper",
        default_sites=6,
        total_patients=1497,
        largest_to_smallest=15.0,
        fov_mm=(150.0, 130.0, 100.0),
        fixed_spacing_mm=None,
        prevalence_range=(0.05, 0.27),
        description="1497 patients like the reference study, sites of ~40 to ~600 patients",
    ),
}


@dataclass(frozen=True)
class SiteSpec:
    """One synthetic hospital: size, case mix and scanner."""

    index: int
    site_id: str
    code: str  # patient-id prefix, e.g. "HA"
    n_patients: int
    target_prevalence: float
    subsite_mix: tuple[float, ...]  # over SUBSITES
    spacing_mm: tuple[float, float, float]  # (x, y, z)
    noise_hu: float
    hu_offset: float
    blur_mm: float
    contrast_fraction: float


@dataclass
class CohortTables:
    """Everything sampled for a cohort, one row per patient (ordered by site, then patient)."""

    sites: list[SiteSpec]
    manifest: pd.DataFrame  # patient_id, site_id + MANIFEST_CLINICAL_COLUMNS + dm (missing = NaN)
    truth: pd.DataFrame  # patient_id, site_id, true_risk, logits, latents, tumour traits
    risk_model: RiskModel = field(default_factory=RiskModel)


def site_name(index: int) -> tuple[str, str]:
    """(site_id, patient-id prefix) for site `index`: hospital_a/HA, ..., hospital_aa/HAA."""
    letters = ""
    i = index
    while True:
        letters = chr(ord("a") + i % 26) + letters
        i = i // 26 - 1
        if i < 0:
            break
    return f"hospital_{letters}", "H" + letters.upper()


def site_sizes(total: int, n_sites: int, largest_to_smallest: float) -> list[int]:
    """Geometric site sizes, largest first, summing to `total` (each at least 4 patients)."""
    if n_sites < 1:
        raise ValueError(f"need at least 1 site, got {n_sites}")
    if total < 4 * n_sites:
        raise ValueError(f"{total} patients cannot fill {n_sites} sites of at least 4 patients")
    ratio = largest_to_smallest ** (-1.0 / max(n_sites - 1, 1))
    weights = ratio ** np.arange(n_sites)
    sizes = np.maximum(np.floor(total * weights / weights.sum()).astype(int), 4)
    sizes[0] += total - sizes.sum()
    return sizes.tolist()


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _site_prevalences(
    sizes: list[int], prevalence_range: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """Per-site target DM prevalence: log-odds spread around a common level, shifted so that the
    size-weighted mean is the range's centre of mass (~12% for realistic presets) and clipped to
    the range."""
    low, high = prevalence_range
    overall = 0.12 if low < 0.12 < high else 0.5 * (low + high)
    spread = rng.normal(0.0, 0.6, len(sizes))
    weights = np.asarray(sizes) / np.sum(sizes)
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        mean = weights @ np.clip(expit(mid + spread), low, high)
        lo, hi = (mid, hi) if mean < overall else (lo, mid)
    return np.clip(expit(0.5 * (lo + hi) + spread), low, high).round(4)


def make_sites(preset: Preset, n_sites: int, seed: int) -> list[SiteSpec]:
    """Per-site size, target prevalence, subsite mix and scanner traits, from the cohort seed."""
    sizes = site_sizes(preset.total_patients, n_sites, preset.largest_to_smallest)
    prevalences = _site_prevalences(sizes, preset.prevalence_range, _rng(seed, 0))
    sites = []
    for index, (n, prevalence) in enumerate(zip(sizes, prevalences, strict=True)):
        rng = _rng(seed, 0, index)
        site_id, code = site_name(index)
        if preset.fixed_spacing_mm is not None:
            spacing = preset.fixed_spacing_mm
        else:
            in_plane = round(float(rng.uniform(0.7, 1.2)), 3)
            spacing = (in_plane, in_plane, float(rng.choice(SLICE_THICKNESSES_MM)))
        sites.append(
            SiteSpec(
                index=index,
                site_id=site_id,
                code=code,
                n_patients=int(n),
                target_prevalence=prevalence,
                subsite_mix=tuple(rng.dirichlet(SUBSITE_BASE_MIX * 25.0).round(4)),
                spacing_mm=spacing,
                noise_hu=round(float(rng.uniform(8.0, 25.0)), 1),
                hu_offset=round(float(rng.uniform(-15.0, 15.0)), 1),
                blur_mm=round(float(rng.uniform(0.4, 0.9)), 2),
                contrast_fraction=round(float(rng.uniform(0.3, 0.9)), 2),
            )
        )
    return sites


def _ordinal(latent: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """Cut a standard-normal-ish latent into categories 0..len(mix)-1 with marginals `mix`."""
    from scipy.stats import norm

    cuts = norm.ppf(np.cumsum(mix)[:-1])
    return np.searchsorted(cuts, latent)


def _sample_site(site: SiteSpec, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Clinical table, latent table and true HPV status for one site."""
    rng = _rng(seed, 1, site.index)
    n = site.n_patients
    mix = np.asarray(site.subsite_mix) / np.sum(site.subsite_mix)
    subsite = np.array(SUBSITES)[rng.choice(len(SUBSITES), size=n, p=mix)]
    male = rng.random(n) < 0.79
    smoking = np.array(SMOKING_LEVELS)[rng.choice(3, size=n, p=SMOKING_MIX)]
    hpv_logit = np.where(subsite == "oropharynx", 0.9, -2.4)
    hpv_logit = hpv_logit - 0.9 * (smoking == "current") + 0.8 * (smoking == "never")
    hpv = rng.random(n) < expit(hpv_logit)
    age = np.clip(np.round(rng.normal(62.0, 11.0, n) - 4.0 * hpv + 2.0), 25, 92).astype(int)
    alcohol = rng.random(n) < np.where(smoking == "never", 0.45, 0.68)

    # Tumour latents: volume ~ log-normal (median ~20 cc, IQR ~10-45 cc), necrosis and
    # heterogeneity grow with volume; irregularity and infiltration are independent of the clinic.
    z_log_volume = rng.standard_normal(n)
    shift = np.array([SUBSITE_LOG_VOLUME_SHIFT[s] for s in subsite])
    log_volume_cc = np.log(20.0) + shift + 1.0 * z_log_volume
    z_necrosis = 0.35 * z_log_volume + np.sqrt(1 - 0.35**2) * rng.standard_normal(n)
    z_heterogeneity = 0.5 * z_necrosis + np.sqrt(1 - 0.5**2) * rng.standard_normal(n)
    z_irregularity = rng.standard_normal(n)
    z_infiltration = rng.standard_normal(n)

    t_latent = 0.85 * (log_volume_cc - np.log(20.0)) / 1.0 + 0.55 * rng.standard_normal(n)
    t_stage = _ordinal(t_latent, T_STAGE_MIX) + 1
    n_latent = (
        0.55 * hpv + 0.3 * z_log_volume + 0.4 * np.isin(subsite, ["hypopharynx", "nasopharynx"])
    )
    n_stage = _ordinal(n_latent - 0.3 + rng.standard_normal(n) * 0.95, N_STAGE_MIX)

    # Missing values as a hospital has them: HPV often untested outside the oropharynx.
    hpv_missing = rng.random(n) < np.where(subsite == "oropharynx", 0.08, 0.3)
    alcohol_missing = rng.random(n) < 0.15
    smoking_missing = rng.random(n) < 0.04
    clinical = pd.DataFrame(
        {
            "patient_id": [f"{site.code}-{i + 1:04d}" for i in range(n)],
            "site_id": site.site_id,
            "age": age,
            "sex": np.where(male, "M", "F"),
            "smoking": np.where(smoking_missing, None, smoking),
            "alcohol": np.where(alcohol_missing, None, np.where(alcohol, "yes", "no")),
            "t_stage": [f"T{t}" for t in t_stage],
            "n_stage": [f"N{k}" for k in n_stage],
            "hpv": np.where(hpv_missing, None, np.where(hpv, "positive", "negative")),
            "subsite": subsite,
        }
    )
    latents = pd.DataFrame(
        {
            "z_log_volume": z_log_volume,
            "z_necrosis": z_necrosis,
            "z_heterogeneity": z_heterogeneity,
            "z_irregularity": z_irregularity,
            "z_infiltration": z_infiltration,
            "tumour_volume_cc": np.clip(np.exp(log_volume_cc), 1.0, 150.0).round(2),
            "necrosis": ndtr(z_necrosis).round(4),
            "heterogeneity": ndtr(z_heterogeneity).round(4),
            "irregularity": ndtr(z_irregularity).round(4),
            "infiltration": ndtr(z_infiltration).round(4),
            "contrast": rng.random(n) < site.contrast_fraction,
            "body_scale": np.clip(rng.normal(1.0, 0.06, n), 0.88, 1.15).round(3),
            "hpv_true": hpv,
        }
    )
    # Smoking for the risk model: a missing entry still has a true value.
    risk_clinical = clinical.assign(smoking=smoking)
    return clinical, latents, risk_clinical


def _solve_intercept(logit: np.ndarray, prevalence: float) -> float:
    """Intercept b such that mean(sigmoid(b + logit)) equals `prevalence` (bisection)."""
    low, high = -20.0, 20.0
    for _ in range(80):
        mid = 0.5 * (low + high)
        if expit(mid + logit).mean() < prevalence:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def _draw_labels(
    risk: np.ndarray, prevalence: float, fixed_count: bool, rng: np.random.Generator
) -> np.ndarray:
    """DM labels (0/1, shape (n,)): Bernoulli(risk), or exactly round(prevalence * n) positives
    drawn without replacement with probability proportional to risk."""
    if not fixed_count:
        return (rng.random(risk.size) < risk).astype(int)
    labels = np.zeros(risk.size, dtype=int)
    positives = rng.choice(
        risk.size, size=round(prevalence * risk.size), replace=False, p=risk / risk.sum()
    )
    labels[positives] = 1
    return labels


def sample_cohort(
    preset: Preset, n_sites: int, seed: int, risk_model: RiskModel | None = None
) -> CohortTables:
    """Sample every site's clinical table, latents, true risk and DM label (no images)."""
    risk_model = risk_model or RiskModel()
    sites = make_sites(preset, n_sites, seed)
    manifests, truths = [], []
    for site in sites:
        clinical, latents, risk_clinical = _sample_site(site, seed)
        image_logit = risk_model.image_logit(latents)
        clinical_logit = risk_model.clinical_logit(risk_clinical, latents["hpv_true"].to_numpy())
        intercept = _solve_intercept(image_logit + clinical_logit, site.target_prevalence)
        logit = intercept + image_logit + clinical_logit
        risk = expit(logit)
        dm = _draw_labels(
            risk, site.target_prevalence, preset.fixed_positive_count, _rng(seed, 2, site.index)
        )
        manifests.append(clinical.assign(dm=dm))
        truths.append(
            pd.concat(
                [
                    clinical[["patient_id", "site_id"]],
                    pd.DataFrame(
                        {
                            "dm": dm,
                            "true_risk": risk.round(6),
                            "logit": logit.round(5),
                            "image_logit": image_logit.round(5),
                            "clinical_logit": clinical_logit.round(5),
                            "site_intercept": round(intercept, 5),
                        }
                    ),
                    latents,
                ],
                axis=1,
            )
        )
    return CohortTables(
        sites=sites,
        manifest=pd.concat(manifests, ignore_index=True),
        truth=pd.concat(truths, ignore_index=True),
        risk_model=risk_model,
    )


def _auc(label: pd.Series, score: pd.Series) -> float | None:
    return None if label.nunique() < 2 else round(float(roc_auc_score(label, score)), 4)


def oracle_aucs(truth: pd.DataFrame) -> dict:
    """AUC of the true risk against the label, pooled and per site, and the ceilings of each part
    of the risk model alone (image part, clinical part)."""
    return {
        "pooled": _auc(truth["dm"], truth["true_risk"]),
        "per_site": {
            site: _auc(rows["dm"], rows["true_risk"]) for site, rows in truth.groupby("site_id")
        },
        "image_part_only": _auc(truth["dm"], truth["image_logit"]),
        "clinical_part_only": _auc(truth["dm"], truth["clinical_logit"]),
    }
