"""What it costs to pass a pipeline stage its activations as JSON numbers or as binary tensors, on the CPU.

Two measurements, side by side in one run (the machine is shared: compare the ratios, not the absolutes):
1. encoding only, in this process: the request body tritonclient builds for a [1, T, H] FP32 `hidden`
   tensor, JSON (`binary_data=False`) against the KServe v2 binary tensor extension, and decoding the answer's
   tensor the same two ways; H = 64 (the tiny test model) and 4096 (the 7B), T = 1 (a decode step) and 128
   (a prefill);
2. one step through a real stage: a real tritonserver serving stage 2 of 2 of the tiny checkpoint
   (examples/models/llm_stage), `hidden` in and `hidden_out` back, JSON against binary, T = 1 and 64.
Writes bench/results/llm-transport-<date>.{json,md}: a plain measurement (no targets).

    .venv/bin/python bench/llm_transport.py [--requests 200]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.procs import ManagedProcess  # noqa: E402
from controlplane.shards.triton import start_ready  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def encode_cost(hidden: int, tokens: int, binary: bool, repeats: int) -> dict:
    """Microseconds to build the request body and to read the tensor back, and the body's size."""
    array = np.random.default_rng(0).standard_normal((1, tokens, hidden)).astype(np.float32)
    started = time.perf_counter()
    for _ in range(repeats):
        tensor = httpclient.InferInput("hidden", list(array.shape), "FP32").set_data_from_numpy(array, binary)
        body, _ = httpclient._utils._get_inference_request(
            [tensor], request_id="", outputs=None, sequence_id=0, sequence_start=False, sequence_end=False,
            priority=0, timeout=None, custom_parameters=None)
    encode_us = (time.perf_counter() - started) / repeats * 1e6
    raw = array.tobytes()
    started = time.perf_counter()
    for _ in range(repeats):
        if binary:
            np.frombuffer(raw, np.float32).reshape(array.shape)
        else:
            np.array(json.loads(json.dumps(array.ravel().tolist())), np.float32).reshape(array.shape)
    decode_us = (time.perf_counter() - started) / repeats * 1e6
    return {"hidden": hidden, "tokens": tokens, "transport": "binary" if binary else "json",
            "body_bytes": len(body), "encode_us": round(encode_us, 1), "decode_us": round(decode_us, 1)}


def served_step_cost(url: str, tokens: int, binary: bool, requests: int) -> dict:
    """Latency of one step of stage 2 (start and end in one request: no cache left behind)."""
    client = httpclient.InferenceServerClient(url, network_timeout=60)
    array = np.random.default_rng(1).standard_normal((1, tokens, 64)).astype(np.float32)
    inputs = []
    for name, data, datatype in (("sequence_id", np.array([[1]], np.uint64), "UINT64"),
                                 ("flags", np.array([[3]], np.int32), "INT32"), ("hidden", array, "FP32")):
        inputs.append(httpclient.InferInput(name, list(data.shape), datatype).set_data_from_numpy(data, binary))
    outputs = [httpclient.InferRequestedOutput("hidden_out", binary_data=binary)]
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        client.infer("llm_2of2", inputs, outputs=outputs).as_numpy("hidden_out")
        latencies.append((time.perf_counter() - started) * 1e3)
    client.close()
    latencies.sort()
    return {"tokens": tokens, "transport": "binary" if binary else "json", "requests": requests,
            "p50_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3)}


def start_stage(workdir: Path) -> tuple[ManagedProcess, str]:
    checkpoint = workdir / "checkpoint"
    subprocess.run([sys.executable, str(ROOT / "examples" / "llm" / "make_checkpoint.py"), "--out", str(checkpoint)],
                   check=True, capture_output=True)
    repository = workdir / "models"
    shutil.copytree(ROOT / "examples" / "models" / "llm_stage", repository / "llm_2of2")
    config = repository / "llm_2of2" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "checkpoint"', f'string_value: "{checkpoint}"'))
    process, port = start_ready(repository, ["llm_2of2"], workdir / "tritonserver.log")
    return process, f"127.0.0.1:{port}"


def report(results: dict) -> str:
    lines = [f"# Activations between pipeline stages: JSON or binary ({results['date']})", "",
             "A plain measurement on the CPU (2 cores shared with other work: load average "
             f"{results['load_average_1m']:.1f} at the start): no targets. Compare the two transports row by row; "
             "the served latencies are dominated by the shared machine's scheduling, not by the transport.",
             "", "## Encoding a `hidden` [1, T, H] FP32 tensor (in process)", "",
             "| H | T | transport | body bytes | encode us | decode us |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['hidden']} | {r['tokens']} | {r['transport']} | {r['body_bytes']} | {r['encode_us']} | "
              f"{r['decode_us']} |" for r in results["encoding"]]
    lines += ["", "## One step of stage 2 of the tiny model through a real tritonserver (H = 64)", "",
              "| T | transport | requests | P50 ms | P99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['transport']} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} |"
              for r in results["served"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    results: dict = {"date": datetime.date.today().isoformat(), "load_average_1m": os.getloadavg()[0],
                     "encoding": [], "served": []}
    for hidden in (64, 4096):
        for tokens in (1, 128):
            for binary in (False, True):
                results["encoding"].append(encode_cost(hidden, tokens, binary, repeats=20 if tokens > 1 else 200))
    with tempfile.TemporaryDirectory() as workdir:
        process, url = start_stage(Path(workdir))
        try:
            for tokens in (1, 64):
                for binary in (False, True):
                    results["served"].append(served_step_cost(url, tokens, binary, args.requests))
        finally:
            process.stop()
    name = f"llm-transport-{results['date']}"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
