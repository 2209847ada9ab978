"""The site's audit log as a hash chain (``fedmets.client.audit``, ``fedmets site audit``): an
intact log verifies; an edited, deleted, inserted or moved line is named; ``show`` counts what
left per run and route."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from conftest import run_fedmets

from fedmets.client.audit import GENESIS, append_entry, summarise, verify
from fedmets.client.release import answer, site_audit_path
from fedmets.client.site_worker import SiteWorker
from fedmets.shared import wire
from fedmets.shared.config import load_site_config
from fedmets.simulation.feature_sites import write_feature_sites


@pytest.fixture()
def site(tmp_path) -> tuple[Path, Path]:
    """A tabular site that answered a census, its folds, a refused request and a moments query
    (fold 0): (site TOML, its audit log)."""
    (toml,) = write_feature_sites(tmp_path / "sites", [40], folds=2)
    worker = SiteWorker([load_site_config(toml)])
    answer(worker, "query.census", {"protocol": wire.PROTOCOL_VERSION, "run": "r1"})
    answer(worker, "query.folds", {"folds": 2, "run": "r1"})
    with pytest.raises(RuntimeError, match="policy.folds"):
        answer(worker, "query.folds", {"folds": 3, "run": "r1"})
    answer(worker, "query.moments", {"fold": 0, "run": "r1"})
    return toml, site_audit_path(load_site_config(toml))


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_an_intact_log_verifies_and_every_line_is_chained(site) -> None:
    toml, path = site
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0])["prev_sha256"] == GENESIS
    check = verify(path)
    assert (check.lines, check.broken) == (4, None)
    done = run_fedmets("site", "audit", "verify", "--config", toml)
    assert done.returncode == 0 and "4 lines, chain intact" in done.stdout
    assert check.head in done.stdout


@pytest.mark.parametrize("tamper", ["edit", "delete", "insert", "reorder"])
def test_a_tampered_line_is_named(site, tamper) -> None:
    toml, path = site
    lines = path.read_bytes().splitlines()
    if tamper == "edit":  # a refusal made to look answered
        entry = json.loads(lines[2])
        entry["sent"] = True
        lines[2] = json.dumps(entry).encode()
    elif tamper == "delete":
        del lines[2]
    elif tamper == "insert":
        lines.insert(1, lines[1])
    else:
        lines[1], lines[2] = lines[2], lines[1]
    _rewrite(path, lines)
    broken = {"edit": 4, "delete": 3, "insert": 3, "reorder": 2}[tamper]
    assert verify(path).broken == broken
    done = run_fedmets("site", "audit", "verify", "--config", toml)
    assert done.returncode == 1
    assert f"line {broken} of {len(lines)}" in done.stderr


def test_a_line_longer_than_the_read_back_chunk_is_chained(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    append_entry(path, {"route": "a" * 5000})  # longer than one read-back chunk
    append_entry(path, {"route": "b"})
    assert verify(path).broken is None


def _append_many(path: str, writer: str, ready) -> None:
    """In a child process: 200 entries of ``writer`` appended to the log at ``path``."""
    ready.wait()
    for k in range(200):
        append_entry(Path(path), {"route": "query.moments", "writer": writer, "k": k})


def test_lines_written_at_once_stay_chained(tmp_path) -> None:
    """Two processes of one site (folds run in parallel) log their requests at the same time:
    each reads the last line and appends under the log's lock, so the chain holds and no line
    is lost."""
    path = tmp_path / "audit.jsonl"
    fork = multiprocessing.get_context("fork")  # no re-import: quick
    ready = fork.Barrier(2)
    children = [
        fork.Process(target=_append_many, args=(str(path), writer, ready)) for writer in "ab"
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    check = verify(path)
    assert (check.lines, check.broken) == (400, None)


def test_show_counts_what_left_per_run_and_route(site) -> None:
    toml, path = site
    rows = {r["route"]: r for r in summarise(path)}
    assert rows["query.folds"] | {"bytes": 0} == {
        "run": "r1",
        "route": "query.folds",
        "requests": 2,
        "answered": 1,
        "withheld": 0,
        "refused": 1,
        "bytes": 0,
        "apps": [],
    }
    assert rows["query.moments"]["bytes"] > 0
    done = run_fedmets("site", "audit", "show", "--config", toml)
    assert done.returncode == 0 and "query.moments" in done.stdout
    assert "app sha256" not in done.stdout  # answered in process: no relay named an app
    for app in ("b2" * 32, "a1" * 32, "b2" * 32):
        append_entry(path, {"run": "r1", "route": "query.ledger", "sent": True, "app_sha256": app})
    ledger = {r["route"]: r for r in summarise(path)}["query.ledger"]
    assert ledger["apps"] == ["a1" * 32, "b2" * 32] and ledger["requests"] == 3
    done = run_fedmets("site", "audit", "show", "--config", toml)
    assert f"  app sha256 {'a1' * 32}\n  app sha256 {'b2' * 32}\n" in done.stdout


def test_show_splits_no_run_or_route_at_80_columns(tmp_path, monkeypatch) -> None:
    """In a log folded at 80 columns (COLUMNS=80, CI) every run name (up to 32 characters) and
    route is shown whole, not split mid-word as in one 7-column table ("query.bun/dle_evalu")."""
    import io

    from rich.console import Console

    from fedmets import cli

    (toml,) = write_feature_sites(tmp_path / "sites", [40], folds=2)
    path = site_audit_path(load_site_config(toml))
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = ("hnscc-pilot-2025-spring-cohort-b", "demo")
    for run in runs:
        for route in ("query.census", "query.bundle_evaluation", "train.image"):
            append_entry(path, {"run": run, "route": route, "fields": {"w": {"bytes": 10**10}}})
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, width=80))
    done = run_fedmets("site", "audit", "show", "--config", toml)
    assert done.returncode == 0, done.stderr
    lines = screen.getvalue().splitlines()
    assert lines[0] == f"audit log: {path}"  # a path as it is, never cut (soft wrap)
    assert max(map(len, lines[1:])) <= 80
    words = {word for line in lines for word in line.split()}
    assert {*runs, "query.bundle_evaluation", "train.image", "10000000000", "requests"} <= words


def test_show_names_a_damaged_line_without_a_traceback(site) -> None:
    """A line that is not JSON (edited by hand, a disk cut short): ``show`` names it in one
    line and points to ``verify``, exit 1, no traceback."""
    toml, path = site
    lines = path.read_bytes().splitlines()
    _rewrite(path, [*lines[:2], b"garbage", *lines[2:]])
    done = run_fedmets("site", "audit", "show", "--config", toml)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.replace("\n", "") == (
        f"{path}: line 3: not a JSON object (an edited or damaged log): `fedmets site audit"
        " verify` checks the whole chain"
    )
