#!/usr/bin/env bash
# The prepared check for a lent GPU machine (torch with CUDA, no PyRadiomics, SimpleITK or
# Flower, no network; at most 10 minutes a command). Prepare its inputs on the CPU side first:
#
#   .venv/bin/python benchmarks/gpu_pack.py --cohort data/demo --out .gpu
#
# (the extracted demo cohort packed, and the wheels of MONAI, pydantic and Flower), then run
# this script there with .gpu carried (device tool: carry [".gpu"]), OUT set to the folder
# whose files come back. It writes, into $OUT:
#   study_log.txt       the demo study, `paper` preset (the demo's networks on its native 64^3
#                       crops), Swin3D, ResNet3D and DenseNet3D, their 15 folds at once
#                       (--parallel-folds), every ablation row and paired test
#   study_metrics.json  its metrics.json; study_oof.csv its out-of-fold predictions
#   gpu_memory.txt      memory-aware training of the gpu preset (96^3) under a 24 GiB budget
#                       (benchmarks/gpu_memory.py)
#   nvidia_smi.txt      GPU load and memory every 5 s meanwhile
# Time limits inside: STUDY_S (default 420 s), MEMORY_S (default 100 s). PACKED, PRESET and
# DEVICE (default .gpu/cohort.zip, paper, cuda) let a CPU run the same steps on a small cohort.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
STUDY_S=${STUDY_S:-420}
MEMORY_S=${MEMORY_S:-100}
PARALLEL=${PARALLEL:-15}
PACKED=${PACKED:-.gpu/cohort.zip}
PRESET=${PRESET:-paper}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The packages the GPU machine lacks: the carried wheels, installed beside the tree.
export PYTHONPATH="$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import monai, pydantic, flwr" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-index --no-compile --target .gpu/site .gpu/wheels/*.whl
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 \
    > "$OUT/nvidia_smi.txt" 2>&1 &
smi=$!

cohort=$(mktemp -d)/cohort study=$(mktemp -d)/study
python3 -c "from fedmets.simulation.packed_cohort import unpack_cohort as u; u('$PACKED', '$cohort')"
# One OpenMP/BLAS thread per process: the fold processes share the cores (torch's own threads
# are shared out by --parallel-folds).
OMP_NUM_THREADS=1 timeout "$STUDY_S" python3 -m fedmets study --cohort "$cohort" --preset "$PRESET" --device "$DEVICE" \
    --backbones swin3d,resnet3d,densenet3d --parallel-folds "$PARALLEL" --out "$study" \
    > "$OUT/study_log.txt" 2>&1
echo "study exit $?" >> "$OUT/study_log.txt"
cp "$study/metrics.json" "$OUT/study_metrics.json" 2>/dev/null
cp "$study/oof_predictions.csv" "$OUT/study_oof.csv" 2>/dev/null

timeout "$MEMORY_S" python3 benchmarks/gpu_memory.py --preset gpu --budget-gib 24 --batch 16 \
    > "$OUT/gpu_memory.txt" 2>&1
echo "gpu_memory exit $?" >> "$OUT/gpu_memory.txt"
kill "$smi" 2>/dev/null
tail -n 60 "$OUT/study_log.txt"
tail -n 20 "$OUT/gpu_memory.txt"
