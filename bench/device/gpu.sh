#!/bin/bash
# On the GPU machine: unpack what bench/device/pack.sh built (setup.sh), then run bench/gpu.py of this checkout
# (ResNet-50 in-process ceiling vs Triton direct vs the gateway, convert's agreement), writing into OUT.
# Usage: bench/device/gpu.sh CARRY OUT [bench/gpu.py options]
#   CARRY: the carried folder (.devicecarry: wheels, triton.tar.xz, tools.tar.xz); OUT: $OUT of the device run.
set -euo pipefail
CARRY=$(realpath "${1:?usage: gpu.sh CARRY OUT [options]}")
OUT=$(realpath -m "${2:?usage: gpu.sh CARRY OUT [options]}")
shift 2
source "$(dirname "$0")/setup.sh"

record_gpu_env 'import torch, torchvision, PIL; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "torchvision", torchvision.__version__, "pillow", PIL.__version__)'
cd "$REPO"
set -o pipefail
python3 bench/gpu.py "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
