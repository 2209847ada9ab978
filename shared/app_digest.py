"""The name of a Flower app bundle by its content, for the hospital to pin.

Flower 1.42's ``--trusted-entities`` accepts only bundles that carry Flower Hub verification
records, so a consortium without the Hub cannot have the SuperNode refuse an app it has not
reviewed. What a site can do is name the app that relays each request, and refuse the ones it
did not approve: the **app digest**, a SHA-256 over the bundle's files (each file's path and
the SHA-256 of its bytes, in path order), is the same whether computed from the ``.fab`` file
the centre hands the hospital (``fedmets site approve --app FILE.fab``, :func:`fab_digest`) or
from the folder Flower unpacked it into, which the relay reports with every call
(:func:`running_app_digest`; Flower's ``.info`` manifest and Python's bytecode caches are left
out of both).

The relay is the centre's code, so a hostile app can report any digest; the pin catches an app
other than the reviewed one from an honest centre (a new release, an edited bundle), and it
names in the site's log the app each request came through. What leaves the site is decided by
the gate in the service either way. The ServerApp records its own digest in the results
(``app_sha256``), so a run's results name the bundle the sites' approvals and audit logs name.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

FLOWER_MANIFEST = ".info/"
"""The folder of a ``.fab`` that Flower checks and removes when it installs the bundle."""


def _skipped(path: str) -> bool:
    return (
        path.startswith(FLOWER_MANIFEST)
        or "__pycache__/" in f"/{path}"
        or path.endswith((".pyc", "/"))
    )


def content_digest(files: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 (hex) over ``(relative POSIX path, bytes)`` pairs: one line per file, in path
    order, of the path and the SHA-256 of its bytes."""
    lines = sorted(f"{path}\0{hashlib.sha256(data).hexdigest()}\n" for path, data in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@contextmanager
def _bundle_files(fab: Path) -> Iterator[tuple[zipfile.ZipFile, list[str]]]:
    """The open bundle ``fab`` and its app files' names (no manifest, no bytecode caches);
    ValueError when it is not a zip."""
    try:
        bundle = zipfile.ZipFile(fab)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{fab}: not a Flower app bundle (.fab): {error}") from None
    with bundle:
        yield bundle, [n for n in bundle.namelist() if not _skipped(n)]


def fab_digest(fab: Path) -> str:
    """The app digest of the Flower app bundle ``fab`` (a ``.fab`` zip file); ValueError when
    it is not a zip."""
    with _bundle_files(fab) as (bundle, names):
        return content_digest((n, bundle.read(n)) for n in names)


def fab_contents(fab: Path) -> str:
    """What the bundle ``fab`` holds, for the hospital's review, in one line: its file count,
    then each top-level folder with its files and each top-level file (e.g. ``80 files:
    client/ 30, fedmets/ 3, ..., pyproject.toml``). ValueError when it is not a zip."""
    with _bundle_files(fab) as (_, names):
        tops = Counter(f"{n.split('/')[0]}/" if "/" in n else n for n in names)
    order = sorted(tops, key=lambda top: (not top.endswith("/"), top))  # folders, then files
    parts = [f"{top} {tops[top]}" if top.endswith("/") else top for top in order]
    return f"{len(names)} files: {', '.join(parts)}"


def folder_digest(root: Path) -> str:
    """The app digest of the files under ``root`` (an unpacked bundle)."""
    files = (
        (path.relative_to(root).as_posix(), path.read_bytes())
        for path in root.rglob("*")
        if path.is_file() and not _skipped(path.relative_to(root).as_posix())
    )
    return content_digest(files)


@lru_cache(maxsize=1)
def running_app_digest() -> str:
    """The app digest of the bundle this code runs from, when Flower installed it
    (``<FLWR_HOME>/apps/<publisher>.<app>.<version>.<hash>/``); "" for a source checkout."""
    root = Path(__file__).resolve().parents[1]
    return folder_digest(root) if root.parent.name == "apps" else ""
