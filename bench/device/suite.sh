#!/bin/bash
# On the GPU machine: unpack what bench/device/pack.sh built (setup.sh), then run the overload suite of this
# checkout (`cpctl bench suite`, the same stack and scenarios as here: one gateway worker, two shards), writing
# its results into OUT. On 16 cores (not pinned) the load generator, nginx and the shards have cores to spare
# instead of sharing two with the gateway, so the same scenarios show what is left without that contention.
# Usage: [MYPYC_WHEELS=DIR] bench/device/suite.sh CARRY OUT [suite options, e.g. --only flood,cpu]
set -euo pipefail
source "$(dirname "$0")/setup.sh" "$@"  # CARRY OUT: sets CARRY, OUT and what it unpacks
shift 2
cd "$REPO"
set -o pipefail
python3 -m controlplane.cli bench suite --results-dir "$OUT" "$@" 2>&1 | tee "$OUT/suite.log"
