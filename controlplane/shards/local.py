"""The `local` shard backend: tritonserver processes on this machine, under a supervisor.

Each replica gets free loopback ports, serves the models its shard lists, and is watched: its exit is
seen at once (a pidfd), its readiness is probed every `probe_interval_s`. A replica that exits or stays
unresponsive is killed with its whole process group (Python-backend stubs included) and started again
after a back-off that doubles up to 30 s and resets once a replica has stayed up for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from controlplane.procs import ManagedProcess, free_port
from controlplane.shards.base import Endpoint, ShardBackend, ShardStatus, probe_ready
from controlplane.shards.triton import GpuMemory, TritonInstall
from controlplane.spec import ClusterSpec, Shard

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a replica up this long has its back-off reset
UNREADY_AFTER_FAILED_PROBES = 2
RESTART_AFTER_FAILED_PROBES = 10  # a frozen server is restarted after ~10 probe intervals


class ShardStartError(RuntimeError):
    pass


def has_gpu() -> bool:
    """Whether this machine exposes an NVIDIA GPU to processes (the driver's control device exists)."""
    return Path("/dev/nvidiactl").exists()


def link_model_repository(spec: ClusterSpec, target: Path) -> Path:
    """A repository of links named as the spec names the models, each to its `path` in the real one.

    Triton knows a model by its directory name; the links let the spec choose names and check that every
    model exists before a server is started.
    """
    source = Path(spec.model_repository)
    served = [m for m in spec.models if any(m.name in shard.models for shard in spec.shards)]
    missing = [f"{m.name} ({source / m.path})" for m in served if not (source / m.path / "config.pbtxt").is_file()]
    if missing:
        raise ShardStartError(f"model directories without a config.pbtxt: {', '.join(missing)}")
    target.mkdir(parents=True, exist_ok=True)
    for link in target.iterdir():
        link.unlink()
    for model in served:
        (target / model.name).symlink_to((source / model.path).resolve(), target_is_directory=True)
    return target


class LocalReplica:
    """One tritonserver process of a shard, and the loop that keeps it running."""

    def __init__(self, backend: LocalShards, shard: Shard, index: int, standby: bool) -> None:
        self.backend = backend
        self.shard = shard
        self.name = f"{shard.name}-{index}"
        self.standby = standby
        self.process: ManagedProcess | None = None
        self.http_port = 0
        self.metrics_port = 0
        self.state = "stopped"
        self.restarts = 0
        self.last_error: str | None = None
        self.ready_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # --- what the backend reads -------------------------------------------------------------------
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, "127.0.0.1", self.http_port, frozenset(self.shard.models), self.standby,
                        gpu=self.shard.gpu is not None)

    def status(self) -> ShardStatus:
        running = self.state not in ("stopped", "failed")
        return ShardStatus(
            name=self.name, shard=self.shard.name, state=self.state, models=list(self.shard.models),
            url=f"http://127.0.0.1:{self.http_port}" if running and self.http_port else None,
            metrics_url=f"http://127.0.0.1:{self.metrics_port}/metrics" if running and self.metrics_port else None,
            pid=self.process.pid if self.process and running else None,
            restarts=self.restarts, standby=self.standby, last_error=self.last_error,
        )

    def _set_state(self, state: str) -> None:
        if state != self.state:
            was_ready = self.state == "ready"
            self.state = state
            log.info("shard %s: %s", self.name, state)
            if was_ready or state == "ready":
                self.backend._notify()
            if state == "ready":
                self.ready_event.set()

    # --- lifecycle --------------------------------------------------------------------------------
    def launch(self, new_ports: bool) -> None:
        if new_ports or not self.http_port:
            self.http_port, self.metrics_port = free_port(), free_port()
        backend = self.backend
        argv = backend.triton.argv(backend.model_repository, list(self.shard.models), self.http_port,
                                   self.metrics_port, backend.gpu_memory(self.shard))
        self.process = ManagedProcess(argv, env=backend.triton.env(backend.cuda_visible_devices(self.shard)),
                                      log_path=backend.log_dir / f"{self.name}.log")
        self._set_state("starting")

    async def supervise(self) -> None:
        """Run the replica until cancelled: start, watch, restart with back-off."""
        backoff = BACKOFF_FIRST_S
        new_ports = True
        while True:
            self.launch(new_ports)
            started = time.monotonic()
            became_ready = await self._wait_ready()
            if became_ready:
                await self._watch()
            new_ports = not became_ready  # a server that never came up may have lost its ports
            # Out of the endpoint set first: until the group is gone, stubs still hold the listening socket,
            # where new connections would be accepted by the kernel and never answered.
            self._set_state("restarting")
            await asyncio.to_thread(self.process.kill)
            self.restarts += 1
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = BACKOFF_FIRST_S
            log.warning("shard %s: restarting in %.1f s (%s)", self.name, backoff, self.last_error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.backend.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.last_error = f"exited with code {self.process.poll()} while starting: " + \
                    self.process.log_tail(600).strip().replace("\n", " | ")
                return False
            if await probe_ready("127.0.0.1", self.http_port, timeout_s=0.5):
                self.last_error = None
                self._set_state("ready")
                return True
            await asyncio.sleep(0.05)
        self.last_error = f"not ready after {self.backend.ready_timeout_s:.0f} s"
        return False

    async def _watch(self) -> None:
        """Return when the process exits or stops answering probes for too long."""
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(self.process.pid)
        loop.add_reader(pidfd, exited.set)
        try:
            failed_probes = 0
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(exited.wait(), self.backend.probe_interval_s)
                if exited.is_set():
                    self.last_error = f"exited with code {self.process.poll()}"
                    return
                if await probe_ready("127.0.0.1", self.http_port, timeout_s=self.backend.probe_interval_s):
                    failed_probes = 0
                    self._set_state("ready")
                    continue
                failed_probes += 1
                if failed_probes >= UNREADY_AFTER_FAILED_PROBES:
                    self._set_state("unready")
                if failed_probes >= RESTART_AFTER_FAILED_PROBES:
                    self.last_error = f"unresponsive for {failed_probes} probes"
                    return
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    async def start(self) -> None:
        self.ready_event.clear()
        self.task = asyncio.create_task(self.supervise(), name=f"supervise-{self.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.process is not None:
            # Out of the endpoint set first: a server shutting down (3-4 s) refuses and drops connections.
            self._set_state("stopping")
            await asyncio.to_thread(self.process.stop, self.backend.stop_grace_s)
        self._set_state("stopped")


class LocalShards(ShardBackend):
    """Every replica of every shard of a spec, as local tritonserver processes."""

    def __init__(self, spec: ClusterSpec, run_dir: Path, *, ready_timeout_s: float = 60.0,
                 probe_interval_s: float = 1.0, stop_grace_s: float = 5.0) -> None:
        super().__init__()
        self.spec = spec
        self.log_dir = run_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.model_repository = link_model_repository(spec, run_dir / "model-repository")
        self.ready_timeout_s = ready_timeout_s
        self.probe_interval_s = probe_interval_s
        self.stop_grace_s = stop_grace_s
        self.triton = TritonInstall.find()
        self.gpu = has_gpu()
        self.replicas: list[LocalReplica] = []
        for shard in spec.shards:
            self.replicas += [LocalReplica(self, shard, i, standby=False) for i in range(shard.replicas)]
            self.replicas += [LocalReplica(self, shard, shard.replicas + i, standby=True)
                              for i in range(shard.standby)]

    def cuda_visible_devices(self, shard: Shard) -> str | None:
        """The GPU (index or MIG UUID) a shard's servers see; None leaves the environment as it is.

        On a machine without GPUs the spec's GPU is ignored and Triton runs the models on the CPU.
        """
        if shard.gpu is None or not self.gpu:
            return None
        return str(shard.gpu)

    def gpu_memory(self, shard: Shard) -> GpuMemory | None:
        """Triton's memory pools for a shard that runs on a GPU; None for one on the CPU."""
        if self.cuda_visible_devices(shard) is None:
            return None
        return GpuMemory(shard.pinned_memory_mb, shard.cuda_memory_pool_mb)

    async def start(self) -> None:
        active = [r for r in self.replicas if not r.standby]
        for replica in active:
            await replica.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(r.ready_event.wait() for r in active)), self.ready_timeout_s)
        except TimeoutError:
            failed = [f"{r.name}: {r.last_error or r.state}" for r in active if r.state != "ready"]
            await self.stop()
            raise ShardStartError("shards did not become ready: " + "; ".join(failed)) from None

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.replicas))

    async def set_standby_active(self, shard: str, count: int) -> None:
        standby = [r for r in self.replicas if r.shard.name == shard and r.standby]
        for i, replica in enumerate(standby):
            if i < count and replica.task is None:
                await replica.start()
            elif i >= count and replica.task is not None:
                await replica.stop()

    def status(self) -> list[ShardStatus]:
        return [r.status() for r in self.replicas]

    def endpoints(self) -> list[Endpoint]:
        return [r.endpoint() for r in self.replicas if r.state == "ready"]

    def replica(self, name: str) -> LocalReplica:
        return next(r for r in self.replicas if r.name == name)
