"""The gateway's request path compiled with mypyc (scripts/compile-gateway, run by make where a C compiler is):
the compiled modules are the ones in use, and a source changed after compiling is caught."""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest

import controlplane.gateway.server
from controlplane.gateway import stale_extensions

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # this Python's, e.g. .cpython-311-x86_64-linux-gnu.so


def test_a_source_changed_after_compiling_is_stale(tmp_path: Path) -> None:
    for name in ("server.py", f"server{SUFFIX}", f"compiled__mypyc{SUFFIX}"):  # the shared runtime has no source
        (tmp_path / name).write_bytes(b"")
    os.utime(tmp_path / "server.py", (1_000, 1_000))
    assert stale_extensions(tmp_path) == []
    os.utime(tmp_path / "server.py", (4_000_000_000, 4_000_000_000))
    assert stale_extensions(tmp_path) == [tmp_path / "server.py"]


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="outside CI the sources may run uncompiled (no `make`)")
def test_ci_runs_the_compiled_request_path() -> None:
    assert controlplane.gateway.server.__file__.endswith(SUFFIX), "make compiles the request path (gcc is listed " \
                                                                  "in system-packages.txt)"
