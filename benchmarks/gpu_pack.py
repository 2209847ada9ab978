"""Pack what ``benchmarks/gpu_check.sh`` needs on a GPU machine: the wheels of the pure-Python
packages that machine lacks (MONAI, pydantic and its core, built for its Python).

    .venv/bin/python benchmarks/gpu_pack.py --out .gpu [--python-version 3.12]

Writes ``OUT/wheels/*.whl`` (pip download from the package registry, the versions installed
here) and prints their size: together with the working tree it must stay under the 64 MiB that
travels.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

WHEELS = ("monai", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wheels = args.out / "wheels"
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platform = ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", args.python_version, *platform, "-d", str(wheels), *pins],
        check=True,
    )
    size = sum(p.stat().st_size for p in wheels.glob("*.whl"))
    print(f"{wheels}: {', '.join(pins)}; {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
