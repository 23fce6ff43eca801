"""How fast the gateway's overload manager sees a flood start (issue 10), round by round, as the suite alternates.

Runs the bench stack (bench/overload.yaml) and, ROUNDS times: critical alone for 5 s, then critical beside the
suite's flood (256 wrk connections of `sheddable`, Retry-After ignored, started 0.5 s before critical) for 5 s,
each round starting at whatever level the last one left. While the flood runs, the gateway's overload level,
held connections, lag and CPU pressure and admitted `sheddable` requests are sampled every SAMPLE_S. Prints per
round the critical P99 alone and beside the flood, when the level first rose, and the slow critical requests
(over twice the P99 alone) with the time they were sent, since the flood started.

    .venv/bin/python bench/diagnose/flood_start.py [WORK_MS] [--like-suite]   # 0 (default) or 5; ~1.5 min

`--like-suite` orders the cells as the suite's flood group does: odd rounds flood first, and nginx's and direct's
cells (alone and flooded, not printed) between the gateway's (~4 min).

Seen on 2026-12-01 (2 shared cores): with the CPU monitor on the process's CPU alone, the 0 ms flood went unseen
for 0.5-1.5 s at the start of a round (level 0, lag pressure 0, CPU 0.45-0.55: the loop's timers were on time
to the millisecond while it waited for a core the rest of the time; critical x8.55, x1.18, x2.91 in three
rounds). With the loop thread's run plus run-queue wait (schedstat, 0.96-0.98 there), the level rose at the first
refresh: x1.30, x1.32, x1.29. bench/results/flood-start-2026-12-01.txt. With `--like-suite` (-like-suite.txt): in a
round that starts with the flood the gateway had seen no critical request for ~26 s (nginx's and direct's cells),
so it refused nothing until the first critical request came, 0.5 s in (`protect_window_s`, 5 s), and those first
critical requests waited behind the flood already in its loop (10.9, 14.1 ms; x1.21-1.43 in three rounds).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.bench.loadgen import p99  # noqa: E402
from controlplane.bench.suite import API_KEY, FLOOD_LEAD_S, Setups, critical_run, work_body  # noqa: E402
from controlplane.bench.wrk import script as wrk_script  # noqa: E402

ROUNDS, SECONDS, SAMPLE_S = 3, 5.0, 0.05
SAMPLED = {"level": r"^cp_overload_level (\S+)", "held": r"^cp_overload_held_connections (\S+)",
           "lag": r'^cp_overload_pressure\{monitor="lag"\} (\S+)',
           "cpu": r'^cp_overload_pressure\{monitor="cpu"\} (\S+)'}
ADMITTED = r'^cp_requests_total\{[^}]*class="sheddable"[^}]*outcome="admitted"[^}]*\} (\S+)'


def sample(url: str, stop: threading.Event, rows: list[dict]) -> None:
    started = time.monotonic()
    while not stop.wait(SAMPLE_S):
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=1) as answer:
                text = answer.read().decode()
        except OSError:
            continue
        row = {name: float(re.search(pattern, text, re.M).group(1)) for name, pattern in SAMPLED.items()}
        row["admitted"] = sum(float(v) for v in re.findall(ADMITTED, text, re.M))
        rows.append({"t": round(time.monotonic() - started, 2), **row})


def main(work_ms: int, like_suite: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="flood-start-") as tmp:
        setups = Setups(Path(tmp))
        try:
            setups.wait_all_ready()
            url = setups.urls["gateway"][0]
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
                       "x-priority": "sheddable"}
            lua = wrk_script(Path(tmp) / "flood.lua", json.dumps(work_body({"work_ms": work_ms})), headers,
                             count_statuses=True)
            critical_run(setups, "gateway", work_ms, 1.0, None)  # warm-up
            for round_number in range(ROUNDS):
                flood_first = like_suite and round_number % 2 == 1
                if not flood_first:
                    setups.wait_gateway_idle()
                    alone, _, _ = critical_run(setups, "gateway", work_ms, SECONDS, None)
                setups.wait_gateway_idle()
                stop, rows = threading.Event(), []
                sampler = threading.Thread(target=sample, args=(url, stop, rows))
                sampler.start()
                try:
                    beside, _, flood = critical_run(setups, "gateway", work_ms, SECONDS, lua)
                finally:
                    stop.set()
                    sampler.join()
                if flood_first:
                    setups.wait_gateway_idle()
                    alone, _, _ = critical_run(setups, "gateway", work_ms, SECONDS, None)
                alone_p99 = p99([s.latency_s * 1000 for s in alone])
                for other in ("nginx", "direct") if like_suite else ():  # the suite's other cells, not printed
                    for flooded in (None, lua):
                        setups.wait_gateway_idle()
                        critical_run(setups, other, work_ms, SECONDS, flooded)
                latencies = [s.latency_s * 1000 for s in beside]
                rose = next((r["t"] for r in rows if r["held"] > 0), None)
                slow = [(round(s.sent_s + FLOOD_LEAD_S, 2), round(s.latency_s * 1000, 1))
                        for s in sorted(beside, key=lambda s: s.sent_s) if s.latency_s * 1000 > 2 * alone_p99]
                print(f"round {round_number}: critical P99 alone {alone_p99:.2f} ms, beside the flood "
                      f"{p99(latencies):.2f} ms (x{p99(latencies) / alone_p99:.2f}); flood statuses "
                      f"{flood.statuses if flood else {}}; first connection held at {rose} s", flush=True)
                print(f"  slow critical (s since the flood started, ms): {slow[:30]}", flush=True)
                print("  samples (t s, level, held, lag, cpu, sheddable admitted): "
                      + ", ".join(f"({r['t']}, {r['level']:.0f}, {r['held']:.0f}, {r['lag']:.2f}, {r['cpu']:.2f}, "
                                  f"{r['admitted']:.0f})" for r in rows[:40:2]), flush=True)
        finally:
            setups.close()


if __name__ == "__main__":
    main(int(next((a for a in sys.argv[1:] if a.isdigit()), "0")), "--like-suite" in sys.argv)
