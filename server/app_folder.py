"""The Flower app folder: the files ``flwr build`` bundles and ``flwr run`` submits, alone.

Flower reads every file under the folder it is given before it filters them
(``flwr.cli.utils.collect_files`` resolves each path): a checkout with its ``.venv``, cohorts
and runs inside is ~50,000 files, 6-13 s of CPU for each ``flwr build`` or ``flwr run`` of it.
The bundle itself holds only ``pyproject.toml`` and the folders its ``[tool.flwr.app]
fab-include`` names (the code the ServerApp and the ClientApp import, and the example configs);
:func:`write_app_folder` copies exactly those to a folder of their own, whose bundle is the
checkout's file for file (the same app digest, ``fedmets.shared.app_digest``).
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent
"""The checkout (or installed source tree) this module lies in."""

COPIED_FILES = ("pyproject.toml", ".gitignore")
"""Besides the folders: the app's config, and the ignore rules ``flwr build`` applies."""


def app_folders(source: Path = SOURCE) -> list[str]:
    """The top-level folders of the app bundle: each ``FOLDER/**`` of ``[tool.flwr.app]
    fab-include`` in ``source``'s pyproject.toml. ValueError without that file (an installed
    wheel holds none) or for any other kind of pattern."""
    if not (source / "pyproject.toml").is_file():
        raise ValueError(
            f"{source}: no pyproject.toml: the Flower app is a checkout or release of fedmets "
            "(its pyproject.toml declares the app); an installed package holds none"
        )
    config = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["flwr"]["app"]["fab-include"]
    folders = [p.removesuffix("/**") for p in patterns]
    odd = [p for p, f in zip(patterns, folders, strict=True) if f == p or "/" in f or "*" in f]
    if odd:
        raise ValueError(f"{source / 'pyproject.toml'}: fab-include {odd}: not FOLDER/**")
    return folders


def write_app_folder(out: Path, source: Path = SOURCE) -> Path:
    """Copy the app (``pyproject.toml``, ``.gitignore`` and :func:`app_folders`, without
    bytecode caches) from ``source`` to ``out``, replacing what ``out`` held; return ``out``."""
    folders = app_folders(source)
    target, origin = out.resolve(), source.resolve()
    if origin.is_relative_to(target) or any(target.is_relative_to(origin / f) for f in folders):
        raise ValueError(f"{out}: the app folder cannot hold its source nor lie in it")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    skipped = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in folders:
        shutil.copytree(source / folder, out / folder, ignore=skipped)
    return out
