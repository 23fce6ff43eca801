"""The suite's gateway CPU cells in their order (admitted, then refused at admission, twice), with the gateway's
overload actions in each and its overload level changes: does the refused cell measure refusals?

    .venv/bin/python bench/diagnose/refused_cell.py [--calm]   # ~1 min; --calm: as the suite now does

Found on 2026-12-01 (session 11; bench/results/refused-cell-2026-12-01.txt): the admitted cell (standard, 64 wrk
connections at the gateway's peak) leaves the overload level at 2 for `cool_down_s`, with a higher class than the
refused tenant's (sheddable) seen; the refused cell right after then met the overload manager, which refused and
held its connections: 202-541 req/s instead of ~6.7k, and a CPU per refusal of the gateway's fixed work over few
requests. The suite now starts each gateway CPU cell with the level back at 0 (`Setups.wait_overload_calm`).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controlplane.bench.suite import API_KEY, REFUSED_KEY, Setups, work_body, wrk_peak  # noqa: E402
from controlplane.bench.wrk import WrkRun  # noqa: E402
from controlplane.bench.wrk import script as wrk_script  # noqa: E402


def main(calm: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="refused-cell-") as tmp:
        setups = Setups(Path(tmp))
        try:
            setups.wait_all_ready()
            body = json.dumps(work_body({"work_ms": 0}))
            wrk_peak(setups.urls["gateway"], {"work_ms": 0}, 1, 64, Path(tmp))  # warm-up
            for kind, key in (("admitted", API_KEY), ("refused", REFUSED_KEY)) * 2:
                lua = wrk_script(Path(tmp) / f"{kind}.lua", body,
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
                                 count_statuses=True)
                setups.wait_gateway_idle()
                waited = setups.wait_overload_calm() if calm else 0.0
                before, started = setups.overload_actions(), time.strftime("%H:%M:%S")
                result = WrkRun(setups.urls["gateway"], "/v2/models/work/infer", lua, 5, 64, threads=2).wait()
                print(f"{started} {kind}: {result.rps:.0f} req/s {dict(result.statuses)}; overload actions "
                      f"{setups.overload_actions() - before}; waited {waited} s for level 0", flush=True)
            for line in setups.log_lines():
                if "overload level" in line:
                    print("  " + line.strip()[:200])
        finally:
            setups.close()


if __name__ == "__main__":
    main("--calm" in sys.argv)
