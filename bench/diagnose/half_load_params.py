"""Does Triton's own queue make the gateway's half-load overhead (issue 10: +<= 0.5 ms P50 over direct)?

The gateway carries each request's class and remaining deadline into Triton (`priority` and `timeout` request
parameters, controlplane/gateway/exchange.py); direct and nginx send neither, so Triton's queue treats their
requests otherwise. This runs the suite's overhead step (bench/overload.yaml, `work` at 5 ms, one class, open loop
at RATE) for: direct; direct with the parameters the gateway would add for that class (`standard`: priority 2 of
3, a timeout of the class's 1 s deadline); nginx; the gateway. Setups alternate, ROUNDS rounds of WINDOW_S each;
prints each setup's median P50 / P99 and their difference from plain direct.

    .venv/bin/python bench/diagnose/half_load_params.py [RATE]   # 3500 by default; ~2 min
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.bench.loadgen import Flow  # noqa: E402
from controlplane.bench.suite import API_KEY, Setups, open_loop, work_body  # noqa: E402

ROUNDS, WINDOW_S = 4, 5.0
GATEWAY_PARAMETERS = {"priority": 2, "timeout": 1_000_000}  # what the gateway adds for `standard` (1 s deadline)


def flow(extra: dict) -> list[Flow]:
    return [Flow(name="standard", weight=1, api_key=API_KEY, deadline_ms=1000, send_deadline=False,
                 body=work_body({"work_ms": 5, **extra}))]


def main(rate: float) -> None:
    setups_run = {"direct": ("direct", flow({})), "direct + gateway's parameters": ("direct", flow(GATEWAY_PARAMETERS)),
                  "nginx": ("nginx", flow({})), "gateway": ("gateway", flow({}))}
    with tempfile.TemporaryDirectory(prefix="cpctl-halfparams-") as tmp:
        setups = Setups(Path(tmp))
        try:
            setups.wait_all_ready()
            for setup, flows in setups_run.values():  # warm-up, not counted
                open_loop(setups.urls[setup], rate, 1.0, flows)
            runs: dict[str, list[dict]] = {name: [] for name in setups_run}
            for index in range(ROUNDS):
                order = list(setups_run) if index % 2 == 0 else list(reversed(setups_run))
                for name in order:
                    setup, flows = setups_run[name]
                    runs[name].append(open_loop(setups.urls[setup], rate, WINDOW_S, flows)["all"])
        finally:
            setups.close()
    base = {k: statistics.median(r[k] for r in runs["direct"]) for k in ("ok_p50_ms", "ok_p99_ms")}
    print(f"{rate:g} req/s, `work` 5 ms, {ROUNDS} rounds of {WINDOW_S:g} s, medians of rounds:")
    for name, results in runs.items():
        p50 = statistics.median(r["ok_p50_ms"] for r in results)
        p99 = statistics.median(r["ok_p99_ms"] for r in results)
        print(f"  {name:32s} P50 {p50:6.2f} ms ({p50 - base['ok_p50_ms']:+.2f})  P99 {p99:6.2f} ms "
              f"({p99 - base['ok_p99_ms']:+.2f})  per round P50 {[r['ok_p50_ms'] for r in results]}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 3500.0)
