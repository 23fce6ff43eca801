"""How busy the gateway's event loop reads (the overload manager's CPU monitor) per scenario, from outside.

Runs the bench stack (bench/overload.yaml) and reads the gateway worker's schedstat (run and run-queue wait over
wall time) in 250 ms slices, as its overload manager does, during: idle; half load (3500 req/s, `work` at 5 ms);
the shard-bound mix at 1x, 2x and 3x of 800 req/s; and the suite's flood of the 0 ms and the 5 ms model (each
after 7 s of calm, so it starts at level 0; the first slices are before the manager acts).

    .venv/bin/python bench/diagnose/loop_busy.py      # ~1 min; prints (run, wait) per slice per scenario

Seen on 2026-12-01 (2 shared cores): bench/results/loop-busy-2026-12-01.txt.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.bench.loadgen import Flow  # noqa: E402
from controlplane.bench.suite import API_KEY, MIX_CAPACITY, Setups, critical_run, mix_flows, open_loop, work_body  # noqa: E402
from controlplane.bench.wrk import script as wrk_script  # noqa: E402

SLICE_S = 0.25


def schedstat(pid: int) -> tuple[float, float]:
    ran_ns, waited_ns, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(ran_ns) / 1e9, int(waited_ns) / 1e9


def slices(pid: int, run) -> list[tuple[float, float]]:  # noqa: ANN001 - a callable that runs the scenario
    """(run, wait) shares of each SLICE_S while `run()` runs."""
    stop, out = threading.Event(), []

    def sample() -> None:
        ran0, waited0 = schedstat(pid)
        start = time.monotonic()
        while not stop.wait(SLICE_S):
            ran, waited = schedstat(pid)
            now = time.monotonic()
            out.append((round((ran - ran0) / (now - start), 2), round((waited - waited0) / (now - start), 2)))
            ran0, waited0, start = ran, waited, now

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        stop.set()
        sampler.join()
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="loop-busy-") as tmp:
        setups = Setups(Path(tmp))
        try:
            setups.wait_all_ready()
            pid, url = setups.gateway_pids()[0], setups.urls["gateway"]
            half = [Flow(name="standard", weight=1, api_key=API_KEY, deadline_ms=1000, send_deadline=False,
                         body=work_body({"work_ms": 5}))]
            scenarios = [("idle", lambda: time.sleep(2)),
                         ("half load 3500 req/s (5 ms)", lambda: open_loop(url, 3500, 4, half)),
                         *((f"mix {m}x", lambda m=m: open_loop(url, MIX_CAPACITY * m, 4, mix_flows(True)))
                           for m in (1, 2, 3))]
            for name, run in scenarios:
                print(f"{name}: {slices(pid, run)}", flush=True)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
                       "x-priority": "sheddable"}
            for work_ms in (0, 5):
                lua = wrk_script(Path(tmp) / f"flood{work_ms}.lua", json.dumps(work_body({"work_ms": work_ms})),
                                 headers, count_statuses=True)
                setups.wait_gateway_idle()
                time.sleep(7)  # the level cools down to 0
                print(f"flood, {work_ms} ms model: "
                      f"{slices(pid, lambda w=work_ms, f=lua: critical_run(setups, 'gateway', w, 3.0, f))}", flush=True)
        finally:
            setups.close()


if __name__ == "__main__":
    main()
