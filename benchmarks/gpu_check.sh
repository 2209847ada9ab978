#!/usr/bin/env bash
# The prepared check for a lent GPU machine (torch with CUDA, no PyRadiomics, SimpleITK or
# Flower, no network; at most 10 minutes a command). Prepare its inputs on the CPU side first:
#
#   .venv/bin/python benchmarks/gpu_pack.py --out .gpu   # the MONAI and pydantic wheels
#
# then run this script there with .gpu carried (device tool: carry [".gpu"]), OUT set to the
# folder whose files come back. It writes, into $OUT:
#   gpu_memory.txt   memory-aware training of the gpu preset (96^3) under a 24 GiB budget
#                    (benchmarks/gpu_memory.py)
#   nvidia_smi.txt   GPU load and memory every 5 s meanwhile
# The centralised study runs the federated protocol, which needs Flower on that machine: the
# study on a GPU is not part of this check (docs/benchmarks.md, GPU).
# Time limit inside: MEMORY_S (default 240 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
MEMORY_S=${MEMORY_S:-240}
mkdir -p "$OUT"

# MONAI and pydantic are not on the GPU machine: install the carried wheels beside the tree.
export PYTHONPATH="$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import monai, pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-index --target .gpu/site .gpu/wheels/*.whl
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 \
    > "$OUT/nvidia_smi.txt" 2>&1 &
smi=$!
timeout "$MEMORY_S" python3 benchmarks/gpu_memory.py --preset gpu --budget-gib 24 --batch 16 \
    > "$OUT/gpu_memory.txt" 2>&1
echo "gpu_memory exit $?" >> "$OUT/gpu_memory.txt"
kill "$smi" 2>/dev/null
tail -n 40 "$OUT/gpu_memory.txt"
