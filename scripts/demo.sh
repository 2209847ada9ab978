#!/usr/bin/env bash
# README command 1: install, then run the main job on the built-in synthetic cohort.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/fedmets synth --preset demo --sites 4 --seed 7 --out data/demo --overwrite
