#!/bin/bash
# On the GPU machine (no network; python3.12 with numpy 2, uvloop, typer, rich, pyyaml): unpack what
# bench/device/pack.sh built, then run bench/scaling.py of this checkout, writing into OUT.
# Usage: bench/device/run.sh CARRY OUT [bench/scaling.py options, e.g. --workers 1,2,4,8]
#   CARRY: the carried folder (.devicecarry); OUT: $OUT of the device run.
set -euo pipefail
CARRY=$(realpath "${1:?usage: run.sh CARRY OUT [options]}")
OUT=$(realpath -m "${2:?usage: run.sh CARRY OUT [options]}")
shift 2
source "$(dirname "$0")/setup.sh"

cd "$REPO"
set -o pipefail
python3 bench/scaling.py "$OUT" "$@" 2>&1 | tee "$OUT/scaling.log"
