#!/usr/bin/env bash
# README command 2: install, lint, run the test suite.
#   bash scripts/test.sh            the full suite (what CI runs)
#   bash scripts/test.sh --quick    everything not marked slow (real Flower processes, whole
#                                   simulations, extraction fixtures): the development loop
# Other arguments go to pytest (e.g. -k attacks, -x).
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
.venv/bin/python -m pytest -q --durations=12 "${args[@]}"
