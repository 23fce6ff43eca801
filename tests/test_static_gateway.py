"""`cpctl gateway`: the gateway alone in front of shards someone else runs (how it runs on Kubernetes)."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from controlplane.shards.static import EndpointsFileError, read_endpoints

from .conftest import EXAMPLE_SPEC, ROOT, RunningStack, start_stack, stop_stack

ADMIN = {"Authorization": "Bearer cp-admin-key"}


def endpoints_of(stack: RunningStack, names: list[str]) -> list[dict]:
    shards = {s["name"]: s for s in stack.state()["shards"]}
    return [{"name": name, "host": "127.0.0.1", "port": int(shards[name]["url"].rsplit(":", 1)[1]),
             "models": shards[name]["models"]} for name in names]


def test_gateway_serves_listed_shards_and_follows_file_changes(stack: RunningStack, run_dir: Path) -> None:
    endpoints = run_dir / "endpoints.json"
    endpoints.write_text(json.dumps(endpoints_of(stack, ["main-0", "main-1"])))
    spec = run_dir / "static.yaml"
    spec.write_text(EXAMPLE_SPEC.read_text().replace("cluster: local-demo", "cluster: static-test")
                    .replace("model_repository: ../models", f"model_repository: {ROOT / 'examples' / 'models'}"))
    gateway = start_stack(spec, run_dir, "static-test",
                          command=["gateway", "-f", str(spec), "--endpoints", str(endpoints), "--port", "0"])
    try:
        client = httpclient.InferenceServerClient(gateway.address)
        features = httpclient.InferInput("features", [1, 16], "FP32")
        features.set_data_from_numpy(np.zeros((1, 16), np.float32))
        assert client.infer("risk", [features]).as_numpy("score").shape == (1, 1)

        def shard_names() -> set[str]:
            request = urllib.request.Request(f"{gateway.gateway}/admin/queues", headers=ADMIN)
            with urllib.request.urlopen(request, timeout=5) as response:
                return {s["name"] for s in json.loads(response.read())["shards"]}

        assert shard_names() == {"main-0", "main-1"}
        time.sleep(0.05)  # a distinct modification time
        endpoints.write_text(json.dumps(endpoints_of(stack, ["main-1"])))
        deadline = time.monotonic() + 10
        while shard_names() != {"main-1"}:
            assert time.monotonic() < deadline, "the gateway did not follow the endpoints file"
            time.sleep(0.2)
        assert client.infer("risk", [features]).as_numpy("score").shape == (1, 1)
        client.close()
        # in-cluster, gateway workers log to the pod's output: nothing of theirs is written to disk
        cores = len(os.sched_getaffinity(0))  # the example spec: a gateway worker per core, if more than one
        assert len(gateway.worker_pids()) == (cores if cores > 1 else 0)
        assert not list((run_dir / "static-test").glob("**/gateway-worker*"))
    finally:
        assert not stop_stack(gateway)


def test_bad_endpoints_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    path.write_text('[{"name": "a", "host": "h"}]')
    with pytest.raises(EndpointsFileError, match="entry 0 needs name, host, port and models"):
        read_endpoints(path)
