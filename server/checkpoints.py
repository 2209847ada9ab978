"""The protocol's checkpoints, without pickle: a finished step's value is one ``.npz`` file that
holds a JSON tree (``__tree__``) and the numpy arrays it refers to, written atomically; loading
builds only plain values, numpy arrays and the classes of :data:`RESTORABLE` from their own
data, never code. The folder also keeps the run config (``config.json``) it was written under:
resuming under another config is refused, naming the keys that changed.

A value is None, bool, int, float, str, a numpy array or scalar, a list, tuple or dict of
values (any hashable value keys), or an instance of a :data:`RESTORABLE` class."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmets.server.aggregation import Aggregator
from fedmets.shared.files import write_arrays, write_text
from fedmets.shared.harmonisation import BatchAdjustment

TREE = "__tree__"
CONFIG_FILE = "config.json"

# class name -> (its data as a value, the instance from that data)
RESTORABLE: dict[str, tuple[type, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "Aggregator": (Aggregator, Aggregator.to_checkpoint, Aggregator.from_checkpoint),
    "BatchAdjustment": (BatchAdjustment, BatchAdjustment.arrays, BatchAdjustment.from_arrays),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or a resume under another run config."""


def save_checkpoint(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` (``.npz``) atomically."""
    arrays: dict[str, np.ndarray] = {}
    tree = json.dumps(_encode(value, arrays))
    write_arrays(path, {TREE: np.array(tree), **arrays})


def load_checkpoint(path: Path) -> Any:
    """The value saved at ``path``; CheckpointError names the file when it is truncated,
    corrupted or holds what no checkpoint holds."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        return _decode(json.loads(str(arrays.pop(TREE))), arrays)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); delete it to "
            "recompute that step, or start the run without resuming"
        ) from error


def check_config(folder: Path, config: dict) -> None:
    """Record ``config`` (the run config as JSON-ready values) in ``folder``, or, when the
    folder already holds checkpoints of another config, raise CheckpointError naming the keys
    that differ (dotted paths)."""
    path = folder / CONFIG_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path} is unreadable ({error})") from error
        changed = _differences(saved, json.loads(json.dumps(config)))
        if changed:
            raise CheckpointError(
                f"cannot resume: the run config changed since its checkpoints were written "
                f"({', '.join(changed)}); start the run without resuming, or resume with the "
                "config it began with"
            )
        return
    write_text(path, json.dumps(config, indent=1, sort_keys=True) + "\n")


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths whose values differ between two JSON trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            path
            for key in sorted(set(old) | set(new))
            for path in _differences(old.get(key), new.get(key), f"{where}.{key}".lstrip("."))
        ]
    return [] if old == new else [where or "(the whole config)"]


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as a JSON tree; its arrays go into ``arrays`` by reference."""
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError("a checkpoint holds no object arrays")
        name = f"a{len(arrays)}"
        arrays[name] = array
        return {"$array": name, "scalar": isinstance(value, np.generic)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, arrays) for v in value]}
    if isinstance(value, dict):
        return {"$items": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    for name, (cls, data, _) in RESTORABLE.items():
        if type(value) is cls:
            return {"$object": name, "data": _encode(data(value), arrays)}
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


def _decode(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, arrays) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "$array" in tree:
        array = arrays[tree["$array"]]
        return array[()] if tree["scalar"] else array
    if "$tuple" in tree:
        return tuple(_decode(v, arrays) for v in tree["$tuple"])
    if "$items" in tree:
        return {_decode(k, arrays): _decode(v, arrays) for k, v in tree["$items"]}
    if "$object" in tree:
        _, _, restore = RESTORABLE[tree["$object"]]
        return restore(_decode(tree["data"], arrays))
    raise ValueError(f"unknown checkpoint node {sorted(tree)}")
