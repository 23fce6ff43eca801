#!/bin/bash
# On the GPU machine: unpack what bench/device/pack.sh built (setup.sh), then run bench/diagnose/large_body.py
# of this checkout (9.6 MB bodies to a model that does no work: where a large request waits inside the gateway,
# issue 11), writing large-body.{json,log} and large-body.logs.tar.gz into OUT.
# Usage: bench/device/large_body.sh CARRY OUT [large_body.py options]
set -euo pipefail
source "$(dirname "$0")/setup.sh" "$@"  # CARRY OUT: sets CARRY, OUT and what it unpacks
shift 2
cd "$REPO"
python3 bench/diagnose/large_body.py --out "$OUT/large-body.json" "$@" 2>&1 | tee "$OUT/large-body.log"
