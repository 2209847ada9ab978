"""The run report: one self-contained HTML page (figures embedded as PNG data URIs, also written
beside it) from a simulation run folder (``RUN/metrics.json``) or a deployed run's server output
folder (``federated.json`` only). Sections that the input lacks are stated as absent, never
invented: a deployed run has no centralised or local-only baseline and no oracle AUC.

``write_report(run_dir)`` writes ``run_dir/report/report.html`` and returns its path."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

REPORT_DIR = "report"
SETTINGS = ("federated", "centralized")
LABELS = {"federated": "federated", "centralized": "centralised", "local_only": "local-only"}
COLOURS = {"federated": "#1f77b4", "centralized": "#ff7f0e", "local_only": "#2ca02c"}
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

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1f24;
 background:#fff;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:0 24px 48px}
header{background:#14325c;color:#fff;padding:20px 24px}
header h1{margin:0 0 4px;font-size:1.6em} header p{margin:2px 0;opacity:.9}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.card{background:#fff;color:#1b1f24;border-radius:6px;padding:8px 14px;min-width:150px}
.card b{display:block;font-size:1.45em} .card span{font-size:.85em;color:#555}
h2{border-bottom:2px solid #14325c;padding-bottom:3px;margin-top:34px}
table{border-collapse:collapse;margin:10px 0;font-size:.92em}
th,td{border:1px solid #c9d1da;padding:4px 9px;text-align:right;vertical-align:top}
th{background:#e8eef5} td.l,th.l{text-align:left}
tr.group td{background:#f4f6f9;font-weight:600;text-align:left}
.row{display:flex;flex-wrap:wrap;gap:18px}.row figure{flex:1 1 460px;max-width:570px}
pre.toml{columns:3 16em;column-rule:1px solid #dde3ea}
figure{margin:14px 0} figure img{max-width:100%;border:1px solid #dde3ea}
figcaption{font-size:.88em;color:#444;max-width:1000px}
.note{color:#555;font-size:.9em} .absent{color:#7a4b00}
pre{background:#f6f8fa;border:1px solid #dde3ea;padding:10px;overflow-x:auto;font-size:.85em}
details summary{cursor:pointer;color:#14325c}
"""


# ---- input ------------------------------------------------------------------------------------


def load_run(run_dir: Path) -> tuple[dict, list[Path]]:
    """The run's results in the shape of ``metrics.json`` and the files they came from.

    ``run_dir/metrics.json`` (a simulation) wins; else ``run_dir/federated.json`` or
    ``run_dir/federated/federated.json`` (a deployed run's server output), whose main model's
    pooled and per-site results become ``federated.pooled`` / ``per_site``. Keys that only
    ``federated.json`` holds (a privacy ledger, DP results) are taken from it too."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    server_files = [run_dir / "federated.json", run_dir / "federated" / "federated.json"]
    server_file = next((f for f in server_files if f.is_file()), None)
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        sources = [metrics_file]
        if server_file is not None:
            server = json.loads(server_file.read_text(encoding="utf-8"))
            if "privacy" in server and "privacy_ledger" not in metrics:
                metrics["privacy_ledger"] = server["privacy"]
            for key in ("dp", "run", "backbone"):
                if key in server and key not in metrics:
                    metrics[key] = server[key]
            sources.append(server_file)
        return metrics, sources
    if server_file is None:
        raise FileNotFoundError(
            f"{run_dir}: neither metrics.json (a simulation run) nor federated.json "
            "(a server output folder) found"
        )
    server = json.loads(server_file.read_text(encoding="utf-8"))
    main_model = server.get("main_model")
    models = server.get("models") or {}
    main = models.get(main_model, {})
    federated = {
        "pooled": main.get("pooled"),
        "per_site": main.get("per_site"),
        "models": models,
        "folds": server.get("folds") or [],
        "timing_s": server.get("timing_s") or {},
        "importance": server.get("importance"),
    }
    metrics = {
        key: value
        for key, value in server.items()
        if key not in {"models", "folds", "timing_s", "config", "privacy"}
    }
    if "privacy" in server:  # the ServerApp's name for the privacy ledger report
        metrics["privacy_ledger"] = server["privacy"]
    metrics.update(
        federated=federated,
        config={"federation": server.get("config") or {}},
        timing_s=server.get("timing_s") or {},
    )
    return metrics, [server_file]


# ---- small helpers ----------------------------------------------------------------------------


def e(value: Any) -> str:
    """Escaped text of any value from the JSON."""
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return e(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def auc_text(result: Mapping | None) -> str:
    """``0.712 [0.601, 0.823]`` or ``n/a`` (with the reason when the JSON gives one)."""
    if not result:
        return "n/a"
    auc, ci = result.get("auc"), result.get("auc_ci")
    if auc is None:
        note = result.get("auc_note")
        return "n/a" + (f" ({e(note)})" if note else "")
    return num(auc) + (f" [{num(ci[0])}, {num(ci[1])}]" if ci else "")


def auc_label(result: Mapping) -> str:
    """``AUC 0.712 [0.601, 0.823]`` as plain text, for a figure legend."""
    ci = result.get("auc_ci")
    return f"AUC {num(result.get('auc'))}" + (f" [{num(ci[0])}, {num(ci[1])}]" if ci else "")


def table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """An HTML table; cells are already-escaped HTML; the first ``left`` columns align left."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        if isinstance(row, str):  # a group heading spanning the table
            body.append(f'<tr class="group"><td colspan="{len(header)}">{row}</td></tr>')
            continue
        cells = "".join(
            f'<td class="{"l" if i < left else ""}">{cell}</td>' for i, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


METRIC_HEADER = ["n", "DM+", "AUC [95% CI]", "ACC", "SEN", "SPE", "Brier"]


def metric_cells(result: Mapping | None) -> list[str]:
    result = result or {}
    return [
        num(result.get("n")),
        num(result.get("positives")),
        auc_text(result) if result else "n/a",
        num(result.get("acc")),
        num(result.get("sen")),
        num(result.get("spe")),
        num(result.get("brier")),
    ]


def generic(value: Any) -> str:
    """Any JSON value as HTML: a flat dict as a two-column table, a list of flat dicts as a
    table, anything else as indented JSON."""

    def flat(d: Any) -> bool:
        return isinstance(d, dict) and all(
            not isinstance(v, (dict, list)) or (isinstance(v, list) and len(v) <= 8)
            for v in d.values()
        )

    if flat(value):
        return table(["key", "value"], ([e(k), cell(v)] for k, v in value.items()), left=2)
    if isinstance(value, list) and value and all(flat(v) for v in value):
        keys = list(dict.fromkeys(k for row in value for k in row))
        return table([e(k) for k in keys], ([cell(row.get(k)) for k in keys] for row in value))
    return f"<pre>{e(json.dumps(value, indent=2))}</pre>"


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return e(", ".join(cell(v) for v in value))
    return "n/a" if value is None else e(value)


def backbone_of(model_key: str) -> str:
    """``swin3d/deep+clinical`` -> ``swin3d``; ``none/radiomics`` -> ``none``."""
    return model_key.split("/", 1)[0] if "/" in model_key else "none"


def binned_roc(calibration: Mapping | None) -> tuple[np.ndarray, np.ndarray, float] | None:
    """ROC points (fpr, tpr) and their trapezoidal area from a reliability curve's bins, for a
    run written before the results held ROC points: each bin's patient count and observed DM
    rate give its positives and negatives, the bins are ordered by mean probability, and every
    bin boundary is one threshold. None without both classes."""
    if not calibration or not calibration.get("counts"):
        return None
    counts = np.asarray(calibration["counts"], dtype=float)
    rate = np.asarray(calibration["prob_true"], dtype=float)
    order = np.argsort(np.asarray(calibration["prob_pred"], dtype=float))[::-1]
    pos = np.rint(counts * rate)[order]
    neg = counts[order] - pos
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def curve(values: Sequence | None) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in (values or [])], dtype=float)


# ---- figures ----------------------------------------------------------------------------------


class Figures:
    """Writes each figure as a PNG into the report folder and hands back an ``<img>`` tag with
    the same bytes as a data URI."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, figure, name: str, alt: str) -> str:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        data = buffer.getvalue()
        (self.folder / f"{name}.png").write_bytes(data)
        encoded = base64.b64encode(data).decode("ascii")
        return f'<img src="data:image/png;base64,{encoded}" alt="{e(alt)}">'


def _legend_below(ax) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=4, frameon=False)


def _figure(width: float, height: float, columns: int = 1, rows: int = 1):
    """A figure and its ``rows * columns`` axes, row by row (a flat array)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    return figure, axes


def _roc_axes(ax, title: str) -> None:
    """Square ROC axes on [0, 1] with the chance diagonal."""
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")


def roc_figure(metrics: dict, figures: Figures) -> str | None:
    """The main model's pooled ROC per setting, from the results' ROC points (for an older run,
    rebuilt from the reliability curve by :func:`binned_roc`)."""
    lines = []
    for setting in SETTINGS:
        pooled = (metrics.get(setting) or {}).get("pooled") or {}
        if pooled.get("roc"):
            lines.append((setting, pooled, pooled["roc"]["fpr"], pooled["roc"]["tpr"], ""))
        elif (binned := binned_roc(pooled.get("calibration"))) is not None:
            fpr, tpr, area = binned
            lines.append((setting, pooled, fpr, tpr, f" (binned area {area:.3f})"))
    if not lines:
        return None
    figure, (ax,) = _figure(5.2, 5.0)
    _roc_axes(ax, f"pooled ROC, {metrics.get('main_model')}")
    for setting, pooled, fpr, tpr, binned_note in lines:
        ax.plot(
            fpr,
            tpr,
            marker="o" if binned_note else None,
            ms=3.5,
            color=COLOURS[setting],
            label=f"{LABELS[setting]}: {auc_label(pooled)}{binned_note}",
        )
    ax.legend(loc="lower right", fontsize=8)
    image = figures.save(figure, "roc_pooled", "pooled ROC curves")
    caption = (
        "Pooled ROC of the main model over all sites' held-out patients, with the AUC and its "
        "95% DeLong CI. No per-patient score leaves a site: the curve comes from the summed "
        f"per-class score histograms ({e(_histogram_bins(metrics))} bins on [0, 1]), one point "
        "per bin edge used as threshold, exact to the bin (patients within a bin are tied)."
    )
    if any(note for *_, note in lines):
        caption += (
            ' <span class="absent">This run predates stored ROC points: a curve marked '
            '"binned" is rebuilt from the 10-bin reliability curve (each point one bin '
            "boundary), so its area can differ from the AUC.</span>"
        )
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


SITE_ROC_COLUMNS = 4


def site_roc_figure(metrics: dict, sites: list[str], figures: Figures) -> str | None:
    """One ROC panel per site: the federated model on the site's held-out patients and the
    site's local-only model, from the per-site ROC points."""
    sources = [
        (setting, (metrics.get(setting) or {}).get("per_site") or {})
        for setting in ("federated", "local_only")
    ]
    panels = []
    for site in sites:
        lines = [(s, per[site]) for s, per in sources if (per.get(site) or {}).get("roc")]
        if lines:
            panels.append((site, lines))
    if not panels:
        return None
    columns = min(SITE_ROC_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = _figure(3.2 * columns, 3.4 * rows, columns=columns, rows=rows)
    figure.subplots_adjust(wspace=0.08, hspace=0.3)
    for i, (ax, (site, lines)) in enumerate(zip(axes, panels, strict=False)):
        first = lines[0][1]
        _roc_axes(ax, f"{site} (n {num(first.get('n'))}, DM+ {num(first.get('positives'))})")
        if i % columns:  # the first column's axis serves its row
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
        for setting, result in lines:
            roc = result["roc"]
            label = f"{LABELS[setting]}: {auc_label(result)}"
            ax.plot(roc["fpr"], roc["tpr"], color=COLOURS[setting], lw=1.4, label=label)
        ax.legend(loc="lower right", fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    image = figures.save(figure, "roc_per_site", "ROC curves per site")
    caption = (
        "ROC per site of the main model, with the AUC and its 95% DeLong CI: federated = the "
        "federated model on that site's held-out patients; local-only = a model trained on that "
        "site alone, same folds. Each curve comes from the site's own score histograms, exact "
        "to the bin; dotted: chance."
    )
    without = [site for site in sites if site not in {name for name, _ in panels}]
    if without:
        caption += (
            f' <span class="absent">No curve for {e(", ".join(without))}: no ROC points in the '
            "results (a single class among its held-out patients, or no evaluation reply).</span>"
        )
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def _histogram_bins(metrics: dict) -> Any:
    return (
        ((metrics.get("config") or {}).get("federation") or {})
        .get("evaluation", {})
        .get("histogram_bins", "fine")
    )


def site_forest_figure(metrics: dict, sites: list[str], figures: Figures) -> str | None:
    """Per-site AUC with its 95% CI: the federated model at each site, the site's local-only
    model, and the pooled federated/centralised rows on top."""
    rows: list[tuple[str, str, Mapping]] = []
    for setting in SETTINGS:
        pooled = (metrics.get(setting) or {}).get("pooled")
        if pooled:
            rows.append(("pooled", setting, pooled))
    fed_sites = (metrics.get("federated") or {}).get("per_site") or {}
    local_sites = (metrics.get("local_only") or {}).get("per_site") or {}
    for site in sites:
        for setting, source in (("federated", fed_sites), ("local_only", local_sites)):
            if site in source:
                rows.append((site, setting, source[site]))
    rows = [r for r in rows if r[2].get("auc") is not None]
    if not rows:
        return None
    labels = list(dict.fromkeys(label for label, _, _ in rows))
    figure, (ax,) = _figure(7.5, 0.55 * len(labels) + 1.4)
    offsets = {"federated": -0.15, "centralized": 0.15, "local_only": 0.15}
    seen = set()
    for label, setting, result in rows:
        y = labels.index(label) + offsets[setting]
        ci = result.get("auc_ci") or [result["auc"], result["auc"]]
        ax.plot(ci, [y, y], color=COLOURS[setting], lw=2)
        ax.plot(
            [result["auc"]],
            [y],
            "o",
            color=COLOURS[setting],
            label=None if setting in seen else LABELS[setting],
        )
        seen.add(setting)
    ax.axvline(0.5, color="#999", lw=0.8, ls=":")
    oracle = metrics.get("oracle_auc")
    if oracle is not None:
        ax.axvline(oracle, color="#b22", lw=1, ls="--", label=f"oracle {oracle:.3f}")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="AUC with 95% DeLong CI")
    ax.set_title(f"AUC per site, {metrics.get('main_model')}", fontsize=10)
    _legend_below(ax)
    image = figures.save(figure, "auc_per_site", "AUC per site with 95% CI")
    caption = (
        "Per-site AUC with 95% CI side by side (a forest plot), the pooled rows on top. "
        "Federated = the federated model on that site's held-out patients; local-only = a model "
        "trained on that site alone, same folds. Dotted: chance; dashed: the oracle AUC of the "
        "synthetic cohort's true risk (when known)."
    )
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def calibration_figure(metrics: dict, figures: Figures) -> str | None:
    entries = []
    for setting in SETTINGS:
        pooled = (metrics.get(setting) or {}).get("pooled") or {}
        if (pooled.get("calibration") or {}).get("counts"):
            entries.append((setting, pooled))
    if not entries:
        return None
    figure, (ax,) = _figure(5.2, 5.0)
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":", label="perfect")
    for setting, pooled in entries:
        cal = pooled["calibration"]
        counts = np.asarray(cal["counts"], dtype=float)
        ax.plot(cal["prob_pred"], cal["prob_true"], color=COLOURS[setting], lw=1)
        ax.scatter(
            cal["prob_pred"],
            cal["prob_true"],
            s=12 + 120 * counts / counts.max(),
            color=COLOURS[setting],
            alpha=0.75,
            label=f"{LABELS[setting]}: Brier {num(pooled.get('brier'))}",
        )
    ax.set(xlabel="mean predicted probability", ylabel="observed DM rate", xlim=(0, 1))
    ax.set(ylim=(-0.02, 1.02))
    ax.set_title(f"pooled calibration, {metrics.get('main_model')}", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.set_aspect("equal")
    image = figures.save(figure, "calibration", "pooled calibration curves")
    caption = (
        "Reliability curve over 10 equal-width probability bins (non-empty bins only); marker "
        "area grows with the bin's patient count. Probabilities come from a network trained with "
        "a positive-class weight (pos_weight), so they tend to lie above the observed DM rate."
    )
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def ablation_figure(rows: list[tuple[str, dict]], oracle: float | None, figures: Figures) -> str:
    figure, (ax,) = _figure(7.5, 0.5 * len(rows) + 1.4)
    for i, (_, by_setting) in enumerate(rows):
        for setting, shift in (("federated", -0.15), ("centralized", 0.15)):
            result = by_setting.get(setting) or {}
            if result.get("auc") is None:
                continue
            ci = result.get("auc_ci") or [result["auc"]] * 2
            ax.plot(ci, [i + shift] * 2, color=COLOURS[setting], lw=2)
            ax.plot(
                [result["auc"]],
                [i + shift],
                "o",
                color=COLOURS[setting],
                label=LABELS[setting] if i == 0 else None,
            )
    ax.axvline(0.5, color="#999", lw=0.8, ls=":")
    if oracle is not None:
        ax.axvline(oracle, color="#b22", lw=1, ls="--", label=f"oracle {oracle:.3f}")
    ax.set_yticks(range(len(rows)), [model for model, _ in rows])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="pooled AUC with 95% DeLong CI")
    _legend_below(ax)
    image = figures.save(figure, "ablation", "ablation: pooled AUC per feature-group model")
    return (
        f"<figure>{image}<figcaption>Pooled AUC of every fusion network (feature-group subset) "
        "with its 95% CI.</figcaption></figure>"
    )


def dp_figure(results: Any, figures: Figures) -> str | None:
    """AUC against epsilon when the DP results are a list of records with both."""
    if isinstance(results, dict):
        results = results.get("results")
    if not isinstance(results, list):
        return None
    points, no_dp = [], None
    for r in results:
        if not isinstance(r, dict):
            continue
        epsilon, auc = r.get("epsilon"), r.get("auc", r.get("auc_mean"))
        if not isinstance(auc, (int, float)):
            continue
        if epsilon is None or (isinstance(epsilon, (int, float)) and math.isinf(epsilon)):
            no_dp = auc  # epsilon infinity: no noise (None once written by to_jsonable)
        elif isinstance(epsilon, (int, float)) and epsilon > 0:
            points.append((epsilon, auc))
    if len(points) < 2:
        return None
    points.sort()
    figure, (ax,) = _figure(5.0, 3.4)
    ax.plot(*zip(*points, strict=True), marker="o", color=COLOURS["federated"], label="DP")
    if no_dp is not None:
        ax.axhline(no_dp, color="#555", ls="--", lw=1, label="no DP")
        ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="epsilon (privacy budget)", ylabel="pooled AUC")
    ax.set_xticks([x for x, _ in points], [f"{x:g}" for x, _ in points])
    ax.minorticks_off()
    ax.margins(y=0.15)
    ax.set_title("privacy / utility trade-off", fontsize=10)
    image = figures.save(figure, "dp_tradeoff", "AUC against epsilon")
    return f"<figure>{image}<figcaption>Pooled AUC per privacy budget.</figcaption></figure>"


def training_figure(folds: list[dict], main: str | None, figures: Figures) -> str | None:
    stages = []
    if any((fold.get("image") or {}).get("train_loss") for fold in folds):
        stages.append(("image model", [fold.get("image") or {} for fold in folds]))
    fusion = [((fold.get("fusion") or {}).get(main) or {}) for fold in folds]
    if any(f.get("train_loss") for f in fusion):
        stages.append((f"fusion: {main}", fusion))
    if not stages:
        return None
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(6.0 * len(stages), 4.0, columns=len(stages))
    colours = [f"C{i % 10}" for i in range(len(folds))]
    any_val = False
    for ax, (title, per_fold) in zip(axes, stages, strict=True):
        for k, stage in enumerate(per_fold):
            train, val = curve(stage.get("train_loss")), curve(stage.get("val_loss"))
            if not train.size:
                continue
            rounds = np.arange(1, train.size + 1)
            fold_no = folds[k].get("fold", k)
            ax.plot(rounds, train, color=colours[k], marker=".", label=f"fold {fold_no + 1}")
            if val.size and np.isfinite(val).any():
                any_val = True
                ax.plot(np.arange(1, val.size + 1), val, color=colours[k], ls="--", marker=".")
            best = stage.get("best_round")
            if best and 1 <= best <= train.size:
                ax.plot([best], [train[best - 1]], "*", ms=11, color=colours[k], mec="k")
        ax.plot([], [], color="#555", label="training")
        ax.plot([], [], color="#555", ls="--", label="validation")
        ax.set(xlabel="round", ylabel="weighted BCE")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    image = figures.save(figure, "training", "training curves per stage and round")
    caption = (
        "Per fold and round: pooled training loss of the sites' local updates (solid) and the "
        "pooled inner-validation loss of the new global weights (dashed); the star marks the "
        "round kept (lowest validation loss; the last round when there is none)."
    )
    if not any_val:
        caption += (
            ' <span class="absent">No validation loss in this run: no site had enough '
            "inner-validation patients to release one (min_patients), so the last round was "
            "kept.</span>"
        )
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


# ---- sections ---------------------------------------------------------------------------------


def _sites(metrics: dict) -> list[str]:
    names: list[str] = list((metrics.get("census") or {}).keys())
    names += list(((metrics.get("federated") or {}).get("per_site") or {}).keys())
    names += list(((metrics.get("local_only") or {}).get("per_site") or {}).keys())
    return sorted(dict.fromkeys(names))


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
        fusion = (fold.get("fusion") or {}).get(main) or {}
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
                f"{num(fusion.get('best_round'))} / {len(fusion.get('train_loss') or [])}",
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
        "fusion best / rounds",
        "sites per fusion round",
        "threshold",
    ]
    figure = training_figure(folds, main, figures) or (
        '<p class="absent">No training curves in this run.</p>'
    )
    timing = metrics.get("timing_s") or {}
    timing_text = ", ".join(f"{e(k)} {num(v, 1)} s" for k, v in timing.items())
    return f"<h2>Training per stage and round</h2>{table(header, rows)}{figure}" + (
        f'<p class="note">Wall time: {timing_text}.</p>' if timing_text else ""
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


def config_html(metrics: dict, run_dir: Path) -> str:
    import tomli_w

    config = metrics.get("config") or {}
    out = ["<h2>Configuration</h2>"]
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


# ---- the page ---------------------------------------------------------------------------------


def render_report(run_dir: Path) -> str:
    """The report page of ``run_dir`` as HTML; its figures are written to
    ``run_dir/report/*.png`` on the way."""
    run_dir = Path(run_dir)
    metrics, sources = load_run(run_dir)
    folder = run_dir / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    figures = Figures(folder)
    run_name = (
        (((metrics.get("config") or {}).get("federation") or {}).get("run") or {}).get("name")
        or metrics.get("run")
        or run_dir.name
    )
    sites = _sites(metrics)
    body = [
        header_html(metrics, str(run_name), sources),
        "<main>",
        results_html(metrics, sites, figures),
        ablation_html(metrics, figures),
        subsite_html(metrics),
        importance_html(metrics),
        backbone_html(metrics),
        privacy_html(metrics, figures),
        training_html(metrics, figures),
        census_html(metrics),
        dropouts_html(metrics),
        config_html(metrics, run_dir),
        versions_html(),
        server_log_html(run_dir),
        "</main>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>fedmets report: {e(run_name)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report/report.html`` (self-contained) and its figures as PNG files
    beside it; return the page's path."""
    run_dir = Path(run_dir)
    page = render_report(run_dir)
    path = run_dir / REPORT_DIR / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
