#!/bin/bash
# On the GPU machine: unpack what bench/device/pack.sh built (setup.sh), then run the overload suite of this
# checkout (`cpctl bench suite`, the same stack and scenarios as here: one gateway worker, two shards), writing
# its results into OUT. On 16 cores the load generator, nginx and the shards no longer share two cores with the
# gateway, so the same scenarios show what is left when the cores are not shared.
# Usage: [MYPYC_WHEELS=DIR] bench/device/suite.sh CARRY OUT [suite options, e.g. --only flood,cpu]
set -euo pipefail
CARRY=$(realpath "${1:?usage: suite.sh CARRY OUT [options]}")
OUT=$(realpath -m "${2:?usage: suite.sh CARRY OUT [options]}")
shift 2
source "$(dirname "$0")/setup.sh"
cd "$REPO"
set -o pipefail
python3 -m controlplane.cli bench suite --results-dir "$OUT" "$@" 2>&1 | tee "$OUT/suite.log"
