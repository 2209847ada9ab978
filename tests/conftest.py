"""What several test modules share: the command line run in process, one synthetic cohort per
session, and how the suite spreads over pytest-xdist workers.

- :func:`run_fedmets` runs ``fedmets ...`` through Typer's test runner in this process (no fresh
  interpreter and torch import per call) and answers like ``subprocess.run``.
- ``tiny_cohort``: the ``tiny`` synthetic cohort (2 sites, seed 5) generated once per session
  (the xdist workers share it); tests read it, and copy it before changing anything.
- ``federation``: a loopback deployment (real SuperLink, three registered SuperNode keys) per
  test module.
- Workers (``scripts/test.sh`` runs ``-n 3 --dist loadfile --no-loadscope-reorder``, with
  ``OMP_NUM_THREADS=1``: one torch thread per process, as the cores are busy anyway): a
  module's tests stay on one worker, so a module-scoped fixture is built once, and the long
  real-process runs sit in modules of their own (``test_deployment*.py``) to run side by side.
  The longest modules (``LONGEST_MODULES``), then the other slow tests, are collected first
  so the longest work starts first, and a worker still busy with one of them takes quick
  modules meanwhile (``ApartScheduling``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_protocol import write_sites
from typer.testing import CliRunner
from xdist.scheduler import LoadFileScheduling

# pytest-xdist sets COLUMNS=80 in its workers; the command line's consoles (made when
# fedmets.cli is imported) then cut tables at 80 columns. Tests see what a log file sees.
os.environ.pop("COLUMNS", None)

from fedmets.cli import app  # noqa: E402
from fedmets.shared.files import exclusive  # noqa: E402
from fedmets.simulation.loopback import LoopbackFederation  # noqa: E402
from fedmets.simulation.synth import generate_cohort  # noqa: E402


@dataclass(frozen=True)
class CliResult:
    """A finished in-process ``fedmets`` call, with ``subprocess.CompletedProcess``'s fields."""

    returncode: int
    stdout: str
    stderr: str


def run_fedmets(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> CliResult:
    """``fedmets ARGS`` in this process (from ``cwd``, with ``env`` added to the environment).
    An exception the command does not handle gives return code 1 and its traceback on stderr,
    as the real command would."""
    runner = CliRunner()
    with contextlib.chdir(cwd or os.getcwd()):
        result = runner.invoke(app, [str(a) for a in args], env=env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return CliResult(result.exit_code, result.stdout, stderr)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` synthetic cohort, 2 sites, seed 5 (read-only: copy it to change it), made
    once per test session: the first pytest-xdist worker to ask makes it in the session's
    folder, the others wait for it there and read it (~10 s of CPU each saved)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / "tiny-cohort"
    with exclusive(folder):
        if not (folder / "made").is_file():
            generate_cohort("tiny", 2, 5, folder / "cohort", workers=2)
            (folder / "made").touch()
    return folder / "cohort"


@pytest.fixture(scope="session")
def tiny_extracted(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny cohort with every site extracted on a 2 mm grid (a third of the 1 mm
    grid's extraction time; read-only: copy it to change it; its paths are relative, so a copy
    keeps its features and crops)."""
    from fedmets.client.extract import extract_site
    from fedmets.shared.config import load_site_config

    out = tmp_path_factory.mktemp("tiny-extracted") / "cohort"
    shutil.copytree(tiny_cohort, out)
    for toml in sorted(out.glob("*/site.toml")):
        toml.write_text(toml.read_text() + "\n[preprocess]\nspacing_mm = [2.0, 2.0, 2.0]\n")
        extract_site(load_site_config(toml), workers=2)
    return out


@pytest.fixture(scope="module")
def federation(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoopbackFederation]:
    """A loopback deployment per test module: a TLS SuperLink with SuperNode authentication and
    three registered tabular sites (2 folds; ``test_protocol.write_sites``), or those the
    module names in ``DEPLOYED_SITES`` (each site spawns a ClientApp process per message:
    ~3 s of CPU, mostly Flower's imports), stopped after the module."""
    root = tmp_path_factory.mktemp("deployment")
    sites = write_sites(root / "sites", folds=2)
    sites = {site: sites[site] for site in getattr(request.module, "DEPLOYED_SITES", sites)}
    with LoopbackFederation(root, sites) as fed:
        fed.start_superlink()
        for site in sites:
            fed.register(site)
        yield fed


LONGEST_MODULES = (
    "test_simulate.py",  # its simulate fixture ~430 s, then its tests (~650 s in all)
    "test_deployment_dropout.py",  # ~490 s, most of it in Flower's processes
    "test_deployment_resume.py",  # ~480 s, likewise
    "test_study.py",  # its study fixture ~105 s, then its tests (~450 s in all)
    "test_runbook.py",  # ~400 s
    "test_secure_aggregation.py",  # ~250 s
)
"""The modules that take longest on 2 cores (fresh-clone CI ``--durations``, 2026-12-07,
39a0a60, three workers), longest first: a worker takes a module whole, so the suite ends
soonest when these start first and never queue behind one another (:class:`ApartScheduling`)."""


def _start_rank(item: pytest.Item) -> tuple[int, bool]:
    """(place in LONGEST_MODULES, or after them; not slow) of a test's module."""
    name = item.path.name
    place = LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)
    return place, item.get_closest_marker("slow") is None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, then the other slow tests, then the rest (a stable sort:
    the order inside each kind is kept), so the longest work starts first."""
    items.sort(key=_start_rank)


def _longest(scope: str) -> bool:
    """Whether a work unit (a test module's path) is one of LONGEST_MODULES."""
    return Path(scope).name in LONGEST_MODULES


class ApartScheduling(LoadFileScheduling):
    """``--dist loadfile``, except that a worker still running one of LONGEST_MODULES takes its
    next module from the quick end of the queue. pytest-xdist hands a worker another module
    whenever it has two tests or fewer left, to run them (a worker runs a test only once it
    knows the next); with plain loadfile a one-test deployment module took the next long one
    behind it, and the three deployment modules ran one after another on one worker (CI
    2026-12-07: 487 + 476 + 396 s in a row, of the suite's 1345 s)."""

    def _assign_work_unit(self, node) -> None:
        busy = any(
            _longest(scope) and not all(tests.values())
            for scope, tests in self.assigned_work.get(node, {}).items()
        )
        last = next(reversed(self.workqueue))
        if busy and not _longest(last):
            self.workqueue.move_to_end(last, last=False)
        super()._assign_work_unit(node)


@pytest.hookimpl(optionalhook=True)  # (``-p no:xdist`` runs without it)
def pytest_xdist_make_scheduler(config: pytest.Config, log) -> ApartScheduling | None:
    """:class:`ApartScheduling` for ``--dist loadfile`` (what scripts/test.sh runs)."""
    if config.getoption("dist") != "loadfile":
        return None
    return ApartScheduling(config, log)
