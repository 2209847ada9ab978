#!/usr/bin/env bash
# README command 1: install, then run the main job on the built-in synthetic cohort:
# the 4-hospital quickstart cohort (240 patients), the federated simulation (Flower) with its
# final model and bundle, its centralised and local-only baselines, and the run's summary and
# report in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/fedmets synth --preset quickstart --seed 7 --out data/quickstart --overwrite
.venv/bin/fedmets simulate --cohort data/quickstart --preset quickstart --out runs/quickstart --overwrite
