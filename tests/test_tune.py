"""`cpctl tune` against a real tritonserver serving the `work` model (explicit model control, as shards run)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from controlplane.procs import ManagedProcess
from controlplane.shards.local import free_port
from controlplane.shards.triton import TritonInstall
from controlplane.tune.search import seed_default

from .conftest import ROOT


def start_triton(repository: Path, log: Path) -> tuple[ManagedProcess, str]:
    triton = TritonInstall.find()
    port = free_port()
    process = ManagedProcess(triton.argv(repository, ["work"], port, free_port()), env=triton.env(None), log_path=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/v2/models/work/ready", timeout=1)
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.stop()
                pytest.fail(f"tritonserver did not start: {process.log_tail()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory):
    process, url = start_triton(ROOT / "examples" / "models", tmp_path_factory.mktemp("tune") / "triton.log")
    yield url
    process.stop()


def cpctl_tune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", "gpu", "tune", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def served_config(url: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{url}/v2/models/work/config", timeout=5).read())


def test_tune_measures_each_point_writes_a_config_triton_loads_and_restores_the_model(triton: str,
                                                                                      tmp_path: Path) -> None:
    done = cpctl_tune("work", "--url", triton, "--rate", "100", "--seconds", "1", "--max-batch", "4,16",
                      "--queue-delay-us", "0", "--instances", "1,2", "--p99-ms", "200", "--gpu", "NVIDIA A100",
                      "-o", str(tmp_path / "config.pbtxt"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    tried = {(p["max_batch"], p["instances"]) for p in report["points"]}
    assert tried == {(4, 1), (4, 2), (16, 1), (16, 2), (64, 1)}  # the grid and the seed's A100 start (batch 64)
    assert all(p["sent"] == 100 and p["ok"] == 100 and p["meets_target"] for p in report["points"])
    assert report["seed_default"]["max_batch"] == 64 and report["seed_default"]["precision"] == "fp16"
    chosen = report["best"]
    assert chosen["goodput_rps"] == max(p["goodput_rps"] for p in report["points"])
    assert served_config(triton)["max_batch_size"] == 64  # the served model is put back as it was
    assert [g["count"] for g in served_config(triton)["instance_group"]] == [2]

    repository = tmp_path / "repository"  # the written config is one tritonserver loads
    shutil.copytree(ROOT / "examples" / "models" / "work", repository / "work")
    shutil.copy(tmp_path / "config.pbtxt", repository / "work" / "config.pbtxt")
    process, url = start_triton(repository, tmp_path / "check.log")
    try:
        loaded = served_config(url)
    finally:
        process.stop()
    assert loaded["max_batch_size"] == chosen["max_batch"]
    assert loaded["instance_group"][0]["count"] == chosen["instances"]
    assert loaded["dynamic_batching"]["priority_levels"] == 3  # what tuning does not touch is kept


def test_an_unreachable_target_is_reported_with_what_to_do(triton: str) -> None:
    done = cpctl_tune("work", "--url", triton, "--rate", "50", "--seconds", "0.5", "--max-batch", "8",
                      "--queue-delay-us", "0", "--instances", "1", "--p99-ms", "0.1")
    assert done.returncode == 1
    assert "no point met P99 <= 0.1 ms" in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--max-batch", "8,x"], "comma-separated integers"),
    (["--instances", "0"], "values >= 1"),
])
def test_bad_search_spaces_are_one_line_errors(triton: str, args: list[str], message: str) -> None:
    done = cpctl_tune("work", "--url", triton, *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_an_unknown_model_is_a_clear_error(triton: str) -> None:
    done = cpctl_tune("no_such_model", "--url", triton)
    assert done.returncode == 2 and "HTTP 404" in done.stderr and "no_such_model" in done.stderr


def test_the_seeds_starting_points() -> None:
    assert seed_default("NVIDIA A100-SXM4-80GB") == (64, "fp16")
    assert seed_default("NVIDIA H100 80GB HBM3") == (128, "fp8")
    assert seed_default("NVIDIA H200") == (32, "fp32")
    assert seed_default("none") == (32, "fp32")
