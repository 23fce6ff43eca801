"""`cpctl gateway`: the gateway alone in front of shards someone else runs (how it runs on Kubernetes), writing
nothing to disk."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from controlplane.shards.static import EndpointsFileError, read_endpoints

from .conftest import EXAMPLE_SPEC, ROOT, RunningStack, start_gateway, stop_gateway

ADMIN = {"Authorization": "Bearer cp-admin-key"}


def endpoints_of(stack: RunningStack, names: list[str]) -> list[dict]:
    shards = {s["name"]: s for s in stack.state()["shards"]}
    return [{"name": name, "host": "127.0.0.1", "port": int(shards[name]["url"].rsplit(":", 1)[1]),
             "models": shards[name]["models"]} for name in names]


def static_spec(folder: Path, cluster: str) -> Path:
    """The example spec under another cluster name, with an absolute model repository."""
    spec = folder / f"{cluster}.yaml"
    spec.write_text(EXAMPLE_SPEC.read_text().replace("cluster: local-demo", f"cluster: {cluster}")
                    .replace("model_repository: ../models", f"model_repository: {ROOT / 'examples' / 'models'}"))
    return spec


def infer_risk(url: str) -> tuple[int, int]:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    features = httpclient.InferInput("features", [1, 16], "FP32")
    features.set_data_from_numpy(np.zeros((1, 16), np.float32))
    try:
        return client.infer("risk", [features]).as_numpy("score").shape
    finally:
        client.close()


def test_gateway_serves_listed_shards_and_follows_file_changes(stack: RunningStack, run_dir: Path) -> None:
    endpoints = run_dir / "endpoints.json"
    endpoints.write_text(json.dumps(endpoints_of(stack, ["main-0", "main-1"])))
    spec = static_spec(run_dir, "static-test")
    gateway = start_gateway(spec, endpoints, run_dir / "static-test-cpctl.log")
    try:
        assert infer_risk(gateway.url) == (1, 1)

        def shard_names() -> set[str]:
            return {s["name"] for s in gateway.admin()["shards"]}

        assert shard_names() == {"main-0", "main-1"}
        time.sleep(0.05)  # a distinct modification time
        endpoints.write_text(json.dumps(endpoints_of(stack, ["main-1"])))
        deadline = time.monotonic() + 10
        while shard_names() != {"main-1"}:
            assert time.monotonic() < deadline, "the gateway did not follow the endpoints file"
            time.sleep(0.2)
        assert infer_risk(gateway.url) == (1, 1)
        cores = len(os.sched_getaffinity(0))  # the example spec: a gateway worker per core
        assert len(gateway.admin()["workers"]) == max(cores, 1)
        # in-cluster, nothing is written under the run directory: no state, no logs
        assert not (run_dir / "static-test").exists()
    finally:
        assert not stop_gateway(gateway)


# Filesystems that hold no files (kernel views); every other mount is made read-only for the gateway.
VIRTUAL_FILESYSTEMS = {"proc", "sysfs", "devpts", "cgroup", "cgroup2", "mqueue", "bpf", "debugfs", "tracefs",
                       "securityfs", "pstore", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "autofs",
                       "nsfs", "devtmpfs"}


def read_only_launcher() -> list[str]:
    """A private mount namespace (unshare, util-linux) in which every mount that can hold files is remounted
    read-only before the command runs; it refuses to run if $HOME is still writable."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        mount_point = fields.split()[4].replace("\\040", " ")
        if tail.split()[0] not in VIRTUAL_FILESYSTEMS:
            mounts.append(mount_point)
    remounts = "; ".join(f"mount -o remount,bind,ro {shlex.quote(m)} || exit 97" for m in mounts)
    script = f'{remounts}; if touch "$HOME/probe" 2>/dev/null; then exit 98; fi; exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "read-only"]


def test_in_cluster_gateway_serves_with_the_filesystem_read_only(stack: RunningStack, tmp_path: Path) -> None:
    """`cpctl gateway` as in a pod whose filesystem is read-only: HOME, TMPDIR, the run directory and the
    working directory unwritable, every mount read-only. It still serves; it never needed to write."""
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps(endpoints_of(stack, ["main-0", "main-1"])))
    spec = static_spec(tmp_path, "read-only-test")
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    env = {**os.environ, "HOME": str(nowhere), "TMPDIR": str(nowhere), "CPCTL_RUN_DIR": str(nowhere)}
    log = tmp_path / "gateway.log"  # its stdout, opened by this test as a pod's log is by the kubelet
    gateway = start_gateway(spec, endpoints, log, launcher=read_only_launcher(), env=env, cwd=nowhere)
    try:
        assert infer_risk(gateway.url) == (1, 1)
        assert {s["name"] for s in gateway.admin()["shards"]} == {"main-0", "main-1"}
    finally:
        assert not stop_gateway(gateway)
    assert gateway.process.poll() == 0, log.read_text()
    assert "Read-only file system" not in log.read_text() and "Traceback" not in log.read_text()
    assert not list(nowhere.iterdir())


def test_bad_endpoints_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    path.write_text('[{"name": "a", "host": "h"}]')
    with pytest.raises(EndpointsFileError, match="entry 0 needs name, host, port and models"):
        read_endpoints(path)
