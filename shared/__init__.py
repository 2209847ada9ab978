"""Code both sides of the federation import: configuration models, model definitions, metrics,
and the records that cross the wire."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedmets")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
