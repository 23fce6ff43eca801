#!/bin/bash
# Sourced by the scripts beside it on the GPU machine (no network; python3.12 with numpy 2, torch, uvloop, typer,
# rich, pyyaml), as `source setup.sh CARRY OUT ...` (the script's own arguments; it then shifts 2): CARRY is the
# carried folder (.devicecarry: wheels, triton.tar.xz, tools.tar.xz), OUT the device run's $OUT. Installs the
# carried wheels into /tmp/cpctl-site (PYTHONPATH), unpacks tritonserver there in the wheel's layout, nginx and wrk
# behind wrappers, finds libpython3.12 for the Python backend stub, and writes device-env.txt into OUT. Sets CARRY
# and OUT (absolute paths), REPO, SITE, TOOLS, PATH, PYTHONPATH.
CARRY=$(realpath "${1:?usage: $(basename "$0") CARRY OUT [options]}")
OUT=$(realpath -m "${2:?usage: $(basename "$0") CARRY OUT [options]}")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SITE=/tmp/cpctl-site
TOOLS=/tmp/cpctl-tools
mkdir -p "$OUT" "$SITE" "$TOOLS/path"

if [ ! -e "$SITE/.unpacked" ]; then  # once a machine: a second script of the same call finds it done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$CARRY"/wheels/*.whl
    tar -xJf "$CARRY/triton.tar.xz" -C "$SITE"  # pytriton/tritonserver + nvidia_pytriton.libs, as in a venv
    tar -xJf "$CARRY/tools.tar.xz" -C "$TOOLS"
    touch "$SITE/.unpacked"
fi
for tool in nginx wrk; do  # Debian builds: their own libraries (LD_LIBRARY_PATH for them alone)
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/lib exec %s/bin/%s "$@"\n' "$TOOLS" "$TOOLS" "$tool" > "$TOOLS/path/$tool"
    chmod +x "$TOOLS/path/$tool"
done

# The Python backend's 3.12 stub links libpython3.12.so.1.0 (in /usr/lib/x86_64-linux-gnu there).
LIBPYTHON=""
for candidate in $(ldconfig -p 2>/dev/null | awk '/libpython3\.12\.so\.1\.0 / {print $NF}' || true) \
        /usr/lib/x86_64-linux-gnu/libpython3.12.so.1.0 \
        "$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')/libpython3.12.so.1.0"; do
    if [ -e "$candidate" ]; then LIBPYTHON=$candidate; break; fi
done
[ -n "$LIBPYTHON" ] || { echo "libpython3.12.so.1.0 not found: the Python backend stub cannot start" >&2; exit 1; }
export LD_LIBRARY_PATH="$(dirname "$LIBPYTHON")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$TOOLS/path:$PATH" PYTHONPATH="$SITE:$REPO" PYTHONUNBUFFERED=1

T=$SITE/pytriton/tritonserver
(
    set +e +o pipefail
    echo "machine: $(nproc) cores, $(python3 -V), $(uname -r); libpython: $LIBPYTHON"
    nginx -v 2>&1
    wrk -v 2>&1 | head -1
    python3 -c 'import numpy, orjson, httptools, pydantic, uvloop, typer, rich, yaml
print("numpy", numpy.__version__, "pydantic", pydantic.VERSION, "uvloop", uvloop.__version__, "typer", typer.__version__)'
    LD_LIBRARY_PATH="$SITE/nvidia_pytriton.libs:$LD_LIBRARY_PATH" ldd "$T/bin/tritonserver" \
        "$T/python_backend_stubs/3.12/triton_python_backend_stub" | grep "not found" \
        || echo "tritonserver and the 3.12 stub: all libraries found"
) 2>&1 | tee "$OUT/device-env.txt"

# With MYPYC_WHEELS set (a folder of cp312 wheels of the `compiled` extra and what it needs, carried along:
# bench/device/README.md), the gateway's request path is compiled with mypyc as `make` does here; without it the
# .py sources run there (about twice the CPU a request).
if [ -n "${MYPYC_WHEELS:-}" ] && [ ! -e /tmp/mypyc-site/.compiled ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/mypyc-site \
        "$MYPYC_WHEELS"/*.whl
    (cd "$REPO" && PYTHONPATH="/tmp/mypyc-site:$PYTHONPATH" python3 scripts/compile-gateway) \
        && touch /tmp/mypyc-site/.compiled
fi
if [ -e /tmp/mypyc-site/.compiled ]; then echo "gateway: compiled with mypyc" | tee -a "$OUT/device-env.txt"; fi


# record_gpu_env PYTHON_LINE: the versions a GPU benchmark depends on (PYTHON_LINE prints them) and the GPU.
record_gpu_env() {
    python3 -c "$1" 2>&1 | tee -a "$OUT/device-env.txt" || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 \
        | tee -a "$OUT/device-env.txt" || true
}
