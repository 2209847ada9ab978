#!/usr/bin/env bash
# README command 1: install, then run the main job on the built-in synthetic cohort:
# a 4-hospital cohort, the federated simulation (Flower) with its centralised and local-only
# baselines, and the run's summary in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/fedmets synth --preset demo --sites 4 --seed 7 --out data/demo --overwrite
.venv/bin/fedmets simulate --cohort data/demo --preset demo --out runs/demo
