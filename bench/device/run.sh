#!/bin/bash
# On the GPU machine (no network; python3.12 with numpy 2, uvloop, typer, rich, pyyaml): unpack what
# bench/device/pack.sh built, then run bench/scaling.py of this checkout, writing into OUT.
# Usage: bench/device/run.sh CARRY OUT [bench/scaling.py options, e.g. --workers 1,2,4,8]
#   CARRY: the carried folder (.devicecarry); OUT: $OUT of the device run.
set -euo pipefail
source "$(dirname "$0")/setup.sh" "$@"  # CARRY OUT: sets CARRY, OUT and what it unpacks
shift 2

cd "$REPO"
set -o pipefail
python3 bench/scaling.py "$OUT" "$@" 2>&1 | tee "$OUT/scaling.log"
