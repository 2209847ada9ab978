"""Atomic writes: a file is written beside its destination under a temporary name, then renamed
over it, so a reader (or a resumed run after a crash) sees the old file or the new one, never
a part of one. :func:`check_writable` tries a folder before long work whose results go there.
:func:`exclusive` serialises a read-modify-write of one file across processes; :func:`sole_user`
lets one process at a time work in a folder, refusing the others."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(partial)`` on a temporary path in ``path``'s folder (made if missing), then the
    rename into place; a failed write leaves the old file and no temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(OSError):  # an unwritable folder: the write's error stands
            partial.unlink(missing_ok=True)


def check_writable(folder: Path, key: str) -> None:
    """Make ``folder`` if missing, then create and remove a small file in it: before long work
    whose results go there. OSError ``<key>: cannot write <folder>: <reason>`` when it cannot be
    written (``key``: the config key that sets it)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except FileExistsError as error:
        raise OSError(f"{key}: cannot write {folder}: a file, not a folder") from error
    except OSError as error:
        raise OSError(f"{key}: cannot write {folder}: {error.strerror or error}") from error


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (on ``.<name>.lock`` beside it, made if missing) for
    the block: processes that read, change and write the same file take turns."""
    with _lock_file(path).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class InUse(RuntimeError):
    """Another process holds what :func:`sole_user` asked for."""


@contextlib.contextmanager
def sole_user(path: Path, who: str) -> Iterator[None]:
    """Hold ``path``'s lock (``.<name>.lock`` beside it) for the block, without waiting: InUse,
    with the holder's ``who``, while another process holds it. The kernel frees the lock when
    its holder ends, however it ends (flock), so a killed holder never leaves it held."""
    with _lock_file(path).open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise InUse(handle.read().strip() or "another process") from None
        try:
            handle.truncate(0)
            handle.write(who)
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_file(path: Path) -> Path:
    """``.<name>.lock`` beside ``path`` (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.name}.lock"


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically."""
    write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def write_json(path: Path, value: Any, indent: int | None = None) -> None:
    """``value`` as JSON to ``path`` atomically (a trailing newline when indented)."""
    write_text(path, json.dumps(value, indent=indent) + ("\n" if indent is not None else ""))


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``arrays`` by name as an uncompressed ``.npz`` at ``path`` (whatever its suffix),
    atomically; read back with ``np.load(path, allow_pickle=False)``."""

    def save(partial: Path) -> None:
        with partial.open("wb") as handle:
            np.savez(handle, **arrays)

    write_atomically(path, save)


def write_array(path: Path, array: np.ndarray) -> None:
    """One array as ``.npy`` at ``path`` atomically."""

    def save(partial: Path) -> None:
        with partial.open("wb") as handle:
            np.save(handle, array)

    write_atomically(path, save)
