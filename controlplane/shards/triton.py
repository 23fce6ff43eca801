"""How to run the real tritonserver bundled in the PyPI wheel nvidia-pytriton (see shared/design/FACTS.md).

The wheel ships the binary and the Python backend, but three things must be arranged by hand: a backend
directory holding the Python backend together with the stub for this Python version, LD_LIBRARY_PATH
pointing at the wheel's bundled libraries (else the stub hangs ~30 s looking for libcudart), and the venv's
`bin/` first on PATH (the stub finds its site-packages through the `python3` it sees there).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from controlplane.procs import ManagedProcess, free_port
from controlplane.shards.base import probe_ready


class TritonNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class GpuMemory:
    """Triton's memory pools of a server on a GPU (from the shard's spec)."""

    pinned_memory_mb: int
    cuda_memory_pool_mb: int


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path
    lib_dir: Path

    @classmethod
    def find(cls) -> TritonInstall:
        """Locate the wheel's tritonserver and prepare its backend directory (once per venv)."""
        try:
            import pytriton
        except ImportError:
            raise TritonNotFound("tritonserver not found: `pip install nvidia-pytriton` (or run `make up`)") from None
        root = Path(pytriton.__file__).parent / "tritonserver"
        binary = root / "bin" / "tritonserver"
        lib_dir = root.parent.parent / "nvidia_pytriton.libs"
        if not binary.exists():
            raise TritonNotFound(f"tritonserver binary missing at {binary}")
        return cls(binary=binary, backend_dir=_prepare_backend_dir(root), lib_dir=lib_dir)

    def argv(self, model_repository: Path, models: list[str], http_port: int, metrics_port: int,
             gpu: GpuMemory | None = None) -> list[str]:
        """A tritonserver command line serving exactly `models` on loopback ports; on a GPU when `gpu` is given."""
        argv = [
            str(self.binary),
            f"--model-repository={model_repository}",
            f"--backend-directory={self.backend_dir}",
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--allow-grpc=false",  # the gateway speaks HTTP; one port less to find free
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics_port}",
            "--disable-auto-complete-config",  # start-up 0.3 s instead of 2+ s; configs are complete
            "--model-control-mode=explicit",
            "--exit-on-error=true",
            "--exit-timeout-secs=3",  # on SIGTERM, wait at most 3 s for requests in flight
            "--log-verbose=0",
        ]
        if gpu is None:
            argv += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        else:
            # The server sees one GPU (CUDA_VISIBLE_DEVICES: an index or a MIG instance), device 0 to it.
            argv += ["--allow-gpu-metrics=true",
                     f"--pinned-memory-pool-byte-size={gpu.pinned_memory_mb << 20}",
                     f"--cuda-memory-pool-byte-size=0:{gpu.cuda_memory_pool_mb << 20}"]
        argv += [f"--load-model={name}" for name in models]
        return argv

    def env(self, cuda_visible_devices: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{stub_python().parent}:{env.get('PATH', '/usr/bin:/bin')}"
        library_path = [str(self.lib_dir), *_own_libpython_dir(), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(library_path).rstrip(":")
        if cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        return env


def start_ready(repository: Path, models: list[str], log_path: Path, env: dict[str, str] | None = None,
                timeout_s: float = 60.0) -> tuple[ManagedProcess, int]:
    """One tritonserver serving `models` of `repository`, waited for until ready (bounded), for the tests,
    benchmarks and diagnostics that drive a server by hand: the process and its HTTP port. RuntimeError with the
    tail of its log when it exits or is not ready in time."""
    install = TritonInstall.find()
    port = free_port()
    process = ManagedProcess(install.argv(repository, models, port, free_port()),
                             env=install.env(None) if env is None else env, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if asyncio.run(probe_ready("127.0.0.1", port, 0.2)):
            return process, port
        time.sleep(0.1)
    process.stop()
    raise RuntimeError(f"tritonserver did not become ready: {process.log_tail()}")


def stub_python() -> Path:
    """The Python whose environment the Python-backend stubs run in (they find it as `python3` on PATH):
    `$CPCTL_STUB_PYTHON` when set, else this interpreter. The variable exists for numpy 2 machines: this Triton
    build's stub was compiled against numpy 1 and misreads BYTES tensors under numpy 2, so there the stubs are
    given an environment with numpy 1.26 first (bench/device/setup.sh builds one) while cpctl itself keeps numpy 2.
    """
    chosen = os.environ.get("CPCTL_STUB_PYTHON")
    if not chosen:
        return Path(sys.executable)
    path = Path(chosen)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise TritonNotFound(f"CPCTL_STUB_PYTHON={chosen}: not an executable Python interpreter")
    return path


def _own_libpython_dir() -> list[str]:
    """The directory of this interpreter's own libpython, when it has one (a pyenv or self-built Python).

    The stub links `libpython3.X.so.1.0` by name: without this it takes the distribution's, whose patch level
    may differ from this interpreter's extension modules (Debian's 3.11.2 lacks `_PyModule_Add`, which the
    3.11.7 `_ssl` extension needs, so anything importing `ssl` in a model, e.g. transformers, failed to load).
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    return [libdir] if libdir and soname and (Path(libdir) / soname).is_file() else []


def _prepare_backend_dir(root: Path) -> Path:
    """A backend directory whose python/ holds the backend library and this Python's stub."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonNotFound(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    backend_dir = Path(sys.prefix) / "var" / "cpctl" / f"triton-backends-{version}"
    python_dir = backend_dir / "python"
    sources = [root / "backends" / "python" / "libtriton_python.so",
               root / "backends" / "python" / "triton_python_backend_utils.py", stub]
    if all((python_dir / s.name).exists() for s in sources):
        return backend_dir
    staging = backend_dir.with_name(backend_dir.name + f".tmp{os.getpid()}")
    (staging / "python").mkdir(parents=True, exist_ok=True)
    for source in sources:
        shutil.copy2(source, staging / "python" / source.name)
    # rename is atomic: concurrent starters never see a half-copied backend
    try:
        staging.rename(backend_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return backend_dir
