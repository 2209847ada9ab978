"""Synthetic cohort generation: seconds and MB per patient for the tiny and demo presets.

    .venv/bin/python benchmarks/bench_synth.py [--patients 12] [--workers 2]

Per-patient figures come from rendering + writing a sample of each preset's patients in one
process; the whole-cohort figure runs `generate_cohort` on the tiny preset with --workers.
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from fedmets.simulation.cohort import PRESETS, sample_cohort
from fedmets.simulation.synth import generate_cohort, patient_jobs, render_and_write


def per_patient(preset_name: str, n_patients: int, seed: int) -> tuple[float, float]:
    """(seconds, MB) per patient over an evenly spread sample of the preset's patients."""
    preset = PRESETS[preset_name]
    tables = sample_cohort(preset, preset.default_sites, seed)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = patient_jobs(tables, Path(tmp), preset.fov_mm, seed)
        sample = jobs[:: max(1, len(jobs) // n_patients)][:n_patients]
        for site in tables.sites:
            for sub in ("images", "masks"):
                (Path(tmp) / site.site_id / sub).mkdir(parents=True)
        started = time.perf_counter()
        results = [render_and_write(job) for job in sample]
        seconds = time.perf_counter() - started
    return seconds / len(sample), sum(r["bytes"] for r in results) / len(sample) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    for preset_name in ("tiny", "demo"):
        seconds, megabytes = per_patient(preset_name, args.patients, args.seed)
        print(f"{preset_name:5s}: {seconds:.3f} s/patient (1 process), {megabytes:.3f} MB/patient")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = generate_cohort("tiny", None, args.seed, Path(tmp) / "c", workers=args.workers)
        seconds = time.perf_counter() - started
    print(
        f"tiny cohort, {summary['n_patients']} patients, {args.workers} workers: {seconds:.1f} s "
        f"({seconds / summary['n_patients']:.3f} s/patient wall)"
    )


if __name__ == "__main__":
    main()
