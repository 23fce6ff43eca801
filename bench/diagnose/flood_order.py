"""Reproduce the start-of-flood stall of the gateway (issue 10): critical latency per flood, in a given order.

Runs the bench stack (bench/overload.yaml: real Triton shards, the gateway, nginx), then each step of PLAN,
a comma-separated list of SETUP:MODE (gateway|nginx|direct : flood|alone) or idle:SECONDS. For each run it
prints the largest critical latency and the first slow requests (> 50 ms), and for a slow gateway run the
gateway's own metrics sampled every 0.2 s (overload level, held connections, shard limits, retries,
ejections). Bounded: each step is 5 s of load.

    .venv/bin/python bench/diagnose/flood_order.py gateway:flood,idle:14,gateway:flood,direct:flood,gateway:flood

Seen on 2026-11-30 (2 cores): the first gateway flood keeps critical under 20-80 ms; a gateway flood that
follows ~14 s of gateway idleness (idle, or another setup's flood) starts with every critical request waiting
1-2.6 s, and the gateway's /metrics does not answer within 1 s meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from controlplane.bench import suite
from controlplane.bench.suite import API_KEY, Setups, critical_run, work_body, wrk_script

STACKS = os.environ.get("DIAG_STACKS") == "1"  # py-spy dumps of the gateway during gateway runs
WATCHED = ("cp_overload_level", 'cp_queue_depth{class="critical"', "cp_shard_in_flight", "cp_shard_concurrency_limit",
           "cp_shard_ejections", "cp_retries", "cp_overload_held")


def sample_metrics(url: str, stop: threading.Event, rows: list) -> None:
    started = time.monotonic()
    while not stop.is_set():
        try:
            text = urllib.request.urlopen(f"{url}/metrics", timeout=1).read().decode()
            row = " | ".join(line.removeprefix("cp_") for line in text.splitlines()
                             if not line.startswith("#") and line.startswith(WATCHED))
        except OSError as exc:
            row = repr(exc)
        rows.append((round(time.monotonic() - started, 2), row))
        time.sleep(0.2)


def dump_stacks(pid: int, stop: threading.Event, rows: list) -> None:
    """The gateway's Python stacks every 0.3 s (py-spy dump), to see what its loop does while critical waits."""
    started = time.monotonic()
    while not stop.is_set():
        dump = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "--nonblocking", "-p", str(pid)],
                              capture_output=True, text=True, timeout=10).stdout
        rows.append((round(time.monotonic() - started, 2), dump))
        time.sleep(0.3)


def main(plan: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="flood-order-"))
    setups = Setups(workdir)
    try:
        setups.wait_all_ready()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", "x-priority": "sheddable"}
        lua = wrk_script(workdir / "flood.lua", json.dumps(work_body({"work_ms": 0})), headers, count_statuses=True)
        for setup in suite.FLOOD_SETUPS:  # warm-up, as the suite does
            critical_run(setups, setup, 5, 1.0, None)
        for step in plan.split(","):
            setup, mode = step.split(":")
            if setup == "idle":
                time.sleep(min(float(mode), 60.0))
                continue
            setups.wait_gateway_idle()
            stop, rows = threading.Event(), []
            sampler = threading.Thread(target=sample_metrics, args=(setups.urls["gateway"][0], stop, rows))
            sampler.start()
            stacks: list = []
            if STACKS and setup == "gateway":
                dumper = threading.Thread(target=dump_stacks, args=(setups.gateway_pids()[0], stop, stacks))
                dumper.start()
            samples, _, _ = critical_run(setups, setup, 0, 5.0, lua if mode == "flood" else None)
            stop.set()
            sampler.join()
            if stacks:
                dumper.join()
            latencies = [round(s.latency_s * 1000, 1) for s in samples]
            slow = [(i, ms) for i, ms in enumerate(latencies) if ms > 50]
            print(f"{setup:8s} {mode:6s} max {max(latencies):8.1f} ms, {len(slow)} slow (> 50 ms): {slow[:5]}, "
                  f"at indices {[i for i, _ in slow][:60]}", flush=True)
            if setup == "gateway" and slow:
                for row in rows[:12]:
                    print("   ", row, flush=True)
                for at, dump in stacks[:8]:
                    print(f"  stack at {at} s:\n{dump}", flush=True)
    finally:
        setups.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gateway:flood,idle:14,gateway:flood")
