"""The first critical requests into a gateway that a flood saturated before any critical request came (issue 10).

The suite's flood-first rounds: a 0 ms flood of `sheddable` (256 wrk connections, Retry-After ignored) starts,
and critical traffic (100 req/s, Poisson) comes 0.5 s later, after longer than `protect_window_s` without any,
so the gateway refused nothing until the first one came. Repeated REPS times in one stack (a pause longer than the
window before each), it prints the critical P99 alone and, per repetition, the latencies of the critical requests
sent in the first 100 ms (with the status where not 200) and how many of all took over twice the P99 alone.

    .venv/bin/python bench/diagnose/flood_first.py [REPS]   # 10 by default, ~2 min

Seen on 2026-12-01 (session 11): the suite's record of the slowest critical requests put the 0 ms flood's misses
there (bench/results/flood-2026-12-01-session11-run2.md: seven requests of 16-42 ms sent within 30 ms of the start
of critical traffic). Here, 10 repetitions: 1-13 requests over 5 ms a repetition, the slowest 25-62 ms, then
0.2-3 ms once the manager holds the flood. Holding the refused classes' connections at once when the first critical
request is read, and also refusing their queued requests, made no difference beyond the spread
(bench/results/flood-first-2026-12-01.txt): those requests wait before the gateway has read them, in the saturated
loop's turns. Reading the lowest class on at most `overload.lowest_class_read` (32) connections while nothing is
protected did: the slowest 3-15 ms (bench/results/flood-start-2026-12-01-session11.txt for what it took besides),
and suite run 15 met both floods with it (bench/results/overload-2026-12-01-run15-readbound.md). Its refusal cell
read 503 req/s, which the suite's cell order caused with or without it (bench/diagnose/refused_cell.py). But in
run 16 its holds (up to `hold_max_s`) left 19 flood requests unanswered past wrk's 2 s
(bench/results/overload-2026-12-01-run16-readbound.md). Session 12 made the connections beyond the bound take turns
(one answered is held, the one held longest read in its place): 1-4 of 1000 over twice the P99 alone with the
shipped code, the slowest of each repetition's first 100 ms 1.5-19.5 ms (bench/results/flood-first-2026-12-01.txt),
and no hold longer than a turn while nothing is protected.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.bench.loadgen import p99  # noqa: E402
from controlplane.bench.suite import API_KEY, Setups, critical_run, work_body  # noqa: E402
from controlplane.bench.wrk import script as wrk_script  # noqa: E402

REPS = 10
FIRST_S = 0.1  # the start of critical traffic looked at
QUIET_S = 6.0  # longer than the bench stack's protect_window_s (5 s): nothing to protect when the flood starts


def main(reps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="flood-first-") as tmp:
        setups = Setups(Path(tmp))
        try:
            setups.wait_all_ready()
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
                       "x-priority": "sheddable"}
            lua = wrk_script(Path(tmp) / "flood.lua", json.dumps(work_body({"work_ms": 0})), headers,
                             count_statuses=True)
            critical_run(setups, "gateway", 0, 1.0, None)  # warm-up
            alone, _, _ = critical_run(setups, "gateway", 0, 5.0, None)
            alone_p99 = p99([s.latency_s * 1000 for s in alone])
            print(f"critical P99 alone {alone_p99:.2f} ms", flush=True)
            slow_total = 0
            for rep in range(reps):
                setups.wait_gateway_idle()
                time.sleep(QUIET_S)
                beside, _, flood = critical_run(setups, "gateway", 0, 1.0, lua)
                first = [f"{s.latency_s * 1000:.1f}" + ("" if s.status == 200 else f" ({s.status})")
                         for s in sorted(beside, key=lambda s: s.sent_s) if s.sent_s < FIRST_S]
                slow = sum(1 for s in beside if s.latency_s * 1000 > 2 * alone_p99)
                slow_total += slow
                print(f"rep {rep}: first {FIRST_S * 1000:.0f} ms of critical (ms): {first}; over 2x the P99 alone: "
                      f"{slow} of {len(beside)}; flood {flood.statuses if flood else {}}", flush=True)
            print(f"over 2x the P99 alone, all repetitions: {slow_total}", flush=True)
        finally:
            setups.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else REPS)
