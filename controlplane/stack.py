"""The stack of `cpctl up` / `cpctl gateway`: the spec's shards behind the gateway.

The gateway runs as worker processes on one port that this process supervises (`gateway/workers.py`), one
or more: this process owns the shards and never serves requests itself. While it runs, a state file in the
run directory says where everything is (`cpctl status` reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path

from controlplane.gateway.workers import WorkerPool
from controlplane.shards.base import Endpoint, ShardBackend
from controlplane.shards.local import LocalShards
from controlplane.spec import ClusterSpec


class StackAlreadyRunning(RuntimeError):
    pass


def run_dir_for(spec: ClusterSpec) -> Path:
    """Where a cluster's logs and state live: $CPCTL_RUN_DIR/<cluster>, by default under the temp dir."""
    base = os.environ.get("CPCTL_RUN_DIR") or Path(tempfile.gettempdir()) / f"cpctl-{os.getuid()}"
    return Path(base) / spec.cluster


def read_state(run_dir: Path) -> dict | None:
    """The state a running `cpctl up` wrote, or None when none runs for this run dir."""
    try:
        state = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(state["pid"], 0)
    except (ProcessLookupError, KeyError, TypeError):
        return None
    except PermissionError:
        pass
    return state


class LocalStack:
    """The gateway in front of a shard backend: local processes by default, or any other (e.g. static)."""

    def __init__(self, spec: ClusterSpec, run_dir: Path, port: int | None = None,
                 shards: ShardBackend | None = None) -> None:
        self.spec = spec
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.port = spec.gateway.port if port is None else port
        local = shards is None
        self.shards = shards if shards is not None else LocalShards(spec, run_dir)
        workers = spec.gateway.worker_count()
        # Workers of `cpctl up` log into the run directory; in-cluster (`cpctl gateway`) they log to stderr.
        self.gateway = WorkerPool(spec, workers, self._set_standby, log_dir=run_dir / "logs" if local else None,
                                  drain_elsewhere=self.shards.set_draining)
        self.url = ""
        self._standby_changes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if read_state(self.run_dir) is not None:
            raise StackAlreadyRunning(
                f"a stack for cluster '{self.spec.cluster}' already runs (state in {self.run_dir}); stop it first"
            )
        await self.shards.start()
        self.shards.subscribe(self._on_endpoints)
        try:
            port = await self.gateway.start(self.spec.gateway.listen, self.port)
        except OSError as exc:
            await self.shards.stop()
            raise OSError(f"gateway cannot listen on {self.spec.gateway.listen}:{self.port}: "
                          f"{exc.strerror or exc}") from None
        self.url = f"http://{self.spec.gateway.listen}:{port}"
        self.write_state()

    async def stop(self) -> None:
        await self.gateway.stop()
        for change in list(self._standby_changes):
            change.cancel()
        await self.shards.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "state.json").unlink()

    def _set_standby(self, active: bool) -> None:
        """The ladder's step 1: run (or release) every shard's standby replicas."""
        for shard in self.spec.shards:
            if shard.standby:
                change = asyncio.get_running_loop().create_task(
                    self.shards.set_standby_active(shard.name, shard.standby if active else 0))
                self._standby_changes.add(change)
                change.add_done_callback(self._standby_changes.discard)

    def _on_endpoints(self, endpoints: list[Endpoint]) -> None:
        self.gateway.update(endpoints)
        if self.url:
            self.write_state()

    def snapshot(self) -> dict:
        gateway = self.gateway.snapshot()
        gateway["by_status"] = dict(sorted(gateway["by_status"].items()))
        return {
            "cluster": self.spec.cluster,
            "pid": os.getpid(),
            "gateway": self.url,
            **gateway,
            "shards": [dataclasses.asdict(s) for s in self.shards.status()],
        }

    def write_state(self) -> None:
        path = self.run_dir / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=1))
        tmp.replace(path)


async def run_until(stack: LocalStack, stop: asyncio.Event) -> None:
    """Start the stack, wait for `stop`, then stop everything it started."""
    await stack.start()
    try:
        await stop.wait()
    finally:
        await stack.stop()
