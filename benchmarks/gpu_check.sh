#!/usr/bin/env bash
# The prepared check for a lent GPU machine (torch with CUDA, no PyRadiomics, SimpleITK or
# Flower, no network; at most 10 minutes a command). Prepare its inputs on the CPU side first:
#
#   .venv/bin/python benchmarks/gpu_pack.py --cohort data/demo --out .gpu   # ~20 MiB, + wheels
#
# then run this script there with .gpu carried (device tool: carry [".gpu"]), OUT set to the
# folder whose files come back. It writes, into $OUT:
#   gpu_study.txt              the demo study (paper preset: Swin3D, ResNet3D, DenseNet3D at
#                              64^3, all folds) with every fold x backbone image task at once
#                              (benchmarks/gpu_study.py, --parallel auto), its tables and timing
#   study/metrics.json, study/oof_predictions.csv   that study's results (figures: redraw them
#                              on the CPU with fedmets.simulation.study.write_figures)
#   gpu_memory.txt             memory-aware training of the gpu preset (96^3) under a 24 GiB
#                              budget (benchmarks/gpu_memory.py)
#   nvidia_smi.txt             GPU load and memory every 15 s during the study
# Time limits inside: STUDY_S (default 480 s) for the study, MEMORY_S (80 s) for the memory check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
STUDY_S=${STUDY_S:-480}
MEMORY_S=${MEMORY_S:-80}
mkdir -p "$OUT/study"

# MONAI and pydantic are not on the GPU machine: install the carried wheels beside the tree.
export PYTHONPATH="$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import monai, pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-index --target .gpu/site .gpu/wheels/*.whl
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 \
    > "$OUT/nvidia_smi.txt" 2>&1 &
smi=$!
timeout "$STUDY_S" python3 benchmarks/gpu_study.py --packed .gpu/demo.npz --out "$OUT/study" \
    --preset paper --backbones swin3d,resnet3d,densenet3d --parallel auto \
    > "$OUT/gpu_study.txt" 2>&1
echo "gpu_study exit $? after at most $STUDY_S s" >> "$OUT/gpu_study.txt"
pkill -f "multiprocessing.spawn" 2>/dev/null  # workers left by a study stopped at its limit
kill "$smi" 2>/dev/null
rm -rf "$OUT/study/crops" "$OUT/study/.study-model-inputs.npy" "$OUT"/study/*.png

timeout "$MEMORY_S" python3 benchmarks/gpu_memory.py --preset gpu --budget-gib 24 --batch 16 \
    > "$OUT/gpu_memory.txt" 2>&1
echo "gpu_memory exit $?" >> "$OUT/gpu_memory.txt"
tail -n 40 "$OUT/gpu_study.txt" "$OUT/gpu_memory.txt"
