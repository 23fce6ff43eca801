#!/bin/bash
# Build what bench/scaling.py needs on the GPU machine (no network there; python3.12 with uvloop, typer, rich,
# pyyaml, aiohttp, prometheus-client, numpy 2), into a git-ignored folder to `carry` in a device run:
#   wheels/        cp312 manylinux wheels of what the project imports and the device lacks (versions of this venv)
#   triton.tar.xz  the venv's tritonserver trimmed, laid out as site-packages (pytriton/tritonserver with bin/,
#                  backends/python, caches/, the 3.12 stub only; nvidia_pytriton.libs without libpython3.13),
#                  so that controlplane/shards/triton.py finds it through `import pytriton` as it does here
#   tools.tar.xz   nginx and wrk (the Debian packages installed here) and the shared libraries they link
#                  besides glibc; run.sh runs them with LD_LIBRARY_PATH
#   repo.tar.gz    this worktree's files (tracked and untracked-not-ignored): the device gets the session's
#                  checkout, which need not be this one
# Usage: bench/device/pack.sh [DEST]   (DEST: default <this checkout>/.devicecarry; run from the repository)
# Needs: make .venv/.stamp-test and make system-deps (nginx, wrk) here, and pip access to the package index.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DEST=$(realpath -m "${1:-$ROOT/.devicecarry}")
VENV_PY=$ROOT/.venv/bin/python
SITE=$($VENV_PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$DEST"

# Keep DEST out of git in every worktree of this repository (info/exclude of the shared .git).
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
NAME="/$(realpath --relative-to="$(git -C "$(dirname "$DEST")" rev-parse --show-toplevel)" "$DEST")/"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "$NAME" "$EXCLUDE" 2>/dev/null || echo "$NAME" >> "$EXCLUDE"

echo "== wheels"
rm -rf "$DEST/wheels" && mkdir -p "$DEST/wheels"
pins=$($VENV_PY - <<'PY'
from importlib.metadata import version
names = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "orjson",
         "httptools", "mypy-extensions"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
$VENV_PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST/wheels" $pins 2>&1 | grep -v "^WARNING: Location" || true
ls "$DEST/wheels"
[ "$(ls "$DEST/wheels" | wc -l)" -eq 8 ] || { echo "expected 8 wheels" >&2; exit 1; }

echo "== triton"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
T=$SITE/pytriton/tritonserver
mkdir -p "$STAGE/site/pytriton/tritonserver/backends/python" "$STAGE/site/pytriton/tritonserver/python_backend_stubs"
: > "$STAGE/site/pytriton/__init__.py"  # only the layout is needed: triton.py takes the package's folder
cp -r "$T/bin" "$T/caches" "$STAGE/site/pytriton/tritonserver/"
cp "$T/backends/python/libtriton_python.so" "$T/backends/python/triton_python_backend_utils.py" \
    "$STAGE/site/pytriton/tritonserver/backends/python/"
cp -r "$T/python_backend_stubs/3.12" "$STAGE/site/pytriton/tritonserver/python_backend_stubs/"
mkdir -p "$STAGE/site/nvidia_pytriton.libs"
find "$SITE/nvidia_pytriton.libs" -maxdepth 1 -type f ! -name 'libpython3*' -exec cp {} "$STAGE/site/nvidia_pytriton.libs/" \;
tar -C "$STAGE/site" -cf - . | xz -T2 -6 > "$DEST/triton.tar.xz"

echo "== nginx, wrk"
mkdir -p "$STAGE/tools/bin" "$STAGE/tools/lib"
for binary in /usr/sbin/nginx /usr/bin/wrk; do
    dpkg -S "$binary" >/dev/null  # from a Debian package (nginx-light, wrk), not something built here
    cp "$binary" "$STAGE/tools/bin/"
    ldd "$binary" | awk '/=> \// {print $3}' | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' |
        while read -r lib; do cp -L "$lib" "$STAGE/tools/lib/"; done
done
ls "$STAGE/tools/lib"
tar -C "$STAGE/tools" -cf - . | xz -T2 -6 > "$DEST/tools.tar.xz"

echo "== repo"
git ls-files -co --exclude-standard -z | grep -zv '^bench/results/' | tar --null -T - -czf "$DEST/repo.tar.gz"

du -sh "$DEST"/*
du -sh "$DEST"
