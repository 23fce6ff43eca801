"""Steps of the suite's shard-bound overload mix (10% critical / 30% standard / 60% sheddable, GPU-like `work`)
alone, outside the suite: per setup and multiple of 800 req/s (direct's capacity), each class's P99 of 2xx,
goodput and sheds, the sheds' P99 and the load generator's own send lag.

    .venv/bin/python bench/diagnose/overload_steps.py [MULTIPLES] [SETUPS]     # e.g. 0.5,3 direct,nginx,gateway

Seen on 2026-12-01 (2 shared cores, the code of suite run 6): the 3x gateway step, alone or after direct and nginx
at 3x as in the suite, gave critical P99 70-81 ms against 45-55 ms at 0.5x (x1.4-1.6, six runs), sheds P99
1.6-2.3 ms, the generator 1.1-1.3 ms behind; in the suite's own 3x step the generator was 72 ms behind (run 6).
The difference was the generator's collector: in the suite's process its full passes scan what the earlier scenarios
left; the load generator now runs with it off (suite run 9: 1.0-1.6 ms behind at every step, critical x1.25).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.bench import suite  # noqa: E402

STEP_S = 6.0  # as the suite


def main() -> None:
    multiples = [float(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "0.5,3").split(",")]
    setups_run = (sys.argv[2] if len(sys.argv) > 2 else "gateway").split(",")
    if not all(0 < m <= 4 for m in multiples) or not set(setups_run) <= set(suite.SETUPS):
        raise SystemExit(f"MULTIPLES: 0 to 4; SETUPS: of {','.join(suite.SETUPS)}")
    with tempfile.TemporaryDirectory(prefix="cpctl-steps-") as tmp:
        setups = suite.Setups(Path(tmp))
        try:
            setups.wait_all_ready()
            suite.open_loop(setups.urls["gateway"], suite.MIX_CAPACITY / 2, 2, suite.mix_flows(True))  # warm-up
            for multiple in multiples:
                for setup in setups_run:
                    s = suite.open_loop(setups.urls[setup], suite.MIX_CAPACITY * multiple, STEP_S,
                                        suite.mix_flows(setup == "gateway"))
                    classes = "  ".join(f"{c} P99 {f['ok_p99_ms']:.0f} ms, {f['goodput_rps']:.0f}/s, shed {f['shed']}"
                                        for c, f in s["flows"].items())
                    print(f"{multiple:g}x {setup}: {classes} | 5xx {s['all']['errors_5xx']}, shed P99 "
                          f"{s['all']['shed_p99_ms']} ms, generator lag P99 {s['generator_lag_p99_ms']} ms",
                          flush=True)
        finally:
            setups.close()


if __name__ == "__main__":
    main()
