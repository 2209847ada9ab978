#!/usr/bin/env bash
# README command 2: install, lint, run the test suite.
#   bash scripts/test.sh            the full suite (what CI runs)
#   bash scripts/test.sh --quick    everything not marked slow (real Flower processes, whole
#                                   simulations, extraction fixtures, any other test of 10 s
#                                   or more on 2 cores): the development loop, under 4 minutes
# Other arguments go to pytest (e.g. -k attacks, -x). Tests run on 3 pytest-xdist workers, a
# module's tests on one, modules in collection order (the longest first: tests/conftest.py);
# FEDMETS_TEST_WORKERS changes the count (0: one process, as plain pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
    if [[ $arg == --quick ]]; then
        args+=(-m "not slow")
    else
        args+=("$arg")
    fi
done
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
workers=${FEDMETS_TEST_WORKERS:-3}
if [[ $workers != 0 ]]; then
    args=(-n "$workers" --dist loadfile --no-loadscope-reorder "${args[@]}")
    # One torch/OpenMP thread per process: the workers and the Flower processes they start
    # already keep both cores busy, and two threads each only add contention (595 s against
    # 678 s for the whole suite on the 2-core VM, 2026-12-06).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
.venv/bin/python -m pytest -q --durations=12 "${args[@]}"
