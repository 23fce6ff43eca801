#!/bin/bash
# On the GPU machine: unpack what bench/device/pack.sh built (setup.sh), then run bench/llm.py of this checkout
# (the 7B llm example: transformers baseline, 1 stage shard, 4 stage shards, mixed-priority overload), writing
# into OUT. transformers and safetensors are the machine's own (its torch venv); nothing of them travels.
# Usage: bench/device/llm.sh CARRY OUT [bench/llm.py options]
#   CARRY: the carried folder (.devicecarry: wheels, triton.tar.xz, tools.tar.xz); OUT: $OUT of the device run.
set -euo pipefail
source "$(dirname "$0")/setup.sh" "$@"  # CARRY OUT: sets CARRY, OUT and what it unpacks
shift 2

record_gpu_env 'import torch, transformers, safetensors; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "safetensors", safetensors.__version__)'
cd "$REPO"
set -o pipefail
python3 bench/llm.py "$OUT" "$@" 2>&1 | tee "$OUT/llm.log"
