#!/bin/bash
# On the GPU machine: unpack what bench/device/pack.sh built (setup.sh), then run bench/gpu.py of this checkout
# (ResNet-50 in-process ceiling vs Triton direct vs the gateway, convert's agreement), writing into OUT.
# Usage: [STUB_NUMPY_WHEEL=numpy-1.26...cp312...whl] bench/device/gpu.sh CARRY OUT [bench/gpu.py options]
#   CARRY: the carried folder (.devicecarry: wheels, triton.tar.xz, tools.tar.xz); OUT: $OUT of the device run.
set -euo pipefail
source "$(dirname "$0")/setup.sh" "$@"  # CARRY OUT: sets CARRY, OUT and what it unpacks
shift 2

# numpy 2 here: with STUB_NUMPY_WHEEL (a numpy 1.26 cp312 wheel) the Python-backend stubs get an environment with
# it first (stub_env.sh, CPCTL_STUB_PYTHON), so that BYTES inputs (JPEG) work; cpctl and the benchmark keep numpy 2.
# Without that environment (no wheel, or torch there refuses numpy 1.26) the stubs run numpy 2 and JPEG is skipped.
STUB_CHECK='import numpy, torch, torchvision; torch.from_numpy(numpy.zeros(2)).cuda()
print("stub env: numpy", numpy.__version__, numpy.__file__, "torch", torch.__version__)'
if [ -n "${STUB_NUMPY_WHEEL:-}" ] \
        && STUB_PYTHON=$(bash "$REPO/bench/device/stub_env.sh" python3 "$STUB_NUMPY_WHEEL" /tmp/cpctl-stub-env) \
        && "$STUB_PYTHON" -c "$STUB_CHECK" >> "$OUT/device-env.txt" 2>&1; then
    export CPCTL_STUB_PYTHON=$STUB_PYTHON
else
    echo "stub env with numpy 1: not used (see above)" >> "$OUT/device-env.txt"
fi
record_gpu_env 'import torch, torchvision, PIL; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "torchvision", torchvision.__version__, "pillow", PIL.__version__)'
cd "$REPO"
set -o pipefail
python3 bench/gpu.py "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
