"""The site's audit log as a hash chain: ``<paths.output>/audit/wire-audit.jsonl``, one JSON
object per line (what ``fedmets.client.release`` logs: every request, what left and what was
refused), each carrying ``prev_sha256``, the SHA-256 of the previous line's bytes (the first
line: 64 zeros), appended under a file lock (processes of one site may log at once: folds run
in parallel). Editing, deleting, inserting or reordering a line breaks the chain at the line
after it; :func:`verify` names the first broken line (``fedmets site audit verify``), and
:func:`summarise` counts what left per run and route (``fedmets site audit show``). The last
line has no successor: keep the head hash that ``verify`` prints somewhere else to pin it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmets.shared.files import exclusive

GENESIS = "0" * 64
"""``prev_sha256`` of a log's first line."""
CHUNK = 4096


def _last_line(handle: Any, size: int) -> bytes:
    """The last line (without its newline) of a file open in binary mode, ``size`` bytes."""
    end = size - 1  # the final newline
    start = end
    while start > 0:
        step = min(CHUNK, start)
        handle.seek(start - step)
        block = handle.read(step)
        cut = block.rfind(b"\n")
        if cut >= 0:
            start = start - step + cut + 1
            break
        start -= step
    handle.seek(start)
    return handle.read(end - start)


def append_entry(path: Path, entry: Mapping[str, Any]) -> None:
    """Append ``entry`` to the log at ``path`` with the previous line's hash (one write, under
    the log's lock: processes of one site that log at once keep the chain)."""
    with exclusive(path), path.open("a+b") as log:
        size = log.seek(0, os.SEEK_END)
        previous = hashlib.sha256(_last_line(log, size)).hexdigest() if size else GENESIS
        log.write(json.dumps({**entry, "prev_sha256": previous}).encode() + b"\n")


@dataclass
class AuditCheck:
    """What :func:`verify` found: ``lines`` read, the first ``broken`` line (1-based) and
    why, or None; ``head`` the SHA-256 of the last line (pin it elsewhere)."""

    lines: int
    broken: int | None
    reason: str | None
    head: str


def verify(path: Path) -> AuditCheck:
    """Check the chain of the log at ``path``, line by line."""
    previous = GENESIS
    lines = Path(path).read_bytes().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            claimed = json.loads(line).get("prev_sha256")
        except (ValueError, AttributeError):
            return AuditCheck(len(lines), number, "not a JSON object", previous)
        if claimed != previous:
            reason = (
                "no prev_sha256 (written before the chain)"
                if claimed is None
                else "prev_sha256 is not the hash of the line before it: that line or this "
                "one was edited, deleted, inserted or moved"
            )
            return AuditCheck(len(lines), number, reason, previous)
        previous = hashlib.sha256(line).hexdigest()
    return AuditCheck(len(lines), None, None, previous)


def summarise(path: Path) -> list[dict[str, Any]]:
    """Per run and route: requests, answered, withheld (the count alone left), refused, the
    bytes of what left, and the app digests that relayed the requests (``apps``, sorted; none
    in process). ValueError naming the first line that is not a JSON object."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise ValueError(
                f"{path}: line {number}: not a JSON object (an edited or damaged log):"
                " `fedmets site audit verify` checks the whole chain"
            )
        key = (str(entry.get("run", "")), str(entry.get("route", "")))
        row = rows.setdefault(
            key,
            {"run": key[0], "route": key[1], "requests": 0, "answered": 0, "withheld": 0,
             "refused": 0, "bytes": 0, "apps": set()},
        )  # fmt: skip
        row["requests"] += 1
        if entry.get("app_sha256"):
            row["apps"].add(str(entry["app_sha256"]))
        if not entry.get("sent", True):
            row["refused"] += 1
            continue
        row["withheld" if "withheld" in entry else "answered"] += 1
        fields = entry.get("fields", {})
        row["bytes"] += sum(
            f.get("bytes", 8 * f.get("values", 0)) for f in fields.values() if isinstance(f, dict)
        )
    return [
        {**row, "apps": sorted(row["apps"])}
        for row in sorted(rows.values(), key=lambda r: (r["run"], r["route"]))
    ]
