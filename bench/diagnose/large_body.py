"""Reproduce the GPU benchmark's large-body gap on the CPU (issue 11): 9.6 MB requests, gateway vs Triton direct.

The H200 run of 2026-12-01 served 64 uint8 224x224 images a request (9.6 MB of binary tensor) at 18.3k img/s
direct and 12.6k through the gateway, with Triton holding only ~3 requests at a time. Here the same bodies go
to a model that does no work with them (`sink`: reads the batch size, answers top1 = 0), in a real CPU
tritonserver, so what is measured is the relay: the client sending 9.6 MB, the gateway reading and forwarding
it, Triton reading it and copying it to its Python backend. Closed-loop client processes (bench/gpu.py's
client), alternating direct and gateway, each run bounded in time; per run img/s, P50/P99, Triton's per-request
phases, CPU cores used by the gateway worker and by tritonserver, and the gateway's shard in-flight gauge.

    .venv/bin/python bench/diagnose/large_body.py [--connections 1,8] [--seconds 3] [--rounds 2] [--workers 1]

To see where a worker's time goes, run it with longer --seconds and attach py-spy (not a dependency:
`pip install py-spy`) to a worker PID from the stack's state.json: `py-spy record --native -f raw -d 6 -p PID`.

Seen on 2026-12-01 (2 cores shared): see bench/results/gpu-2026-12-01-run3.md, "Reading".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpu import ServerSide, run_clients, write_request  # noqa: E402
from scaling import Stack  # noqa: E402

API_KEY = "cp-demo-key"
MODEL = "sink"
CONFIG = """name: "sink"
backend: "python"
max_batch_size: 256
input [ { name: "pixels", data_type: TYPE_UINT8, dims: [ -1, -1, 3 ] } ]
output [ { name: "top1", data_type: TYPE_INT64, dims: [ 1 ] } ]
instance_group [ { count: %d } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""
MODEL_PY = '''import numpy as np
import triton_python_backend_utils as pb_utils
from tensors import output_tensor


class TritonPythonModel:
    """Answers top1 = 0 for every image: the relay of the pixels is what is measured, not a network."""

    def execute(self, requests):
        answers = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "pixels").shape()[0]
            answers.append(pb_utils.InferenceResponse([output_tensor("top1", np.zeros((rows, 1), np.int64))]))
        return answers
'''


def model_repository(directory: Path, instances: int) -> Path:
    version = directory / MODEL / "1"
    version.mkdir(parents=True)
    (directory / MODEL / "config.pbtxt").write_text(CONFIG % instances)
    (version / "model.py").write_text(MODEL_PY)
    shutil.copy(ROOT / "examples" / "models" / "risk" / "1" / "tensors.py", version / "tensors.py")
    return directory


def spec_text(repository: Path, workers: int) -> str:
    """examples/gpu/h200.yaml's classes, tenants and gateway limits, serving only `sink` on a CPU shard."""
    spec = yaml.safe_load((ROOT / "examples" / "gpu" / "h200.yaml").read_text())
    spec["cluster"] = "large-body"
    spec["model_repository"] = str(repository)
    spec["node_pools"] = [{"name": "local", "provider": "existing", "instance_type": "this-machine"}]
    spec["models"] = [{"name": MODEL, "path": MODEL, "memory_mb": 64, "max_batch": 256}]
    spec["shards"] = [{"name": "cpu0", "models": [MODEL], "gpu": 0}]  # a "GPU" shard: the floor applies
    spec["gateway"].update(port=0, workers=workers)
    return yaml.safe_dump(spec, sort_keys=False)


GAUGES = ("cp_shard_in_flight", "cp_shard_concurrency_limit", 'cp_queue_depth{class="standard"}', "cp_overload_level")
SUMS = ('cp_queue_wait_seconds_sum{class="standard"}', 'cp_queue_wait_seconds_count{class="standard"}')


def gateway_metrics(gateway: str) -> dict[str, float]:
    """The gauges and queue-wait sums above from the gateway's /metrics (the worker that answers)."""
    try:
        text = urllib.request.urlopen(f"{gateway}/metrics", timeout=1).read().decode()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        for name in (*GAUGES, *SUMS):
            metric, _, label = name.partition("{")
            if line.startswith(metric) and label.rstrip("}") in line:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def sample_gateway(gateway: str, stop: threading.Event, samples: list[dict]) -> None:
    """The gateway's gauges every 0.1 s while a run lasts (bounded by the run)."""
    samples.append(gateway_metrics(gateway))
    while not stop.wait(0.1):
        samples.append(gateway_metrics(gateway))
    samples.append(gateway_metrics(gateway))


def gateway_summary(samples: list[dict]) -> dict:
    """Mean of each gauge over the run, and the mean queue wait (ms) of the requests it dispatched."""
    during = samples[1:-1] or samples
    summary = {name.removeprefix("cp_"): round(sum(s.get(name, 0.0) for s in during) / len(during), 2)
               for name in GAUGES}
    first, last = samples[0], samples[-1]
    waited = last.get(SUMS[1], 0.0) - first.get(SUMS[1], 0.0)
    if waited and SUMS[0] in last:
        summary["queue_wait_ms"] = round((last[SUMS[0]] - first.get(SUMS[0], 0.0)) / waited * 1e3, 2)
    return summary


def measured(state: dict, url: str, body: Path, connections: int, seconds: float, headers: dict, workdir: Path,
             gateway: str | None) -> dict:
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=sample_gateway, args=(gateway, stop, samples)) if gateway else None
    if sampler:
        sampler.start()
    with ServerSide(state, MODEL) as server:
        run = run_clients(url, MODEL, body, connections, seconds, headers, workdir, clients=min(2, connections))
    stop.set()
    if sampler:
        sampler.join()
    found = server.found
    return {"img_s": run.get("img_s"), "p50_ms": run.get("p50_ms"), "p99_ms": run.get("p99_ms"),
            "statuses": run.get("statuses"), "error": run.get("error") or run.get("first_error"),
            "triton_ms": [found.get(f"{p}_ms") for p in ("queue", "compute_input", "compute_infer", "compute_output")],
            "img_per_exec": found.get("images_per_execution"), "gw_cores": found["gateway_cores"],
            "triton_cores": found["triton_cores"],
            **(gateway_summary(samples) if samples else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="4,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not (0.5 <= args.seconds <= 30 and 1 <= args.rounds <= 5):
        parser.error("bounds: 0.5 <= seconds <= 30, 1 <= rounds <= 5")
    workdir = Path(tempfile.mkdtemp(prefix="large-body-"))
    repository = model_repository(workdir / "models", args.instances)
    images = np.random.default_rng(1).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    body = write_request(workdir, "pixels", {"pixels": images}, ["top1"], args.batch)
    print(f"body {body.stat().st_size} bytes; workdir {workdir}", flush=True)
    stack = Stack(workdir / "stack", spec_text(repository, args.workers), timeout_s=120)
    try:
        state = stack.state()
        shard, gateway = state["shards"][0]["url"], state["gateway"]
        auth = {"Authorization": f"Bearer {API_KEY}"}
        run_clients(shard, MODEL, body, 2, 1.0, {}, workdir, clients=1)  # warm-up, not recorded
        for _ in range(args.rounds):
            for connections in (int(c) for c in args.connections.split(",")):
                for setup, url, headers in (("direct", shard, {}), ("gateway", gateway, auth)):
                    result = measured(state, url, body, connections, args.seconds, headers, workdir,
                                      gateway if setup == "gateway" else None)
                    print(f"{setup:8} c{connections:<3} {json.dumps(result)}", flush=True)
    finally:
        stack.close()


if __name__ == "__main__":
    main()
