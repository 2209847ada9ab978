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
and each model's risk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedmets.client.scoring import image_config, load_networks, standardised_groups
from fedmets.client.site_worker import SiteData, digest, load_site_data
from fedmets.client.training import extract_deep_features, predict_proba, resolve_device, set_state
from fedmets.shared.bundle import Bundle, load_bundle
from fedmets.shared.config import SiteConfig
from fedmets.shared.models import combine_scores


def predict_site(cfg: SiteConfig, model_dir: Path, out: Path | None = None) -> pd.DataFrame:
    """Scores of every extracted patient of the site ``cfg`` (labelled or not) by the bundle in
    ``model_dir``: ``patient_id``, ``risk`` and ``dm_predicted`` (the main model's probability
    and its class at the bundle's threshold), ``model``, ``threshold``, then ``risk:<model>``
    for every model. Written atomically to ``out`` (CSV) when given. ValueError names what
    does not fit."""
    bundle = load_bundle(model_dir)
    manifest = bundle.manifest
    data = load_site_data([cfg], unlabelled=True)
    columns = _check_fit(bundle, data, cfg)
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
    networks = load_networks(bundle.fusion_weights(), groups, manifest["fusion"])
    scores = combine_scores(
        {name: predict_proba(net, X) for name, (net, X) in networks.items()},
        manifest["models"],
        manifest["fusion"]["mode"],
    )
    main = manifest["main_model"]
    threshold = float(manifest["thresholds"][main])
    table = pd.DataFrame(
        {
            "patient_id": data.ids,
            "risk": scores[main],
            "dm_predicted": (scores[main] >= threshold).astype(int),
            "model": main,
            "threshold": threshold,
        }
    )
    for name in manifest["models"]:
        table[f"risk:{name}"] = scores[name]
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        table.to_csv(partial, index=False)
        partial.replace(out)
    return table


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
