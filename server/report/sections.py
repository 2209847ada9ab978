"""The report's sections: one ``*_html`` function per ``<h2>`` section of the page (and the page
header), each from the run's results in the shape of ``metrics.json``; a section whose input the
run lacks says so, never invents it."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fedmets.server.report.figures import (
    Figures,
    ablation_figure,
    calibration_figure,
    dp_figure,
    roc_figure,
    site_forest_figure,
    site_roc_figure,
    training_figure,
)
from fedmets.server.report.html import (
    LABELS,
    METRIC_HEADER,
    auc_text,
    cell,
    e,
    generic,
    metric_cells,
    num,
    table,
)
from fedmets.server.report.loading import SETTINGS
from fedmets.shared.bundle import MODEL_CARD_FILE

# (label, distribution name) read with importlib.metadata when the report is written
PACKAGES = (
    ("fedmets", "fedmets"),
    ("torch", "torch"),
    ("flwr", "flwr"),
    ("monai", "monai"),
    ("pyradiomics", "pyradiomics"),
    ("scikit-learn", "scikit-learn"),
    ("numpy", "numpy"),
    ("matplotlib", "matplotlib"),
)
SERVER_LOG_LINES = 400


def header_html(metrics: dict, run_name: str, sources: list[Path]) -> str:
    fed = (metrics.get("federated") or {}).get("pooled") or {}
    cen = (metrics.get("centralized") or {}).get("pooled")
    oracle = metrics.get("oracle_auc")
    cards = [(auc_text(fed), "federated AUC [95% CI]")]
    cards.append((auc_text(cen) if cen else "not run", "centralised AUC"))
    cards.append((num(oracle) if oracle is not None else "unknown", "oracle AUC (true risk)"))
    if fed.get("auc") is not None and oracle is not None:
        cards.append((f"{fed['auc'] - oracle:+.3f}", "federated - oracle"))
    if cen and fed.get("auc") is not None and cen.get("auc") is not None:
        cards.append((f"{fed['auc'] - cen['auc']:+.3f}", "federated - centralised"))
    cards.append(
        (
            f"{num(fed.get('n'))} / {num(fed.get('positives'))}",
            f"patients / DM+ over {num(fed.get('sites'))} sites",
        )
    )
    card_html = "".join(
        f'<div class="card"><b>{value}</b><span>{e(label)}</span></div>' for value, label in cards
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    kind = "simulation" if sources[0].name == "metrics.json" else "server output"
    return (
        f"<header><h1>fedmets report: run {e(run_name)}</h1>"
        f"<p>main model <b>{e(metrics.get('main_model', 'n/a'))}</b> &middot; {e(kind)} &middot; "
        f"written {e(when)} from {', '.join(e(s.name) for s in sources)}</p>"
        f'<div class="cards">{card_html}</div></header>'
    )


def results_html(metrics: dict, sites: list[str], figures: Figures) -> str:
    fed, cen = metrics.get("federated") or {}, metrics.get("centralized") or {}
    local = (metrics.get("local_only") or {}).get("per_site") or {}
    rows: list[Any] = ["pooled over all sites"]
    rows.append(["federated", *metric_cells(fed.get("pooled"))])
    if cen:
        rows.append(["centralised", *metric_cells(cen.get("pooled"))])
    logistic = (metrics.get("baselines") or {}).get("logistic") or {}
    for setting, label in (("federated", "federated"), ("centralized", "centralised")):
        if logistic.get(setting):
            rows.append([f"logistic baseline, {label}", *metric_cells(logistic[setting])])
    for site in sites:
        rows.append(f"site {e(site)}")
        rows.append(["federated", *metric_cells((fed.get("per_site") or {}).get(site))])
        if local:
            rows.append(["local-only", *metric_cells(local.get(site))])
    out = ["<h2>Results of the main model</h2>", table(["setting", *METRIC_HEADER], rows)]
    notes = [
        "AUC with DeLong's 95% CI from pooled score histograms; ACC, SEN, SPE at each fold's "
        "Youden threshold from the pooled training histograms; Brier from summed squared errors."
    ]
    if not cen:
        notes.append("No centralised baseline in this run.")
    if not local:
        notes.append("No local-only baseline in this run.")
    if logistic:
        notes.append(
            f"Logistic baseline: a logistic regression ({e(logistic['model'])}, weight decay "
            f"{logistic['weight_decay']:g}) on the same selected features, clinical encoding "
            "and folds, through the same protocol."
        )
    harmonisation = ((metrics.get("config") or {}).get("federation") or {}).get("harmonisation")
    effect = metrics.get("site_effect")
    if effect:
        after = "not harmonised" if effect["after"] is None else f"{effect['after']:.3f}"
        notes.append(
            "Site effect: AUC of a classifier of the site from the selected radiomics (0.5: "
            f"the site does not show) {effect['before']:.3f} as extracted, {after} after "
            f"harmonisation ({e((harmonisation or {}).get('method', 'none'))})."
        )
    out.append(f'<p class="note">{" ".join(notes)}</p>')
    missing = '<p class="absent">No data for this figure in the run.</p>'
    pair = [
        roc_figure(metrics, figures) or missing,
        calibration_figure(metrics, figures) or missing,
    ]
    out.append(f'<div class="row">{"".join(pair)}</div>')
    out.append(site_roc_figure(metrics, sites, figures) or missing)
    out.append(site_forest_figure(metrics, sites, figures) or missing)
    return "".join(out)


def ablation_html(metrics: dict, figures: Figures) -> str:
    ablation = metrics.get("ablation")
    if not ablation:  # a deployed run: the federated models alone
        models = (metrics.get("federated") or {}).get("models") or {}
        ablation = {key: {"federated": model.get("pooled")} for key, model in models.items()}
    if not ablation:
        return '<h2>Ablation</h2><p class="absent">No per-model results in this run.</p>'
    main = metrics.get("main_model")
    with_centralised = any(by.get("centralized") for by in ablation.values())
    rows = []
    for model, by_setting in ablation.items():
        fed, cen = by_setting.get("federated") or {}, by_setting.get("centralized") or {}
        name = f"<b>{e(model)}</b> (main)" if model == main else e(model)
        row = [name, auc_text(fed), num(fed.get("brier"))]
        if with_centralised:
            delta = (
                f"{fed['auc'] - cen['auc']:+.3f}"
                if fed.get("auc") is not None and cen.get("auc") is not None
                else "n/a"
            )
            row += [auc_text(cen) if cen else "not run", num(cen.get("brier")), delta]
        rows.append(row)
    header = ["model (backbone/feature groups)", "federated AUC [95% CI]", "Brier"]
    if with_centralised:
        header += ["centralised AUC [95% CI]", "Brier", "AUC fed - cen"]
    figure = ablation_figure(list(ablation.items()), metrics.get("oracle_auc"), figures)
    return (
        '<h2>Ablation: feature groups</h2><p class="note">One fusion network per subset of the '
        "feature groups (deep image features, selected radiomics, clinical), trained in the same "
        f"run on the same folds; pooled results.</p>{table(header, rows)}{figure}"
    )


def subsite_html(metrics: dict) -> str:
    main = metrics.get("main_model")
    columns = [s for s in SETTINGS if ((metrics.get(s) or {}).get("models") or {}).get(main)]
    per = {s: metrics[s]["models"][main].get("per_subsite") or {} for s in columns}
    subsites = sorted(dict.fromkeys(k for s in columns for k in per[s]))
    if not subsites:
        return (
            '<h2>Results by tumour subsite</h2><p class="absent">No subsite-stratified '
            "results in this run.</p>"
        )
    rows: list[Any] = []
    for subsite in subsites:
        rows.append(f"subsite {e(subsite)}")
        for setting in columns:
            rows.append([LABELS[setting], *metric_cells(per[setting].get(subsite))])
    return (
        f'<h2>Results by tumour subsite</h2><p class="note">Main model {e(main)}, pooled over '
        "sites per subsite. A subsite is missing (n/a) where no site had enough patients of it "
        "to release its histograms (min_patients).</p>" + table(["setting", *METRIC_HEADER], rows)
    )


IMPORTANCE_ROWS = 20


def importance_html(metrics: dict) -> str:
    """The federated permutation importance of the main model's input blocks (each site on
    its own held-out patients, pooled by the server)."""
    importance = (metrics.get("federated") or {}).get("importance") or {}
    blocks = importance.get("blocks") or []
    if not blocks:
        return (
            '<h2>What the model relies on</h2><p class="absent">No permutation importance in '
            "this run.</p>"
        )
    rows = [
        [e(b["name"]), num(b["importance"], 4), e(b["folds"])] for b in blocks[:IMPORTANCE_ROWS]
    ]
    return (
        f'<h2>What the model relies on</h2><p class="note">Permutation importance of '
        f"{e(importance.get('model'))}: {e(importance.get('measure'))}; computed by each site "
        "on its own held-out patients of each fold and pooled by the server (a radiomics block "
        "counts only in the folds that selected it). Occlusion maps of the image model stay at "
        f"the sites (<code>fedmets site explain</code>). Top {IMPORTANCE_ROWS} of {len(blocks)}."
        "</p>" + table(["input block", "importance", "folds"], rows)
    )


def backbone_of(model_key: str) -> str:
    """``swin3d/deep+clinical`` -> ``swin3d``; ``none/radiomics`` -> ``none``."""
    return model_key.split("/", 1)[0] if "/" in model_key else "none"


def backbone_html(metrics: dict) -> str:
    keys = list(
        dict.fromkeys(key for s in SETTINGS for key in ((metrics.get(s) or {}).get("models") or {}))
    )
    backbones = sorted({backbone_of(k) for k in keys} - {"none"})
    model_cfg = ((metrics.get("config") or {}).get("federation") or {}).get("model") or {}
    title = "<h2>Image backbones (Swin3D vs CNN)</h2>"
    if len(backbones) <= 1:
        if backbones:
            preset = model_cfg.get("image_preset")
            ran = f"{e(backbones[0])}" + (f" (preset {e(preset)})" if preset else "")
            text = f"Only one image backbone ran in this run: <b>{ran}</b>; no comparison."
        else:
            text = "No image backbone ran in this run (tabular sites: radiomics and clinical only)."
        return (
            f'{title}<p class="note">{text} The centralised study compares backbones: '
            "<code>fedmets study --backbones swin3d,resnet3d,densenet3d</code>.</p>"
        )
    rows = []
    for key in keys:
        if backbone_of(key) == "none":
            continue
        cells = [e(key)]
        for setting in SETTINGS:
            model = ((metrics.get(setting) or {}).get("models") or {}).get(key) or {}
            cells += [auc_text(model.get("pooled")), num((model.get("pooled") or {}).get("brier"))]
        rows.append(cells)
    header = ["model", "federated AUC [95% CI]", "Brier", "centralised AUC [95% CI]", "Brier"]
    return f'{title}<p class="note">Backbones: {e(", ".join(backbones))}.</p>' + table(header, rows)


def privacy_html(metrics: dict, figures: Figures) -> str:
    dp_cfg = ((metrics.get("config") or {}).get("federation") or {}).get("dp") or {}
    mode = dp_cfg.get("mode", "off")
    out = ["<h2>Differential privacy</h2>"]
    if mode != "off":
        out.append(
            f'<p class="note">Configured: mode {e(mode)}, epsilon {cell(dp_cfg.get("epsilon"))}, '
            f"delta {cell(dp_cfg.get('delta'))}, max_grad_norm "
            f"{cell(dp_cfg.get('max_grad_norm'))}.</p>"
        )
    if "dp" in metrics:
        dp = metrics["dp"]
        out.append("<h3>DP trade-off</h3>")
        if isinstance(dp, dict) and isinstance(dp.get("results"), list):
            out.append(generic(dp["results"]))
            rest = {k: v for k, v in dp.items() if k != "results"}
            if rest:
                out.append(f"<details><summary>settings</summary>{generic(rest)}</details>")
        else:
            out.append(generic(dp))
        out.append(dp_figure(dp, figures) or "")
    elif mode == "off":
        out.append(
            '<p class="note">DP off (<code>[dp] mode = "off"</code>): no noise was added '
            "to any update; no privacy/utility trade-off to show.</p>"
        )
    else:
        out.append('<p class="absent">This run holds no DP trade-off results.</p>')
    out.append("<h3>Privacy ledger</h3>")
    if "privacy_ledger" in metrics:
        out.append(ledger_html(metrics["privacy_ledger"]))
    elif mode == "off":
        out.append('<p class="note">DP is off: no privacy budget was spent, no ledger.</p>')
    else:
        out.append('<p class="absent">No privacy ledger recorded in this run.</p>')
    return "".join(out)


def ledger_html(ledger: Any) -> str:
    """The privacy report of ``fedmets.server.privacy.privacy_report`` (per site: epsilon over its
    whole ledger, per stage, what was released without DP; the server's client-level ledger);
    any other shape as generic tables."""
    if not isinstance(ledger, dict) or not isinstance(ledger.get("sites"), dict):
        return generic(ledger)

    def row(name: str, summary: Mapping) -> list[str]:
        stages = summary.get("stages") or {}
        per_stage = "<br>".join(
            f"{e(stage)}: &epsilon; {cell(values.get('epsilon'))} "
            f"({num(values.get('releases'))} releases)"
            for stage, values in stages.items()
            if isinstance(values, Mapping)
        )
        return [
            name,
            cell(summary.get("epsilon")),
            cell(summary.get("delta")),
            cell(summary.get("budget")),
            num(summary.get("releases")),
            per_stage or "none",
            e(", ".join(str(r) for r in summary.get("not_covered") or [])) or "none",
        ]

    rows = [row(e(site), summary) for site, summary in ledger["sites"].items()]
    if isinstance(ledger.get("server"), Mapping):
        rows.append(row("<i>server (client-level)</i>", ledger["server"]))
    header = [
        "ledger",
        "&epsilon; total",
        "&delta;",
        "budget",
        "DP releases",
        "&epsilon; per stage",
        "released without DP",
    ]
    out = [table(header, rows)] if rows else ['<p class="absent">No site ledger replied.</p>']
    facts = []
    if "mode" in ledger:
        facts.append(f"DP mode {e(ledger['mode'])}")
    if ledger.get("worst_site_epsilon") is not None:
        facts.append(f"worst site &epsilon; {cell(ledger['worst_site_epsilon'])}")
    if facts:
        out.append(f'<p class="note">{"; ".join(facts)}.</p>')
    if ledger.get("note"):
        out.append(f'<p class="note">{e(ledger["note"])}.</p>')
    return "".join(out)


def training_html(metrics: dict, figures: Figures) -> str:
    folds = (metrics.get("federated") or {}).get("folds") or []
    if not folds:
        return '<h2>Training</h2><p class="absent">No per-fold records in this run.</p>'
    main = metrics.get("main_model")
    rows = []
    for fold in folds:
        sel = fold.get("selection") or {}
        image = fold.get("image") or {}
        fusion = (fold.get("fusion") or {}).get(fold.get("main_network", main)) or {}
        image_sites = [len(s) for s in image.get("sites") or []]
        fusion_sites = [len(s) for s in fusion.get("sites") or []]
        rows.append(
            [
                str(fold.get("fold", 0) + 1),
                " &rarr; ".join(
                    num(sel.get(k)) for k in ("columns", "varying", "after_correlation_filter")
                )
                + f" &rarr; {len(sel.get('selected') or [])}",
                num(fold.get("pos_weight"), 2),
                f"{num(image.get('best_round'))} / {len(image.get('train_loss') or [])}"
                if image
                else "no image stage",
                _span(image_sites),
                f"{num(fusion.get('best_round'))} / {len(fusion.get('train_loss') or [])}"
                + (
                    f" ({e(fold['main_network'].split('#', 1)[1])})"
                    if "main_network" in fold
                    else ""
                ),
                _span(fusion_sites),
                num((fold.get("thresholds") or {}).get(main), 4),
            ]
        )
    header = [
        "fold",
        "radiomics columns &rarr; varying &rarr; |r| filter &rarr; selected",
        "pos_weight",
        "image best / rounds",
        "sites per image round",
        "fusion best / rounds (the main model's network, where chosen)",
        "sites per fusion round",
        "threshold",
    ]
    figure = training_figure(folds, main, figures) or (
        '<p class="absent">No training curves in this run.</p>'
    )
    timing = metrics.get("timing_s") or {}
    timing_text = ", ".join(f"{e(k)} {num(v, 1)} s" for k, v in timing.items())
    notes = []
    stability = (metrics.get("federated") or {}).get("selection_stability") or {}
    if stability.get("mean_jaccard") is not None:
        ranking = ((folds[0].get("selection") or {}).get("ranking")) or "n/a"
        notes.append(
            f"Selected radiomics across the {stability['folds']} folds ({e(ranking)} ranking): "
            f"mean pairwise Jaccard {stability['mean_jaccard']:.2f}; "
            f"{stability['in_every_fold']} columns in every fold, "
            f"{stability['in_any_fold']} in any."
        )
    harmonised = [(f.get("selection") or {}).get("harmonisation") for f in folds]
    if any(harmonised):
        used = sorted({", ".join(h["covariates"]) or "none" for h in harmonised if h})
        new = sorted({s for h in harmonised if h for s in h.get("new_batches", [])})
        notes.append(
            f"ComBat before selection in every fold (covariates: {e('; '.join(used))})"
            + (f"; harmonised as new batches: {e(', '.join(new))}." if new else ".")
        )
    if timing_text:
        notes.append(f"Wall time: {timing_text}.")
    return f"<h2>Training per stage and round</h2>{table(header, rows)}{figure}" + "".join(
        f'<p class="note">{n}</p>' for n in notes
    )


def _span(values: list[int]) -> str:
    if not values:
        return "n/a"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}&ndash;{high}"


def census_html(metrics: dict) -> str:
    census = metrics.get("census") or {}
    if not census:
        return '<h2>Data quality per site</h2><p class="absent">No census in this run.</p>'
    rows, totals = [], dict.fromkeys(("n", "positives", "quarantined", "unlabelled"), 0)
    for site in sorted(census):
        c = census[site]
        for key in totals:
            totals[key] += c.get(key) or 0
        prevalence = c["positives"] / c["n"] if c.get("n") else None
        rows.append(
            [
                e(site),
                e(c.get("mode", "n/a")),
                num(c.get("n")),
                num(c.get("positives")),
                "n/a" if prevalence is None else f"{prevalence:.1%}",
                num(c.get("quarantined")),
                num(c.get("unlabelled")),
                num(c.get("radiomics_columns")),
                num(c.get("clinical_columns")),
                e(str(c.get("schema_hash", ""))[:12]),
                e(str(c.get("params_hash", ""))[:12]),
            ]
        )
    rows.append(
        [
            "<b>all</b>",
            "",
            *(f"<b>{totals[k]}</b>" for k in ("n", "positives")),
            "",
            *(f"<b>{totals[k]}</b>" for k in ("quarantined", "unlabelled")),
            "",
            "",
            "",
            "",
        ]
    )
    schemas = {c.get("schema_hash") for c in census.values()}
    params = {c.get("params_hash") for c in census.values()}
    agree = (
        "All sites share one feature schema and one extraction setting."
        if len(schemas) == 1 and len(params) == 1
        else '<span class="absent">Sites differ in feature schema or extraction settings.</span>'
    )
    header = [
        "site",
        "mode",
        "patients",
        "DM+",
        "prevalence",
        "quarantined",
        "unlabelled",
        "radiomics cols",
        "clinical cols",
        "schema sha256",
        "extraction sha256",
    ]
    return (
        '<h2>Data quality per site</h2><p class="note">From each site\'s census reply: usable '
        "labelled patients, DM+, patients its site check quarantined and patients without a "
        f"label (both excluded). {agree}</p>" + table(header, rows)
    )


def dropouts_html(metrics: dict) -> str:
    dropouts = metrics.get("dropouts") or []
    if not dropouts:
        return '<h2>Dropouts</h2><p class="note">None: every site answered every message.</p>'
    return f'<h2>Dropouts</h2><p class="note">{len(dropouts)} unanswered messages.</p>' + generic(
        dropouts
    )


def model_html(metrics: dict, run_dir: Path) -> str:
    """The final model: where its bundle is, which sites kept it, its model card; then the
    held-out-site validation (``--holdout``, ``--loso``) when the run did it."""
    out = ["<h2>The final model</h2>"]
    kept = (metrics.get("model") or {}).get("sites") or {}
    for folder in (run_dir / "federated" / "model", run_dir / "model"):
        card = folder / MODEL_CARD_FILE
        if card.is_file():
            out.append(f'<p class="note">Bundle: {e(folder.relative_to(run_dir))}/')
            if kept:
                out.append(
                    "; sent to every site to keep: "
                    + ", ".join(f"{e(site)} {e(state)}" for site, state in sorted(kept.items()))
                )
            out.append(
                f".</p><details><summary>{e(MODEL_CARD_FILE)}</summary><pre>"
                f"{e(card.read_text(encoding='utf-8'))}</pre></details>"
            )
            break
    else:
        out.append('<p class="absent">No model bundle in this run ([stages] final_model).</p>')
    header = ["held-out site", *METRIC_HEADER, "calibration slope", "intercept"]

    def rows(per_site: dict, pooled: dict | None) -> list[list[str]]:
        listed = [
            [
                e(site),
                *metric_cells(result),
                num((result or {}).get("calibration_slope")),
                num((result or {}).get("calibration_intercept")),
            ]
            for site, result in sorted(per_site.items())
        ]
        return [*listed, ["held-out sites pooled", *metric_cells(pooled), "", ""]]

    holdout = metrics.get("holdout")
    if holdout:
        out.append(
            f'<h3>Held-out sites</h3><p class="note">The final model trained on '
            f"{e(', '.join(holdout['training_sites']))} (cross-validated AUC there "
            f"{auc_text(holdout.get('cross_validated'))}), applied at each held-out site "
            "(its release: grouped histograms, confusion counts, Brier sum, calibration "
            f"fit).</p>{table(header, rows(holdout['per_site'], holdout.get('pooled')))}"
        )
    loso = metrics.get("loso")
    if loso:
        out.append(
            '<h3>Leave one site out</h3><p class="note">Each site held out in turn: the final '
            "model trained on the others, applied there.</p>"
            + table(header, rows(loso["per_site"], loso.get("pooled")))
        )
    return "".join(out)


def config_html(metrics: dict, run_dir: Path) -> str:
    import tomli_w

    config = metrics.get("config") or {}
    out = ["<h2>Configuration</h2>"]
    if metrics.get("app_sha256"):
        out.append(
            f"<p>The app bundle that ran the federated run: sha256 <code>{e(metrics['app_sha256'])}"
            "</code>, the app digest that each site's approval pins (<code>fedmets site approve "
            "--app</code>) and its audit log names for every request it answered.</p>"
        )
    other = {k: v for k, v in config.items() if k != "federation"}
    if other:
        out.append(generic(other))
    toml_file = run_dir / "federation.toml"
    if toml_file.is_file():
        out.append(f'<p class="note">{e(toml_file.name)} of the run, verbatim:</p>')
        out.append(f'<pre class="toml">{e(toml_file.read_text(encoding="utf-8"))}</pre>')
    elif config.get("federation"):

        def drop_none(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: drop_none(v) for k, v in value.items() if v is not None}
            return value

        out.append(
            '<p class="note">The federation config recorded in the results, as TOML '
            "(unset values omitted):</p>"
        )
        out.append(f'<pre class="toml">{e(tomli_w.dumps(drop_none(config["federation"])))}</pre>')
    else:
        out.append('<p class="absent">No federation config recorded.</p>')
    return "".join(out)


def versions_html() -> str:
    rows = [["python", e(platform.python_version())]]
    for label, dist in PACKAGES:
        try:
            rows.append([e(label), e(version(dist))])
        except PackageNotFoundError:
            if label == "fedmets":
                from fedmets.shared import __version__

                rows.append([e(label), e(__version__)])
            else:
                rows.append([e(label), "not installed"])
    return (
        '<h2>Software versions</h2><p class="note">Read with importlib.metadata on the machine '
        "that wrote this report, when it was written; they match the run's only if the report "
        f"was written in the same environment ({e(platform.platform())}).</p>"
        + table(["package", "version"], rows)
    )


def server_log_html(run_dir: Path) -> str:
    for path in (run_dir / "federated" / "server.log", run_dir / "server.log"):
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            shown = lines[-SERVER_LOG_LINES:]
            cut = f" (last {len(shown)} of {len(lines)} lines)" if len(shown) < len(lines) else ""
            return (
                f"<h2>Server log</h2><details><summary>{e(path.relative_to(run_dir))}{cut}"
                f"</summary><pre>{e(chr(10).join(shown))}</pre></details>"
            )
    return ""
