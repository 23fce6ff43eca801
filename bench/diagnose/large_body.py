"""Reproduce the GPU benchmark's large-body gap on the CPU (issue 11): 9.6 MB requests, gateway vs Triton direct.

The H200 run of 2026-12-01 served 64 uint8 224x224 images a request (9.6 MB of binary tensor) at 18.3k img/s
direct and 12.6k through the gateway, with Triton holding only ~3 requests at a time. Here the same bodies go
to a model that does no work with them (`sink`: reads the batch size, answers top1 = 0), in a real CPU
tritonserver, so what is measured is the relay: the client sending 9.6 MB, the gateway reading and forwarding
it, Triton reading it and copying it to its Python backend. Closed-loop client processes (bench/gpu.py's
client), alternating direct and gateway, each run bounded in time; per run img/s, P50/P99, Triton's per-request
phases, CPU cores used by the gateway worker and by tritonserver, and the gateway's shard in-flight gauge.

    .venv/bin/python bench/diagnose/large_body.py [--connections 1,8] [--seconds 3] [--rounds 2] [--workers 1]
        [--variants hw16m,store,...] [--clients 4] [--out DIR/large-body.json]

On the H200 machine: bench/device/large_body.sh (bench/device/README.md). Every gateway writes a per-request
timeline there (controlplane/gateway/diagnostics.py): where each large request waited inside the gateway; each
run also records tritonserver's busiest threads. `--variants` are other gateways in front of the same shard,
each with one thing changed (VARIANTS).

To see where a worker's time goes, run it with longer --seconds and attach py-spy (not a dependency:
`pip install py-spy`) to a worker PID from the stack's state.json: `py-spy record --native -f raw -d 6 -p PID`.

Seen on 2026-12-01: on 2 shared cores, bench/results/gpu-2026-12-01-run3.md, "Reading"; on the H200,
bench/results/gpu-2026-12-01-run4.md, "Reading" (Triton's HTTP threads were the limit, not the gateway).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpu import ServerSide, VariantGateway, run_clients, write_request  # noqa: E402
from scaling import Stack  # noqa: E402

from controlplane.gateway.diagnostics import timeline_summary  # noqa: E402

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
    # the spec's GPU shard (pinned memory, CUDA pool; the floor applies) serving only `sink`
    spec["shards"] = [{**spec["shards"][0], "models": [MODEL]}]
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


# Gateways beside the stack's own, each with one thing changed: the candidate causes of the H200 gap (issue 11).
# `workers`/`concurrency` change the spec; `env` sets a knob of controlplane/gateway/diagnostics.py.
VARIANTS = {
    "base": {},  # the spec's settings, as a separate `cpctl gateway` (the stack's own is measured as "stack")
    "hw1m": {"env": {"CPCTL_UPSTREAM_WRITE_HIGH": str(1 << 20)}},  # pause the client above 1 MiB, not 64 KiB
    "hw16m": {"env": {"CPCTL_UPSTREAM_WRITE_HIGH": str(16 << 20)}},  # a 9.6 MB body never pauses its client
    "sndbuf4m": {"env": {"CPCTL_UPSTREAM_SNDBUF": str(4 << 20)}},
    "rcvbuf4m": {"env": {"CPCTL_CLIENT_RCVBUF": str(4 << 20)}},
    "store": {"env": {"CPCTL_STREAM_BODY_BYTES": str(1 << 40)}},  # store and forward: no slot held while uploading
    "burst1": {"env": {"CPCTL_UPSTREAM_CONNECT_BURST": "1"}},  # upstream connections opened one at a time
    "burst16": {"env": {"CPCTL_UPSTREAM_CONNECT_BURST": "16"}},
    "floor0": {"concurrency": {"gpu_floor": 0}},
    "floor24": {"concurrency": {"gpu_floor": 24}},
    **{f"w{n}": {"workers": n} for n in (1, 2, 4, 12, 16)},
}


def measured(state: dict, url: str, body: Path, connections: int, seconds: float, headers: dict, workdir: Path,
             gateway: str | None, clients: int = 2) -> dict:
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=sample_gateway, args=(gateway, stop, samples)) if gateway else None
    if sampler:
        sampler.start()
    begun = time.monotonic()
    with ServerSide(state, MODEL) as server:
        run = run_clients(url, MODEL, body, connections, seconds, headers, workdir, clients=min(clients, connections))
    stop.set()
    if sampler:
        sampler.join()
    found = server.found
    return {"img_s": run.get("img_s"), "requests": run.get("requests"), "p50_ms": run.get("p50_ms"),
            "p99_ms": run.get("p99_ms"), "statuses": run.get("statuses"),
            "error": run.get("error") or run.get("first_error"),
            "triton_ms": [found.get(f"{p}_ms") for p in ("queue", "compute_input", "compute_infer", "compute_output")],
            "img_per_exec": found.get("images_per_execution"), "gw_cores": found["gateway_cores"],
            "triton_cores": found["triton_cores"], "triton_threads": found["triton_busiest_threads"],
            "window": (begun, time.monotonic()),
            **(gateway_summary(samples) if samples else {})}


def system_settings() -> dict:
    """The kernel's socket buffer settings (loopback TCP autotunes within tcp_rmem/tcp_wmem)."""
    found = {}
    for name in ("net/core/rmem_max", "net/core/wmem_max", "net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem",
                 "net/core/somaxconn", "net/ipv4/tcp_autocorking"):
        with contextlib.suppress(OSError):
            found[name] = Path("/proc/sys", name).read_text().strip()
    found["cores"] = os.cpu_count()
    return found


def socket_snapshot(out: Path) -> None:
    """`ss -tmi` of the gateway's client and upstream sockets, written to `out` (skipped where ss is missing)."""
    if shutil.which("ss"):
        found = subprocess.run(["ss", "-tmin", "state", "established"], capture_output=True, text=True, timeout=10)
        out.write_text(found.stdout[:2_000_000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="4,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--clients", type=int, default=2, help="client processes a run")
    parser.add_argument("--variants", default="", help=f"other gateways, after the rounds: {','.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, help="write every run (and the timelines' summaries) here as JSON")
    args = parser.parse_args()
    if not (0.5 <= args.seconds <= 30 and 1 <= args.rounds <= 5):
        parser.error("bounds: 0.5 <= seconds <= 30, 1 <= rounds <= 5")
    unknown = set(filter(None, args.variants.split(","))) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="large-body-"))
    repository = model_repository(workdir / "models", args.instances)
    images = np.random.default_rng(1).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)
    body = write_request(workdir, "pixels", {"pixels": images}, ["top1"], args.batch)
    results: dict = {"body_bytes": body.stat().st_size, "system": system_settings(), "args": vars(args) | {
        "out": str(args.out)}, "runs": []}
    print(f"body {body.stat().st_size} bytes; workdir {workdir}; {json.dumps(results['system'])}", flush=True)
    timelines = workdir / "timelines"
    os.environ["CPCTL_GATEWAY_TIMELINE"] = str(timelines / "stack")  # the stack's gateway inherits it
    stack = Stack(workdir / "stack", spec_text(repository, args.workers), timeout_s=120)
    levels = [int(c) for c in args.connections.split(",")]

    def record(setup: str, connections: int, result: dict, timeline: Path | None) -> None:
        if timeline is not None:
            result["timeline"] = timeline_summary(timeline, result["window"])
        result.pop("window")
        results["runs"].append({"setup": setup, "connections": connections, **result})
        print(f"{setup:9} c{connections:<3} {json.dumps(result)}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    try:
        state = stack.state()
        shard, gateway = state["shards"][0]["url"], state["gateway"]
        auth = {"Authorization": f"Bearer {API_KEY}"}
        run_clients(shard, MODEL, body, 2, 1.0, {}, workdir, clients=1)  # warm-up, not recorded
        for round_ in range(args.rounds):
            for connections in levels:
                for setup, url, headers in (("direct", shard, {}), ("stack", gateway, auth)):
                    result = measured(state, url, body, connections, args.seconds, headers, workdir,
                                      gateway if setup == "stack" else None, args.clients)
                    if setup == "stack" and round_ == 0 and connections == levels[-1]:
                        socket_snapshot(workdir / "ss-stack.txt")
                    record(setup, connections, result, timelines / "stack" if setup == "stack" else None)
        for name in filter(None, args.variants.split(",")):
            variant = VARIANTS[name]
            spec = yaml.safe_load(spec_text(repository, variant.get("workers", args.workers)))
            spec["gateway"]["concurrency"].update(variant.get("concurrency", {}))
            env = {**variant.get("env", {}), "CPCTL_GATEWAY_TIMELINE": str(timelines / name)}
            try:
                with VariantGateway(workdir, name, state, yaml.safe_dump(spec, sort_keys=False), env) as gateway_of:
                    pids = gateway_of.pids()
                    for connections in levels:
                        result = measured(state | {"workers": pids}, gateway_of.url, body, connections,
                                          args.seconds, auth, workdir, gateway_of.url, args.clients)
                        record(name, connections, result, timelines / name)
            except RuntimeError as exc:  # recorded; the next variant still runs
                results.setdefault("errors", {})[name] = str(exc)[:2000]
                print(f"{name}: {exc}", flush=True)
    finally:
        stack.close()
        if args.out:
            with tarfile.open(args.out.with_suffix(".logs.tar.gz"), "w:gz") as logs:
                for path in [*workdir.glob("*.log"), *workdir.glob("ss-*.txt"), *(workdir / "stack").glob("**/*.log")]:
                    logs.add(path, arcname=str(path.relative_to(workdir)))


if __name__ == "__main__":
    main()
