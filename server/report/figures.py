"""The report's figures, and the drawing primitives the centralised study's figures share
(``fedmets.simulation.study.write_figures``): every figure of the project is drawn here.

Figures are bare matplotlib ``Figure`` objects (no pyplot: no global backend state), written as
PNG at 110 dpi by :class:`Figures`. Each ``*_figure`` function reads the run's results in the
shape of ``metrics.json`` and returns an HTML ``<figure>`` (image and caption), or None when the
run holds nothing to draw."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmets.server.report.html import LABELS, auc_label, e, num
from fedmets.server.report.loading import SETTINGS

COLOURS = {"federated": "#1f77b4", "centralized": "#ff7f0e", "local_only": "#2ca02c"}
SITE_ROC_COLUMNS = 4


class Figures:
    """Writes each figure as a PNG into ``folder``; :meth:`save` also hands back an ``<img>`` tag
    with the same bytes as a data URI."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, figure, name: str) -> bytes:
        """``figure`` as ``folder/<name>.png`` (110 dpi, cropped to its content); its bytes."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        data = buffer.getvalue()
        (self.folder / f"{name}.png").write_bytes(data)
        return data

    def save(self, figure, name: str, alt: str) -> str:
        encoded = base64.b64encode(self.write(figure, name)).decode("ascii")
        return f'<img src="data:image/png;base64,{encoded}" alt="{e(alt)}">'


# ---- drawing primitives -----------------------------------------------------------------------


def new_figure(width: float, height: float, columns: int = 1, rows: int = 1):
    """A figure of ``width`` x ``height`` inches and its ``rows * columns`` axes, row by row
    (a flat array)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    return figure, axes


def _legend_below(ax) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=4, frameon=False)


def roc_axes(ax, title: str) -> None:
    """Square ROC axes on [0, 1] with the chance diagonal; draw the curves after."""
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")


def calibration_axes(ax, title: str) -> None:
    """Square reliability axes on [0, 1] with the diagonal of perfect calibration; draw the
    curves (:func:`reliability_curve`) after."""
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":", label="perfect")
    ax.set(xlabel="mean predicted probability", ylabel="observed DM rate", xlim=(0, 1))
    ax.set(ylim=(-0.02, 1.02))
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")


def reliability_curve(ax, calibration: Mapping, colour: str, label: str) -> None:
    """One reliability curve (``fedmets.shared.metrics.calibration`` without ``edges``: per
    non-empty bin ``prob_pred``, ``prob_true``, ``counts``); marker area grows with the bin's
    patient count."""
    counts = np.asarray(calibration["counts"], dtype=float)
    ax.plot(calibration["prob_pred"], calibration["prob_true"], color=colour, lw=1)
    ax.scatter(
        calibration["prob_pred"],
        calibration["prob_true"],
        s=12 + 120 * counts / counts.max(),
        color=colour,
        alpha=0.75,
        label=label,
    )


def auc_interval(ax, y: float, result: Mapping, colour: str, label: str | None = None) -> None:
    """One row of an AUC forest plot at height ``y``: ``result["auc_ci"]`` as a line (the AUC
    alone without one) and ``result["auc"]`` as a dot."""
    ci = result.get("auc_ci") or [result["auc"], result["auc"]]
    ax.plot(ci, [y, y], color=colour, lw=2)
    ax.plot([result["auc"]], [y], "o", color=colour, label=label)


def auc_axis(ax, labels: Sequence[str], oracle: float | None, xlabel: str) -> None:
    """Finish an AUC forest plot whose rows (:func:`auc_interval`) lie at 0, 1, ... from the
    top, named ``labels``: AUC axis on [0, 1], chance (dotted) and the oracle AUC (dashed)."""
    ax.axvline(0.5, color="#999", lw=0.8, ls=":")
    if oracle is not None:
        ax.axvline(oracle, color="#b22", lw=1, ls="--", label=f"oracle {oracle:.3f}")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel=xlabel)


# ---- the report's figures ---------------------------------------------------------------------


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
    figure, (ax,) = new_figure(5.2, 5.0)
    roc_axes(ax, f"pooled ROC, {metrics.get('main_model')}")
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
        f"per-class score histograms ({e(_histogram_bins(metrics))} bins on [0, 1]; each site "
        "counts its patients in groups of its policy's min_bin_count, 5 by default, each group "
        "at its mean score), one point "
        "per bin edge used as threshold (patients within a bin are tied)."
    )
    if any(note for *_, note in lines):
        caption += (
            ' <span class="absent">This run predates stored ROC points: a curve marked '
            '"binned" is rebuilt from the 10-bin reliability curve (each point one bin '
            "boundary), so its area can differ from the AUC.</span>"
        )
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


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
    figure, axes = new_figure(3.2 * columns, 3.4 * rows, columns=columns, rows=rows)
    figure.subplots_adjust(wspace=0.08, hspace=0.3)
    for i, (ax, (site, lines)) in enumerate(zip(axes, panels, strict=False)):
        first = lines[0][1]
        roc_axes(ax, f"{site} (n {num(first.get('n'))}, DM+ {num(first.get('positives'))})")
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
    figure, (ax,) = new_figure(7.5, 0.55 * len(labels) + 1.4)
    offsets = {"federated": -0.15, "centralized": 0.15, "local_only": 0.15}
    seen = set()
    for label, setting, result in rows:
        y = labels.index(label) + offsets[setting]
        legend = None if setting in seen else LABELS[setting]
        auc_interval(ax, y, result, COLOURS[setting], legend)
        seen.add(setting)
    auc_axis(ax, labels, metrics.get("oracle_auc"), "AUC with 95% DeLong CI")
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
    figure, (ax,) = new_figure(5.2, 5.0)
    calibration_axes(ax, f"pooled calibration, {metrics.get('main_model')}")
    for setting, pooled in entries:
        label = f"{LABELS[setting]}: Brier {num(pooled.get('brier'))}"
        reliability_curve(ax, pooled["calibration"], COLOURS[setting], label)
    ax.legend(loc="best", fontsize=8)
    image = figures.save(figure, "calibration", "pooled calibration curves")
    caption = (
        "Reliability curve over 10 equal-width probability bins (non-empty bins only); marker "
        "area grows with the bin's patient count. Probabilities come from a network trained with "
        "a positive-class weight (pos_weight), so they tend to lie above the observed DM rate."
    )
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def ablation_figure(rows: list[tuple[str, dict]], oracle: float | None, figures: Figures) -> str:
    figure, (ax,) = new_figure(7.5, 0.5 * len(rows) + 1.4)
    for i, (_, by_setting) in enumerate(rows):
        for setting, shift in (("federated", -0.15), ("centralized", 0.15)):
            result = by_setting.get(setting) or {}
            if result.get("auc") is not None:
                label = LABELS[setting] if i == 0 else None
                auc_interval(ax, i + shift, result, COLOURS[setting], label)
    auc_axis(ax, [model for model, _ in rows], oracle, "pooled AUC with 95% DeLong CI")
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
    figure, (ax,) = new_figure(5.0, 3.4)
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
    fusion = [
        ((fold.get("fusion") or {}).get(fold.get("main_network", main)) or {}) for fold in folds
    ]
    if any(f.get("train_loss") for f in fusion):
        stages.append((f"fusion: {main}", fusion))
    if not stages:
        return None
    from matplotlib.ticker import MaxNLocator

    figure, axes = new_figure(6.0 * len(stages), 4.0, columns=len(stages))
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


# ---- helpers ----------------------------------------------------------------------------------


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
    """A JSON list of losses as floats (rounds,), None (no value that round) as NaN."""
    return np.array([np.nan if v is None else v for v in (values or [])], dtype=float)


def _histogram_bins(metrics: dict) -> Any:
    """The run's ``[evaluation] histogram_bins`` (the pooled ROC's score bins on [0, 1])."""
    return (
        ((metrics.get("config") or {}).get("federation") or {})
        .get("evaluation", {})
        .get("histogram_bins", "fine")
    )
