"""`fedmets site predict`: apply a model bundle (``fedmets.shared.bundle``) to a site's extracted
patients, locally: nothing is sent.

The site's features and crops (``fedmets site extract``) go through the same scoring code as in
the federated run (``fedmets.client.scoring``): the bundle's selected radiomics columns, found by
their PyRadiomics names and standardised with the pooled statistics; the clinical columns; the
image model's deep features, centred and projected; every fusion network, combined into each
model (ensembles, late fusion). A bundle that does not fit the site is refused with the
difference named: other extraction settings (``params_hash``), missing radiomics features, no
crops for a model with an image stage, no clinical columns for a model that reads them.

Writes per patient: the main model's DM risk (probability), its class at the bundle's threshold,
the input blocks (radiomics, clinical, deep) ranked by how much each raises that risk
(:func:`block_contributions`), and each model's risk. :func:`evaluate_bundle` is what a site
that did not train the model releases about it (held-out-site validation): what its evaluation
route releases, nothing per patient.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fedmets.client.harmonise import harmonised_for_bundle
from fedmets.client.policy import score_groups
from fedmets.client.recalibration import apply as apply_recalibration
from fedmets.client.recalibration import site_recalibration
from fedmets.client.scoring import image_config, load_networks, standardised_groups
from fedmets.client.site_worker import SiteData, digest, load_site_data
from fedmets.client.training import extract_deep_features, predict_proba, resolve_device, set_state
from fedmets.shared.bundle import Bundle, load_bundle
from fedmets.shared.config import SiteConfig
from fedmets.shared.files import write_atomically
from fedmets.shared.metrics import logit
from fedmets.shared.model_names import model_groups
from fedmets.shared.models import combine_scores


def new_patients_site(cfg: SiteConfig, manifest: Path) -> SiteConfig:
    """The site config that reads the patients of ``manifest`` (the site's manifest format, file
    paths relative to ``data.root``; the label column may be empty) into a cache and output of
    their own, ``<paths.cache>/predict/`` and ``<paths.output>/predict/<manifest name>/``, apart
    from the site's own extraction."""
    manifest = Path(manifest).resolve()
    return cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"manifest": manifest}),
            "paths": cfg.paths.model_copy(
                update={
                    "cache": cfg.paths.cache / "predict",
                    "output": cfg.paths.output / "predict" / manifest.stem,
                }
            ),
        }
    )


def extract_new_patients(
    cfg: SiteConfig,
    model_dir: Path,
    manifest: Path,
    on_patient_done: Callable[[int, int], None] | None = None,
    on_patient_checked: Callable[[int, int], None] | None = None,
) -> SiteConfig:
    """Check the patients of ``manifest`` and extract, of the radiomics, only the features the
    bundle in ``model_dir`` reads (and every crop); returns their site config
    (:func:`new_patients_site`), whose ``extraction_report.json`` lists the quarantined and
    failed patients. The feature table and report of an earlier list of the same file name
    are removed first: a list whose every patient fails leaves no table to score, not the
    earlier list's. The callbacks: progress, as for ``extract_site``."""
    from fedmets.client.extract import extract_site
    from fedmets.client.site_files import FEATURES_FILE, REPORT_FILE

    new = new_patients_site(cfg, manifest)
    features = load_bundle(model_dir).manifest["radiomics_features"]
    for earlier in (FEATURES_FILE, REPORT_FILE):
        (new.paths.output / earlier).unlink(missing_ok=True)
    extract_site(
        new,
        on_patient_done=on_patient_done,
        on_patient_checked=on_patient_checked,
        features=features,
        labelled=False,
    )
    return new


def predict_site(
    cfg: SiteConfig,
    model_dir: Path,
    out: Path | None = None,
    recalibrated: bool = True,
    site_output: Path | None = None,
    labelled_only: bool = False,
) -> pd.DataFrame:
    """Scores of every extracted patient of the site ``cfg`` (labelled or not) by the bundle in
    ``model_dir``: ``patient_id``, ``risk`` and ``dm_predicted`` (the main model's probability
    and its class at the bundle's threshold), ``model``, ``threshold``, ``top_blocks`` (the
    main model's input blocks, most risk-raising first: ``deep > clinical > radiomics``) and
    ``contribution:<block>`` (log-odds, :func:`block_contributions`), then ``risk:<model>``
    for every model. ``recalibrated``: when the site fitted a recalibration of this bundle
    (``fedmets site recalibrate``), ``risk`` is the recalibrated one, ``risk_bundle`` the
    bundle's own and ``recalibrated`` says so (the class stays the bundle's: recalibration keeps
    the ranking). A bundle whose run harmonised the radiomics (ComBat) is applied to them
    harmonised as the run did (``fedmets.client.harmonise``; column ``harmonised``: ``site``,
    ``own-batch`` or ``none``). ``site_output``: where the site keeps its recalibration and
    ComBat corrections (default ``cfg.paths.output``; new patients' configs keep their output
    apart). ``labelled_only``: the labelled patients alone, also in the own-batch ComBat fit
    (what a release on them is computed from). Written atomically to ``out`` (CSV) when given.
    ValueError names what does not fit."""
    bundle = load_bundle(model_dir)
    manifest = bundle.manifest
    site_output = Path(site_output or cfg.paths.output)
    data = load_site_data([cfg], unlabelled=not labelled_only)
    columns = _check_fit(bundle, data, cfg)
    data, harmonised = harmonised_for_bundle(data, bundle, cfg.site_id, site_output)
    deep = None
    if manifest["image"] is not None:
        from fedmets.client.crops import CropDataset, load_crops
        from fedmets.shared.image_models import build_image_model

        settings = image_config(manifest["image"])
        model = build_image_model(settings)
        set_state(model, bundle.image_weights())
        images = load_crops(data.crops, settings.crop_voxels, manifest["image"]["mask_channel"])
        device = resolve_device(cfg.compute.device)
        deep = extract_deep_features(model, CropDataset(images), device)
    groups = standardised_groups(data, bundle.standardise(), deep, columns)
    scores = _scores(bundle, groups)
    main = manifest["main_model"]
    threshold = float(manifest["thresholds"][main])
    contributions = block_contributions(bundle, groups, scores[main])
    ranked = sorted(contributions, key=lambda g: -contributions[g].mean())  # for stable ties
    table = pd.DataFrame(
        {
            "patient_id": data.ids,
            "risk": scores[main],
            "dm_predicted": (scores[main] >= threshold).astype(int),
            "model": main,
            "threshold": threshold,
            "top_blocks": [
                " > ".join(sorted(ranked, key=lambda g, i=i: -contributions[g][i]))
                for i in range(len(data.ids))
            ],
        }
    )
    fitted = site_recalibration(site_output, bundle.digest()) if recalibrated else None
    table["recalibrated"] = fitted is not None
    table["harmonised"] = harmonised
    if fitted is not None:
        table.insert(2, "risk_bundle", table["risk"])
        table["risk"] = apply_recalibration(
            table["risk_bundle"], fitted["slope"], fitted["intercept"]
        )
    for block in ranked:
        table[f"contribution:{block}"] = contributions[block]
    for name in manifest["models"]:
        table[f"risk:{name}"] = scores[name]
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, lambda path: table.to_csv(path, index=False))
    return table


def _scores(bundle: Bundle, groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every model's DM probability (n,) from the feature ``groups``, as the run combined them."""
    manifest = bundle.manifest
    networks = load_networks(bundle.fusion_weights(), groups, manifest["fusion"])
    return combine_scores(
        {name: predict_proba(net, X) for name, (net, X) in networks.items()},
        manifest["models"],
        manifest["fusion"]["mode"],
    )


def block_contributions(
    bundle: Bundle, groups: dict[str, np.ndarray], risk: np.ndarray
) -> dict[str, np.ndarray]:
    """Per input block the main model reads (radiomics, clinical, deep), per patient (n,): how
    much it moves the model's log-odds, ``logit(risk) - logit(risk with that block at the
    training cohort's mean)`` (the mean is 0 once standardised). Positive: the block raises
    this patient's risk. Occlusion of one block at a time; the blocks' effects need not add up
    to the log-odds (the network is not additive)."""
    main = bundle.manifest["main_model"]
    contributions = {}
    for block in model_groups(main):
        occluded = {**groups, block: np.zeros_like(groups[block])}
        contributions[block] = logit(risk) - logit(_scores(bundle, occluded)[main])
    return contributions


def _check_fit(bundle: Bundle, data: SiteData, cfg: SiteConfig) -> np.ndarray:
    """The site's indices of the bundle's radiomics features (k,); ValueError naming every way
    the site does not fit the bundle."""
    manifest = bundle.manifest
    problems = []
    if digest(data.settings) != manifest["params_hash"]:
        problems.append(
            f"extraction settings differ (params_hash {digest(data.settings):.16} here, "
            f"{manifest['params_hash']:.16} in the bundle): extract with the radiomics "
            "parameters, margin and preprocessing the federation used"
        )
    names = list(data.radiomics.columns)
    missing = [f for f in manifest["radiomics_features"] if f not in names]
    if missing:
        problems.append(
            f"{len(missing)} radiomics features of the bundle missing, e.g. {missing[0]}"
        )
    if manifest["image"] is not None and data.crops is None:
        problems.append("the model has an image stage, and this site has no crops (tabular)")
    if manifest["clinical_columns"] and data.clinical is None:
        problems.append("the model reads clinical columns, and this site has none")
    if problems:
        raise ValueError(
            f"{cfg.site_id}: the bundle does not fit this site: " + "; ".join(problems)
        )
    return np.array([names.index(f) for f in manifest["radiomics_features"]], dtype=int)


def evaluate_bundle(cfg: SiteConfig, model_dir: Path, bins: int) -> dict:
    """A held-out site's evaluation of the bundle in ``model_dir`` on its labelled patients,
    under its ``[policy]``: per model (as ``query.evaluation`` releases, without subsites) the
    class-conditional score histograms over ``bins`` (ValueError over its ``max_bins``), the
    confusion counts (TP, FN, TN, FP) at the bundle's threshold and the Brier sum; for the main
    model the calibration slope and intercept (``calibration:<model>``, 2 numbers), all of
    them on groups of ``min_bin_count`` patients by score (``ScoreGroups``: each patient at its
    group's mean score). ValueError when the site
    has fewer labelled patients than its ``min_patients``."""
    manifest = load_bundle(model_dir).manifest
    labelled = load_site_data([cfg])
    policy = cfg.policy
    if bins > policy.max_bins:
        raise ValueError(
            f"{cfg.site_id}: {bins} histogram bins, over its max_bins {policy.max_bins}"
        )
    if len(labelled.ids) < policy.min_patients:
        raise ValueError(
            f"{cfg.site_id}: {len(labelled.ids)} labelled patients, under its min_patients "
            f"{policy.min_patients}: nothing to release"
        )
    # the labelled patients alone: an unlabelled one in the own-batch ComBat fit would move
    # every released statistic by its values, outside every set the policy admits
    table = predict_site(cfg, model_dir, recalibrated=False, labelled_only=True)
    table = table.set_index("patient_id").loc[labelled.ids]
    y = labelled.labels
    reply: dict = {"n": int(len(y))}
    for name in manifest["models"]:
        groups = score_groups(y, table[f"risk:{name}"].to_numpy(), policy)
        reply[f"hist_pos:{name}"], reply[f"hist_neg:{name}"] = groups.histograms(bins)
        reply[f"confusion:{name}"] = groups.confusion(float(manifest["thresholds"][name]))
        reply[f"brier_sum:{name}"] = groups.brier_sum()
        if name == manifest["main_model"] and (fitted := groups.calibration()) is not None:
            reply[f"calibration:{name}"] = np.array(fitted)
    return reply
