"""Reproduce the ~0.5 s stalls of a lone llm stage (issue 12): one client, one step at a time, per config.

Serves stage 2 of 2 of the tiny checkpoint (examples/models/llm_stage) in a real tritonserver, once per
VARIANT, and sends STEPS one-token steps one after another (each starts and ends its sequence: no cache is
left behind). Prints per variant the step latency P50/P99/max, the steps over 100 ms, and Triton's own mean
queue and compute time per step. Variants:
  plain     the stage's config as committed (dynamic batching, no priority levels)
  priority  the same with `priority_levels: 3` (what the stage had before), requests sent at priority 2
  priority2 `priority_levels: 2`, requests at priority 2

    .venv/bin/python bench/diagnose/stage_stall.py [STEPS] [VARIANT,...]

Seen on 2026-11-30 (2 shared cores, 400 steps each, repeated): with priority levels 4-22 steps of 400 waited
~0.5-0.6 s in Triton's queue (P99 547-581 ms, queue mean 5-28 ms); without them none over 100 ms (P99 24-65 ms,
queue mean 0.4 ms). Also tried with priority levels, all stalling: max_queue_delay_microseconds 0,
preferred_batch_size [1], requests at priority 1, 2 or 3. So the stage has no Triton priority levels; the
gateway keeps class order (pipeline `max_steps_per_stage`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controlplane.procs import ManagedProcess  # noqa: E402
from controlplane.shards.triton import start_ready  # noqa: E402

PLAIN = "  max_queue_delay_microseconds: 200\n}"
VARIANTS = {  # name: (dynamic_batching's ending, the priority the requests carry)
    "plain": (PLAIN, 0),
    "priority": ("  max_queue_delay_microseconds: 200\n  priority_levels: 3\n  default_priority_level: 3\n}", 2),
    "priority2": ("  max_queue_delay_microseconds: 200\n  priority_levels: 2\n  default_priority_level: 2\n}", 2),
}


def serve(workdir: Path, checkpoint: Path, variant: str) -> tuple[ManagedProcess, int]:
    repository = workdir / f"models-{variant}"
    shutil.copytree(ROOT / "examples" / "models" / "llm_stage", repository / "llm_2of2",
                    ignore=shutil.ignore_patterns("__pycache__", "checkpoint"))
    config = repository / "llm_2of2" / "config.pbtxt"
    text = config.read_text().replace('string_value: "checkpoint"', f'string_value: "{checkpoint}"')
    if PLAIN not in text:
        raise SystemExit("the stage's dynamic_batching block changed: update this script")
    config.write_text(text.replace(PLAIN, VARIANTS[variant][0]))
    return start_ready(repository, ["llm_2of2"], workdir / f"tritonserver-{variant}.log")


def measure(port: int, steps: int, priority: int) -> str:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    hidden = np.random.default_rng(1).standard_normal((1, 1, 64)).astype(np.float32)
    inputs = []
    for name, data, datatype in (("sequence_id", np.array([[1]], np.uint64), "UINT64"),
                                 ("flags", np.array([[3]], np.int32), "INT32"), ("hidden", hidden, "FP32")):
        inputs.append(httpclient.InferInput(name, list(data.shape), datatype).set_data_from_numpy(data, True))
    latencies = []
    for _ in range(steps):
        started = time.perf_counter()
        client.infer("llm_2of2", inputs, priority=priority)
        latencies.append((time.perf_counter() - started) * 1e3)
    stats = client.get_inference_statistics("llm_2of2")["model_stats"][0]["inference_stats"]
    client.close()
    latencies.sort()
    queue_ms = int(stats["queue"]["ns"]) / int(stats["queue"]["count"]) / 1e6
    compute_ms = int(stats["compute_infer"]["ns"]) / int(stats["compute_infer"]["count"]) / 1e6
    return (f"P50 {latencies[len(latencies) // 2]:.1f} ms, P99 {latencies[int(len(latencies) * 0.99)]:.1f} ms, "
            f"max {latencies[-1]:.1f} ms, {sum(x > 100 for x in latencies)} over 100 ms; Triton queue mean "
            f"{queue_ms:.2f} ms, compute mean {compute_ms:.2f} ms")


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    variants = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        checkpoint = work / "checkpoint"
        subprocess.run([sys.executable, str(ROOT / "examples" / "llm" / "make_checkpoint.py"), "--out",
                        str(checkpoint)], check=True, capture_output=True)
        for variant in variants:
            process, port = serve(work, checkpoint, variant)
            try:
                print(f"{variant}: {measure(port, steps, VARIANTS[variant][1])}", flush=True)
            finally:
                process.stop()


if __name__ == "__main__":
    main()
