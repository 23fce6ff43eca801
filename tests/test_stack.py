"""`cpctl up` as a user runs it: survives a killed shard, reports status, leaves nothing behind on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from .conftest import EXAMPLE_SPEC, ROOT, RunningStack, start_stack, stop_stack


def cpctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env={**os.environ, "COLUMNS": "200"})


def risk_inputs() -> list:
    tensor = httpclient.InferInput("features", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
    return [tensor]


def test_status_json_describes_the_running_stack(stack: RunningStack) -> None:
    result = cpctl("status", "-f", str(EXAMPLE_SPEC), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["gateway"] == stack.gateway
    ready = [s for s in status["shards"] if s["ready"]]
    assert [s["name"] for s in ready] == ["main-0", "main-1"]
    assert all(s["url"].startswith("http://127.0.0.1:") and set(s["models"]) == {"risk", "risk_lite", "work", "textgen"}
               for s in ready)
    standby = [s for s in status["shards"] if s["standby"]]
    assert [(s["name"], s["ready"], s["url"]) for s in standby] == [("main-2", False, None)]


def test_cpctl_infer_builds_a_request_from_metadata(stack: RunningStack) -> None:
    result = cpctl("infer", "risk", "-f", str(EXAMPLE_SPEC))
    assert result.returncode == 0, result.stderr
    assert "score" in result.stdout and "FP32" in result.stdout and "[1, 1]" in result.stdout


def test_cpctl_infer_on_unknown_model_is_one_line_error(stack: RunningStack) -> None:
    result = cpctl("infer", "nope", "-f", str(EXAMPLE_SPEC))
    assert result.returncode == 1
    assert "unknown model 'nope'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["up", "status", "top", "infer", "validate", "hash-key"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = cpctl(command, "--help")
    assert result.returncode == 0 and "Example:" in result.stdout


def test_a_killed_shard_costs_no_request_and_comes_back(run_dir: Path) -> None:
    spec = run_dir / "kill.yaml"
    spec.write_text(EXAMPLE_SPEC.read_text().replace("cluster: local-demo", "cluster: kill-test")
                    .replace("model_repository: ../models", f"model_repository: {ROOT / 'examples' / 'models'}"))
    running = start_stack(spec, run_dir, "kill-test")
    try:
        client = httpclient.InferenceServerClient(running.address, network_timeout=30)
        victim_pid = running.shard_pids()["main-0"]
        os.kill(victim_pid, signal.SIGKILL)
        # Requests keep succeeding: a shard that fails before answering is retried on the other one.
        for _ in range(40):
            assert client.infer("risk", risk_inputs()).as_numpy("score").shape == (1, 1)
        deadline = time.monotonic() + 30
        while True:
            shards = {s["name"]: s for s in running.state()["shards"]}
            if shards["main-0"]["state"] == "ready" and shards["main-0"]["pid"] != victim_pid:
                break
            assert time.monotonic() < deadline, f"main-0 was not restarted: {shards['main-0']}"
            time.sleep(0.1)
        assert shards["main-0"]["restarts"] == 1
        for _ in range(10):
            assert client.infer("risk", risk_inputs()).as_numpy("score").shape == (1, 1)
        client.close()
    finally:
        leftovers = stop_stack(running)
    assert not leftovers, f"processes left after Ctrl-C: {sorted(leftovers)}"


def test_ctrl_c_stops_every_process_it_started(run_dir: Path) -> None:
    spec = run_dir / "stop.yaml"
    spec.write_text(EXAMPLE_SPEC.read_text().replace("cluster: local-demo", "cluster: stop-test")
                    .replace("model_repository: ../models", f"model_repository: {ROOT / 'examples' / 'models'}"))
    running = start_stack(spec, run_dir, "stop-test")
    pids = running.every_pid()
    assert len(pids) >= 1 + 2 * 4  # cpctl, and per server: tritonserver plus one stub per model instance
    cores = len(os.sched_getaffinity(0))  # the example spec runs a gateway worker per core, if more than one
    assert len(running.worker_pids()) == (cores if cores > 1 else 0)
    leftovers = stop_stack(running)
    assert leftovers == set()
    assert running.process.popen.returncode == 0
    assert not running.state_file.exists()
