"""The model card of a model bundle (``MODEL_CARD.md`` beside ``manifest.json``): what a clinician
or a reviewer reads before using the model, under the TRIPOD-AI headings that apply to a
federated prognostic model: intended use, source of data and participants, predictors, model,
performance with confidence intervals, calibration, subgroups, held-out sites, limitations.

It is a function of the bundle's manifest alone (:func:`model_card`), so the centre that writes
the bundle and every site that keeps a copy write the same card.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmets.shared.model_names import network_hidden, network_variant


def _chosen_network(fusion: Mapping[str, Any], main: str) -> str:
    """How the main model's network differs from the others when it was chosen on inner
    validation (a variant network among the manifest's ``fusion`` networks,
    ``fedmets.shared.model_names.network_variant``), or ""."""
    variant = next((n for n in fusion["networks"] if n.startswith(f"{main}#")), None)
    if variant is None:
        return ""
    return (
        f", whose network (`{variant}`, chosen on the folds' inner validation) reads the top"
        f" {network_variant(variant).radiomics} selected radiomics features through hidden"
        f" layers {network_hidden(variant, fusion['hidden'])}"
    )


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _auc(result: Mapping[str, Any]) -> str:
    ci = result.get("auc_ci") or [None, None]
    return f"{_number(result.get('auc'))} [{_number(ci[0])}, {_number(ci[1])}]"


def _row(name: str, result: Mapping[str, Any] | None) -> str:
    if not result:
        return f"| {name} | not released | | | | | |"
    cells = [_auc(result)] + [_number(result.get(k)) for k in ("acc", "sen", "spe", "brier")]
    return f"| {name} | {result.get('n', 'n/a')} | " + " | ".join(cells) + " |"


HEADER = "| | patients | AUC [95% CI] | accuracy | sensitivity | specificity | Brier |"
RULE = "|---|---|---|---|---|---|---|"


def _results_table(title: str, results: Mapping[str, Any] | None, absent: str) -> list[str]:
    """A section of one results row per group (site, subsite), or ``absent``."""
    rows = [_row(name, result) for name, result in (results or {}).items()]
    return ["", f"## {title}", "", *([HEADER, RULE, *rows] if rows else [absent])]


def _harmonisation(spec: Mapping[str, Any] | None) -> str:
    from fedmets.shared.harmonisation import MIN_OWN_BATCH

    if not spec or spec.get("method", "none") == "none":
        return "none (the radiomics as extracted)"
    covariates = ", ".join(spec.get("covariates") or []) or "none"
    return (
        f"federated ComBat before selection (covariates kept: {covariates}); a site applies its"
        f" own correction from the run, a new site fits its own batch on >= {MIN_OWN_BATCH} of"
        " its patients"
    )


def model_card(manifest: Mapping[str, Any]) -> str:
    """The Markdown model card of the bundle whose manifest is ``manifest``."""
    main = manifest["main_model"]
    cohort = manifest["cohort"]
    cv = manifest.get("cross_validated") or {}
    federation = manifest.get("federation") or {}
    folds = (federation.get("cv") or {}).get("folds", "?")
    dp = (federation.get("dp") or {}).get("mode", "off")
    image = manifest.get("image")
    events = cohort.get("events")
    tabular = manifest.get("mode") == "tabular"  # the sites' feature tables, no images
    inputs = (
        "radiomics features of the tumour from the sites' feature tables and clinical variables"
        if tabular
        else "the planning CT, the tumour contour and clinical variables"
    )
    lines = [
        f"# Model card: {main} (run {manifest['run']})",
        "",
        f"Bundle format {manifest['format']}, created {manifest.get('created', 'n/a')};"
        f" fedmets {manifest['versions'].get('fedmets')}, wire protocol"
        f" {manifest['versions'].get('protocol')}; config fingerprint"
        f" `{manifest['config_fingerprint'][:16]}`.",
        "",
        "## Intended use",
        "",
        "Risk of distant metastasis of a head-and-neck squamous cell carcinoma, estimated before"
        f" treatment from {inputs}, for adults like those of the training cohort. A research"
        " model: it supports, and does not replace, a clinician's judgement; it has not been"
        " evaluated prospectively.",
        "",
        "## Source of data and participants",
        "",
        f"{cohort['patients']} patients at {cohort['sites']} sites, "
        + (f"{events} with distant metastasis" if events is not None else "events not released")
        + f". Trained federated: no image, feature row or label left its site"
        f" (DP mode `{dp}`).",
        "",
        "## Predictors",
        "",
        f"- Radiomics: {len(manifest['radiomics_features'])} "
        + (
            "columns of the sites' feature tables (as named there)"
            if tabular
            else "PyRadiomics features of the tumour and its peritumoral ring"
        )
        + ", selected on the training rows (extraction settings hash"
        f" `{manifest['params_hash'][:16]}`): "
        + ", ".join(f"`{name}`" for name in manifest["radiomics_features"]),
        "- Harmonisation: " + _harmonisation(manifest.get("harmonisation")),
        f"- Clinical: {len(manifest['clinical_columns'])} encoded columns"
        + (f" ({', '.join(manifest['clinical_columns'])})" if manifest["clinical_columns"] else ""),
        "- Image: "
        + (
            f"{image['backbone']} ({image['image_preset']}) on the CT crop with the"
            f" {image['mask_channel']} mask channel; its features centred and projected"
            if image
            else "none"
        ),
        "",
        "## Model",
        "",
        f"Fully connected fusion networks ({manifest['fusion']['mode']} fusion, hidden"
        f" {manifest['fusion']['hidden']}), one per input-group subset; the main model is"
        f" `{main}`{_chosen_network(manifest['fusion'], main)}."
        f" Threshold {_number(manifest['thresholds'][main])}: "
        f"{manifest['threshold_rule']}. Rounds trained: "
        + ", ".join(f"{k} {v}" for k, v in sorted(manifest["rounds"].items()))
        + ".",
        "",
        f"## Performance ({folds}-fold cross-validation, each site's own folds, pooled)",
        "",
        HEADER,
        RULE,
        *(_row(f"**{name}**" if name == main else name, cv.get(name)) for name in cv),
        "",
        "## Calibration",
        "",
    ]
    calibration = (cv.get(main) or {}).get("calibration")
    if calibration:
        lines += [
            "Observed DM rate against the main model's mean predicted risk, per risk group"
            " (cross-validated scores):",
            "",
            "| predicted | observed | patients |",
            "|---|---|---|",
            *(
                f"| {_number(p)} | {_number(o)} | {n} |"
                for p, o, n in zip(
                    calibration["prob_pred"],
                    calibration["prob_true"],
                    calibration["counts"],
                    strict=True,
                )
            ),
        ]
    else:
        lines.append("Not released.")
    lines += _results_table(
        "Subgroups (main model, by tumour subsite)",
        manifest.get("subgroups"),
        "Not released (groups below the sites' release floor are suppressed).",
    )
    lines += _results_table(
        "Per site (main model, cross-validated)", manifest.get("per_site"), "Not released."
    )
    lines += [
        "",
        "## Held-out sites",
        "",
        "Not part of this bundle: validation at hospitals that did not train the model is"
        " `fedmets simulate --holdout SITE` / `--loso` (docs/model.md) or `fedmets site predict`"
        " at a new site.",
        "",
        "## Limitations",
        "",
        f"- {events if events is not None else 'Few'} events: the confidence intervals are wide,"
        " and a difference between models within them is not evidence.",
        "- Cross-validated figures come from the same sites that trained the model; a new"
        " hospital's scanners and case mix may shift the risk (recalibrate locally:"
        " `fedmets site recalibrate`).",
        "- Pooled federated metrics come from per-site score histograms in groups of patients"
        " (the sites' release policy), not from exact per-patient scores.",
        "- Radiomics depend on the extraction settings: a site must extract with the same"
        " parameters (`params_hash`), or the bundle is refused.",
        "",
    ]
    return "\n".join(lines)
