"""The local shard backend: real tritonserver processes started, watched, restarted and stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from controlplane.procs import group_members
from controlplane.shards.base import probe_ready
from controlplane.shards.local import LocalShards, ShardStartError
from controlplane.spec import load_spec

from .conftest import EXAMPLE_SPEC


def one_replica_spec(**shard_fields):
    spec = load_spec(EXAMPLE_SPEC)
    shard = spec.shards[0].model_copy(update={"models": ["risk"], "replicas": 1, "standby": 1, **shard_fields})
    return spec.model_copy(update={"shards": [shard]})


async def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_start_notify_stop_leaves_no_process(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = LocalShards(load_spec(EXAMPLE_SPEC), tmp_path)
        seen: list[list[str]] = []
        backend.subscribe(lambda endpoints: seen.append(sorted(e.name for e in endpoints)))
        await backend.start()
        try:
            assert sorted(e.name for e in backend.endpoints()) == ["main-0", "main-1"]
            for endpoint in backend.endpoints():
                assert endpoint.models == {"risk", "risk_lite", "work", "textgen"}
                assert await probe_ready(endpoint.host, endpoint.port)
            groups = [r.process.pgid for r in backend.replicas if r.process]
            # each server runs one Python-backend stub per model instance, in its own process group
            assert all(len(group_members(g)) >= 2 for g in groups)
        finally:
            await backend.stop()
        assert seen[0] == [] and seen[-1] == [] and ["main-0", "main-1"] in seen
        assert all(group_members(g) == [] for g in groups)
        assert [s.state for s in backend.status()] == ["stopped"] * 3

    asyncio.run(scenario())


def test_killed_shard_is_restarted_with_its_stubs_cleaned_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = LocalShards(one_replica_spec(), tmp_path, probe_interval_s=0.2)
        await backend.start()
        try:
            replica = backend.replica("main-0")
            first_pid, first_port = replica.process.pid, replica.http_port
            os.kill(first_pid, signal.SIGKILL)
            await wait_for(lambda: replica.state != "ready")
            assert backend.endpoints() == []  # no longer offered to the gateway
            await wait_for(lambda: replica.state == "ready")
            assert replica.restarts == 1 and replica.process.pid != first_pid
            assert replica.http_port == first_port  # same address: clients and the gateway reconnect
            assert group_members(first_pid) == []  # the old server's stubs went with it
            assert await probe_ready("127.0.0.1", replica.http_port)
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_frozen_shard_turns_unready_then_is_restarted(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = LocalShards(one_replica_spec(), tmp_path, probe_interval_s=0.1)
        await backend.start()
        try:
            replica = backend.replica("main-0")
            frozen = replica.process.pid
            os.kill(frozen, signal.SIGSTOP)
            await wait_for(lambda: replica.state == "unready")
            assert backend.endpoints() == []
            await wait_for(lambda: replica.state == "ready" and replica.process.pid != frozen)
            assert replica.last_error is None and replica.restarts == 1
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_standby_replicas_start_and_stop_on_demand(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = LocalShards(one_replica_spec(), tmp_path)
        await backend.start()
        try:
            assert [e.name for e in backend.endpoints()] == ["main-0"]
            await backend.set_standby_active("main", 1)
            standby = backend.replica("main-1")
            await wait_for(lambda: standby.state == "ready")
            assert {e.name: e.standby for e in backend.endpoints()} == {"main-0": False, "main-1": True}
            pgid = standby.process.pgid
            await backend.set_standby_active("main", 0)
            assert [e.name for e in backend.endpoints()] == ["main-0"] and group_members(pgid) == []
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_a_shard_that_cannot_start_fails_with_the_reason(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "risk" / "1").mkdir(parents=True)
    (repo / "risk" / "config.pbtxt").write_text('name: "risk"\nbackend: "python"\nthis is not protobuf text\n')
    spec = one_replica_spec().model_copy(update={"model_repository": str(repo)})

    async def scenario() -> None:
        backend = LocalShards(spec, tmp_path / "run", ready_timeout_s=5)
        with pytest.raises(ShardStartError, match="main-0: exited with code"):
            await backend.start()
        assert all(r.process is None or group_members(r.process.pgid) == [] for r in backend.replicas)

    asyncio.run(scenario())


def test_missing_model_directory_is_reported_before_any_server_starts(tmp_path: Path) -> None:
    spec = one_replica_spec().model_copy(update={"model_repository": str(tmp_path / "empty")})
    with pytest.raises(ShardStartError, match="model directories without a config.pbtxt: risk"):
        LocalShards(spec, tmp_path / "run")


def test_gpu_assignment_is_only_applied_on_a_gpu_machine(tmp_path: Path) -> None:
    backend = LocalShards(one_replica_spec(gpu="MIG-4f2d6b1e-0000-5000-8000-000000000001"), tmp_path)
    shard = backend.spec.shards[0]
    backend.gpu = True
    assert backend.cuda_visible_devices(shard) == "MIG-4f2d6b1e-0000-5000-8000-000000000001"
    assert backend.triton.env(backend.cuda_visible_devices(shard))["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
    backend.gpu = False  # no GPU here: the shard runs on the CPU and the environment is left alone
    assert backend.cuda_visible_devices(shard) is None


def test_a_shard_on_a_gpu_gets_its_memory_pools_and_gpu_metrics(tmp_path: Path) -> None:
    backend = LocalShards(one_replica_spec(gpu=0, pinned_memory_mb=1024, cuda_memory_pool_mb=2048), tmp_path)
    shard = backend.spec.shards[0]
    backend.gpu = True
    argv = backend.triton.argv(Path("/models"), ["risk"], 8001, 8002, backend.gpu_memory(shard))
    assert {"--allow-gpu-metrics=true", f"--pinned-memory-pool-byte-size={1024 << 20}",
            f"--cuda-memory-pool-byte-size=0:{2048 << 20}"} <= set(argv)
    assert backend.triton.env(backend.cuda_visible_devices(shard))["CUDA_VISIBLE_DEVICES"] == "0"
    backend.gpu = False  # the same spec on a machine without GPUs: no pools, no GPU metrics
    argv = backend.triton.argv(Path("/models"), ["risk"], 8001, 8002, backend.gpu_memory(shard))
    assert {"--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"} <= set(argv)
    assert not any(a.startswith("--cuda-memory-pool-byte-size") for a in argv)
