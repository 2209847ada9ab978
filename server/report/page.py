"""The report page: the sections in their order inside one self-contained HTML document (its
style sheet inline), and the page written to ``RUN/report/report.html``."""

from __future__ import annotations

from pathlib import Path

from fedmets.server.report.figures import Figures
from fedmets.server.report.html import e
from fedmets.server.report.loading import load_run
from fedmets.server.report.sections import (
    ablation_html,
    backbone_html,
    census_html,
    config_html,
    dropouts_html,
    header_html,
    importance_html,
    model_html,
    privacy_html,
    results_html,
    server_log_html,
    subsite_html,
    training_html,
    versions_html,
)

REPORT_DIR = "report"

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


def _sites(metrics: dict) -> list[str]:
    """Every site the results name (census, per-site results), sorted."""
    names: list[str] = list((metrics.get("census") or {}).keys())
    names += list(((metrics.get("federated") or {}).get("per_site") or {}).keys())
    names += list(((metrics.get("local_only") or {}).get("per_site") or {}).keys())
    return sorted(dict.fromkeys(names))


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
        model_html(metrics, run_dir),
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
