"""The run report: one self-contained HTML page (figures embedded as PNG data URIs, also written
beside it) from a simulation run folder (``RUN/metrics.json``) or a deployed run's server output
folder (``federated.json`` only). Sections that the input lacks are stated as absent, never
invented: a deployed run has no centralised or local-only baseline and no oracle AUC.

``write_report(run_dir)`` writes ``run_dir/report/report.html`` and returns its path.

What is where: ``loading`` reads a run folder (:func:`load_run`); ``html`` holds the small
HTML/text helpers; ``figures`` draws every figure (the report's, and the primitives the
centralised study's figures use); ``sections`` builds each ``<h2>`` section; ``page`` assembles
and writes the page."""

from fedmets.server.report.figures import binned_roc
from fedmets.server.report.loading import load_run
from fedmets.server.report.page import REPORT_DIR, render_report, write_report

__all__ = ["REPORT_DIR", "binned_roc", "load_run", "render_report", "write_report"]
