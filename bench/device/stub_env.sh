#!/bin/bash
# An environment for the Triton Python-backend stubs on a numpy 2 machine: PYTHON's own packages (torch,
# torchvision, ...) with the given numpy 1.x wheel ahead of them. This Triton build's stub was compiled against
# numpy 1 and misreads BYTES tensors under numpy 2 (shared/design/FACTS.md); torch built against numpy 2 runs
# with numpy 1.26. Prints the environment's python3: pass it as CPCTL_STUB_PYTHON (controlplane/shards/triton.py)
# so that only the stubs use it.
# Usage: bench/device/stub_env.sh PYTHON NUMPY1_WHEEL DEST
set -euo pipefail
PYTHON=${1:?usage: stub_env.sh PYTHON NUMPY1_WHEEL DEST}
WHEEL=${2:?usage: stub_env.sh PYTHON NUMPY1_WHEEL DEST}
DEST=${3:?usage: stub_env.sh PYTHON NUMPY1_WHEEL DEST}
rm -rf "$DEST"
"$PYTHON" -m venv --without-pip "$DEST"
SITE_DIR=$("$DEST/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" -m zipfile -e "$WHEEL" "$SITE_DIR"  # a wheel is a zip of what goes into site-packages; no pip needed
# PYTHON's package directories come after the environment's own (where numpy 1 now is): a .pth line appends to sys.path.
"$PYTHON" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    > "$SITE_DIR/machine-python.pth"
"$DEST/bin/python3" -c 'import numpy, sys; assert numpy.__version__.startswith("1."), numpy.__version__' >&2
echo "$DEST/bin/python3"
