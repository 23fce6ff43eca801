#!/bin/bash
# On the GPU machine: unpack what bench/device/pack.sh built (setup.sh), then run bench/linearity.py of this
# checkout (gateway workers 1 -> W in front of stand-in shards, on cores of their own), writing into OUT.
# Usage: [MYPYC_WHEELS=DIR] bench/device/linearity.sh CARRY OUT [bench/linearity.py options]
set -euo pipefail
source "$(dirname "$0")/setup.sh" "$@"  # CARRY OUT: sets CARRY, OUT and what it unpacks
shift 2
cat /sys/devices/system/cpu/cpu*/topology/thread_siblings_list 2>/dev/null | sort -u | tr '\n' ' ' \
    | sed 's/^/cpu siblings: /' >> "$OUT/device-env.txt"; echo >> "$OUT/device-env.txt"
cd "$REPO"
set -o pipefail
python3 bench/linearity.py "$OUT" "$@" 2>&1 | tee "$OUT/linearity.log"
