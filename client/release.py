"""The site's gate: every reply passes the wire rules of ``shared.wire`` and is written to the
site's audit log before it may leave.

The audit log, ``<paths.output>/audit/wire-audit.jsonl``, holds one JSON line per reply: UTC
time, run, route, the number of patients behind it, and per field its kind, shape, dtype and
size in bytes (never the values). Hospital IT reads it to see what left the site
(``docs/hospital_guide.md``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.site_worker import SiteWorker
from shared import wire

AUDIT_FILE = "wire-audit.jsonl"


class ReleaseRefused(RuntimeError):
    """A reply broke the wire rules; nothing was sent."""


def answer(worker: SiteWorker, route_name: str, request: Mapping[str, Any]) -> dict:
    """The worker's reply to ``request``, checked against the wire rules and logged; raises
    ReleaseRefused (and logs the refusal) when it breaks them."""
    reply = worker.handle(route_name, request)
    problems = wire.check_reply(route_name, reply, worker.min_patients(request))
    _log(worker, route_name, request, reply, problems)
    if problems:
        raise ReleaseRefused(f"{worker.site_id}: {route_name} reply refused: {'; '.join(problems)}")
    return reply


def audit_path(worker: SiteWorker) -> Path:
    """Where ``worker``'s site writes its audit log (a pooled worker: beside its state)."""
    if len(worker.configs) > 1:
        return worker.state_root / "audit" / AUDIT_FILE
    return worker.configs[0].paths.output / "audit" / AUDIT_FILE


def _log(
    worker: SiteWorker,
    route_name: str,
    request: Mapping[str, Any],
    reply: Mapping[str, Any],
    problems: list[str],
) -> None:
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "site": worker.site_id,
        "run": str(request.get("run", "")),
        "route": route_name,
        "fold": request.get("fold"),
        "round": request.get("round"),
        "patients": reply.get("n"),
        "sent": not problems,
        "problems": problems,
        "fields": wire.describe(route_name, reply),
    }
    path = audit_path(worker)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")
