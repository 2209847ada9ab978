"""fedmets: federated prediction of distant metastasis in head-and-neck cancer.

One import namespace over the repository's layers, whose folders stay at its top level:
``fedmets.shared`` (``shared/``: what both sides import), ``fedmets.client`` (``client/``: the
hospital side), ``fedmets.server`` (``server/``: the coordinating centre), ``fedmets.simulation``
(``simulation/``: researchers' tools) and ``fedmets.cli`` (this folder: the command line).

An installed wheel holds them as real subpackages (setuptools ``package-dir`` in
pyproject.toml). A source tree -- a checkout on ``sys.path``, or the Flower app bundle that
a SuperLink unpacks and imports -- has them beside this folder: :class:`_LayerFinder` maps the
four layer names (and nothing else) there.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path

LAYERS = ("shared", "client", "server", "simulation")


class _LayerFinder(MetaPathFinder):
    """``fedmets.<layer>`` -> ``<root>/<layer>/`` of the source tree this package lies in, asked
    first: a Flower app bundle's own code, not another copy an editable install points at."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, name: str, path: object, target: object = None) -> ModuleSpec | None:
        package, _, layer = name.partition(".")
        if package != __name__ or layer not in LAYERS:
            return None
        folder = self.root / layer
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


_root = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "shared").is_dir() and (_root / "shared" / "__init__.py").is_file():
    sys.meta_path.insert(0, _LayerFinder(_root))
