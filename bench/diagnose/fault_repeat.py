"""The suite's fault scenario (SIGKILL shard main-0 at 2 s, SIGSTOP main-1 from 5 s to 8 s, the mix at 1x: 800
req/s) repeated RUNS times back to back in one stack, through the gateway; each run starts once both shards report
ready. Prints the statuses per class of each run (status "0": no answer within the client's 10 s).

    .venv/bin/python bench/diagnose/fault_repeat.py [RUNS]

Found on 2026-12-01 with it (session 9): in the run where no shard served (main-0 restarting after its back-off
of 0.5, 1, 2, then 4 s, controlplane/shards/local.py, while main-1 was frozen), a lower class drained nothing for
a whole rate window, so the scheduler estimated its wait as infinite and shed new requests with an infinite
Retry-After; turning that into a header raised OverflowError after the exchange had been marked finished, and the
client got nothing: up to 487 requests in the 4th run, each a TimeoutError after the client's full 10 s. The gateway
worker logged each one, but in its own log (run/*/logs/), which this script did not read. Fixed: the refusal names
the stalled class with Retry-After 1 (Retry-After is capped at 60 s), a step that breaks while answering still
answers 500, and the server answers 500 for a handler that leaves a request neither answered nor pending
(tests/test_gateway_failures.py). Since: 0 unanswered in 3 repeats of 4 runs
(bench/results/fault-repeat-2026-12-01.txt); the critical losses of the 4th run remain (the back-off, as in
Kubernetes' CrashLoopBackOff, by design).

Session 11 (bench/results/fault-repeat-2026-12-01-session11.txt; it now prints when the lost critical requests were
sent, their shed reasons and the gateway's log lines of requests timed out in flight and of probes): in 27 runs, 8
lost critical requests. Two kinds: a critical request stalled on the frozen shard was retried on main-0 too late to
be answered there (504, attempt 2), and once main-0, overloaded and alone, had its requests time out at their
deadlines several at once, which ejected the only shard left (154 shed for `deadline`). Now an overloaded shard that
answers others is not ejected, and the top class is seen as stalled after one stall time, keeping one for its retry:
0 lost in 9 runs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.bench import client, suite  # noqa: E402

RATE = suite.MIX_CAPACITY  # the mix at 1x
unanswered: Counter[str] = Counter()  # why the load generator got no answer (its status "0"), this run


def counting_request(request):  # noqa: ANN001, ANN201 - wraps HttpClient.request
    """The load generator's request, its failures counted by kind (a 10 s TimeoutError: no answer at all)."""
    async def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        try:
            return await request(self, *args, **kwargs)
        except Exception as exc:
            unanswered[type(exc).__name__] += 1
            raise
    return wrapped


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    if not 1 <= runs <= 10:
        raise SystemExit("RUNS: 1 to 10")
    client.HttpClient.request = counting_request(client.HttpClient.request)
    with tempfile.TemporaryDirectory(prefix="cpctl-fault-") as tmp:
        setups = suite.Setups(Path(tmp))
        try:
            setups.wait_all_ready()
            suite.open_loop(setups.urls["gateway"], RATE / 2, 2, suite.mix_flows(True))  # warm-up
            for run in range(1, runs + 1):
                setups.wait_all_ready()
                unanswered.clear()
                actions_before = setups.overload_actions()
                print(f"run {run} starts at {time.strftime('%H:%M:%S')} (main-0 killed 2 s in, main-1 frozen 5-8 s)",
                      flush=True)
                fault = suite.fault_run(setups, "gateway", RATE, 10.0)
                shed, lost = fault["flows"]["critical"]["shed_reasons"], fault["critical_lost_sent_s"]
                print(f"run {run}: " + ", ".join(f"{c} {fault['flows'][c]['statuses']}" for c in fault["flows"])
                      + (f"; critical shed for {shed}" if shed else "")
                      + (f"; critical lost, sent {lost[0]}-{lost[-1]} s into the run" if lost else "")
                      + (f"; no answer: {dict(unanswered)}" if unanswered else "")
                      + f"; overload actions {setups.overload_actions() - actions_before}", flush=True)
            # the supervisor's restarts (with their back-off) and the gateway's overload levels, then every error
            for line in setups.log_lines():
                if any(s in line for s in ("shard main-0:", "overload level", "timed out a request", "probed after")):
                    print("  " + line.strip()[:160])
            for line in setups.log_errors():  # cpctl's, the gateway workers' and the shards' logs
                print("  " + line.strip()[:160])
        finally:
            setups.close()


if __name__ == "__main__":
    main()
