"""Pack what ``benchmarks/gpu_check.sh`` needs on a GPU machine: the extracted demo cohort
(``fedmets.simulation.packed_cohort``) and the wheels of the packages that machine lacks
(``WHEELS``: MONAI, pydantic and its core, Flower and the cryptography it imports, tomli-w,
typer; built for its Python).

    .venv/bin/python benchmarks/gpu_pack.py --cohort data/demo --out .gpu [--hu-step 10]

Writes ``OUT/cohort.zip`` and ``OUT/wheels/*.whl`` (pip download from the package registry,
the versions installed here) and prints their sizes and the working tree's: together they must
stay under the 64 MiB that travels.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from fedmets.simulation.packed_cohort import pack_cohort

WHEELS = (
    "monai",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "flwr",
    "protobuf",  # the machine has one, of a version not on record: Flower's generated code
    # needs a runtime at least as new as it was generated for, so the tested one travels
    "cryptography",
    "cffi",  # cryptography's bindings
    "pycparser",  # cffi's
    "pycryptodome",
    "iterators",
    "tomli-w",  # fedmets.simulation.simulate writes the run's federation.toml
    "typer",  # the fedmets CLI's, at the version it is tested with
)
"""The distributions fedmets' study imports that the GPU machine lacks
(``gpu_machine_packages.txt``: the rest are there), and protobuf."""
LIMIT_MIB = 64


def tree_bytes() -> int:
    """The size of the git working tree that travels (tracked and untracked, not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum(Path(p.decode()).stat().st_size for p in listed if p and Path(p.decode()).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--hu-step", type=float, default=10.0)
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    packed = pack_cohort(args.cohort, args.out / "cohort.zip", args.hu_step)
    print(
        f"{args.out / 'cohort.zip'}: {packed['patients']} patients, {packed['mib']:.1f} MiB "
        f"(CT in {packed['hu_step']:g} HU steps inside {packed['hu_window']} HU, rounding SD "
        f"{packed['rounding_sd_hu']:.2f} HU)"
    )
    wheels = args.out / "wheels"
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", args.python_version]
        + [arg for platform in platforms for arg in ("--platform", platform)]
        + ["-d", str(wheels), *pins],
        check=True,
    )
    size = sum(p.stat().st_size for p in wheels.glob("*.whl")) / 2**20
    print(f"{wheels}: {', '.join(pins)}; {size:.1f} MiB")
    tree = tree_bytes() / 2**20
    total = tree + size + packed["mib"]
    print(f"working tree {tree:.1f} MiB; all that travels {total:.1f} of {LIMIT_MIB} MiB")
    if total > LIMIT_MIB:
        raise SystemExit(f"over the {LIMIT_MIB} MiB that travel: raise --hu-step")


if __name__ == "__main__":
    main()
