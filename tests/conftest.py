"""Shared test fixtures: a real `cpctl up` stack (real tritonserver shards behind the gateway).

With CI=true, a skipped test fails the run: nothing passes in CI by not running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.procs import ManagedProcess, free_port, group_members

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_SPEC = ROOT / "examples" / "local" / "cluster.yaml"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"


@pytest.fixture(scope="session", autouse=True)
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stack of the test session keeps its state and logs here, apart from a user's `make up`."""
    path = tmp_path_factory.mktemp("cpctl-run")
    os.environ["CPCTL_RUN_DIR"] = str(path)
    return path


@dataclass
class RunningStack:
    process: ManagedProcess
    spec: Path
    state_file: Path

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    @property
    def gateway(self) -> str:
        return self.state()["gateway"]

    @property
    def address(self) -> str:
        return self.gateway.removeprefix("http://")

    def shard_pids(self) -> dict[str, int]:
        return {s["name"]: s["pid"] for s in self.state()["shards"] if s["pid"]}

    def worker_pids(self) -> dict[int, int]:
        """Gateway worker processes by index."""
        return {w["index"]: w["pid"] for w in self.state().get("workers", []) if w["pid"] != self.process.pid}

    def every_pid(self) -> set[int]:
        """The cpctl process and every process of every shard's and gateway worker's group, as of now."""
        pids = {self.process.pid}
        for pid in [*self.shard_pids().values(), *self.worker_pids().values()]:
            pids.update(group_members(pid))
        return pids


def start_stack(spec: Path, run_dir: Path, cluster: str, timeout_s: float = 60.0,
                command: list[str] | None = None) -> RunningStack:
    """Run `cpctl up --port 0` (or another cpctl command) as a real subprocess; wait until its gateway serves."""
    state_file = run_dir / cluster / "state.json"
    log = run_dir / f"{cluster}-cpctl.log"
    command = command or ["up", "-f", str(spec), "--port", "0"]
    process = ManagedProcess([sys.executable, "-m", "controlplane.cli", *command],
                             env=dict(os.environ), log_path=log, cwd=ROOT)
    deadline = time.monotonic() + timeout_s
    while not state_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.stop()
            pytest.fail(f"cpctl up did not start: {process.log_tail()}")
        time.sleep(0.05)
    return RunningStack(process, spec, state_file)


def stop_stack(stack: RunningStack) -> set[int]:
    """Ctrl-C the stack as a user would; return the PIDs that were part of it and are still alive."""
    return stop_cpctl(stack.process, stack.every_pid(), signal.SIGINT)


def stop_cpctl(process: ManagedProcess, pids: set[int], sig: int) -> set[int]:
    """Signal a cpctl process as its user would and wait for it; which of `pids` (its own and those it started)
    are still alive."""
    process.popen.send_signal(sig)
    try:
        process.popen.wait(timeout=30)
    finally:
        process.stop(grace_s=1)  # only acts if cpctl itself did not finish
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and not_zombie(pid)}


@contextlib.contextmanager
def stack_of(spec_text: str, run_dir: Path, cluster: str) -> Iterator[RunningStack]:
    """A `cpctl up` stack of a spec given as text (its `cluster` name); every process it started must be gone
    once it is stopped."""
    spec = run_dir / f"{cluster}.yaml"
    spec.write_text(spec_text)
    running = start_stack(spec, run_dir, cluster)
    yield running
    leftovers = stop_stack(running)
    assert not leftovers, f"processes left after cpctl up stopped: {sorted(leftovers)}"


class ManualClock:
    """A clock that moves only when a test moves it."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def not_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def stack(run_dir: Path) -> Iterator[RunningStack]:
    """The example spec's local stack, shared by the end-to-end tests that do not disturb it."""
    running = start_stack(EXAMPLE_SPEC, run_dir, "local-demo")
    yield running
    leftovers = stop_stack(running)
    assert not leftovers, f"processes left after cpctl up stopped: {sorted(leftovers)}"


@dataclass
class RunningGateway:
    """A `cpctl gateway` process. It writes no state file: its address is the port the test gave it."""

    process: ManagedProcess
    url: str

    def admin(self) -> dict:
        request = urllib.request.Request(f"{self.url}/admin/queues", headers={"Authorization": "Bearer cp-admin-key"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def every_pid(self) -> set[int]:
        pids = {self.process.pid}
        for worker in self.admin()["workers"]:
            pids.update(group_members(worker["pid"]))
        return pids


def start_gateway(spec: Path, endpoints: Path | None, log: Path, launcher: list[str] = (),
                  env: dict | None = None, cwd: Path = ROOT) -> RunningGateway:
    """`cpctl gateway` (through `launcher`, e.g. a namespace), on a free port; wait until it serves.
    `endpoints`: the static backend's file (None: the spec's backend finds the shards)."""
    port = free_port()
    listing = ["--endpoints", str(endpoints)] if endpoints is not None else []
    process = ManagedProcess([*launcher, sys.executable, "-m", "controlplane.cli", "gateway", "-f", str(spec),
                              *listing, "--port", str(port)],
                             env=env or dict(os.environ), log_path=log, cwd=cwd)
    gateway = RunningGateway(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{gateway.url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return gateway
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.stop()
            pytest.fail(f"cpctl gateway did not start: {process.log_tail()}")
        time.sleep(0.1)


def stop_gateway(gateway: RunningGateway) -> set[int]:
    """SIGTERM it as Kubernetes does; the PIDs that were part of it and are still alive."""
    return stop_cpctl(gateway.process, gateway.every_pid(), signal.SIGTERM)
