"""The report's small HTML and text helpers: escaping, number and AUC formatting, tables (cells
are already-escaped HTML) and any JSON value as HTML."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# a setting's name in the page and in figure legends
LABELS = {"federated": "federated", "centralized": "centralised", "local_only": "local-only"}


def e(value: Any) -> str:
    """Escaped text of any value from the JSON."""
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    """A number as text: an int as it is, a float to ``digits`` decimals, None/NaN/inf as n/a."""
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
    """One result's cells under :data:`METRIC_HEADER` (n/a where absent)."""
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
    """A JSON scalar or list as escaped text (a float to 4 significant digits)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return e(", ".join(cell(v) for v in value))
    return "n/a" if value is None else e(value)
