"""Start-up time of `make up` from a fresh clone: cold (creates the venv) and warm (venv exists).

Clones this repository (committed state) into a temporary folder, runs `make up` there until it prints the
address it serves, sends one tritonclient request to that address, then presses Ctrl-C and checks that
`make up` ends. Prints a table; writes bench/results/startup-<date>.json.

    .venv/bin/python bench/startup.py [--warm-runs 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
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


def one_start(clone: Path, run_dir: Path, log: Path) -> dict:
    env = {**os.environ, "CPCTL_RUN_DIR": str(run_dir), "COLUMNS": "200"}
    env.pop("VIRTUAL_ENV", None)
    log.write_text("")
    started = time.monotonic()
    process = ManagedProcess(["make", "up"], env=env, log_path=log, cwd=clone)
    try:
        while True:
            match = re.search(r"serving at (http://\S+)", log.read_text())
            if match:
                serving_s = time.monotonic() - started
                break
            if process.poll() is not None or time.monotonic() - started > 900:
                raise SystemExit(f"make up failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        client = httpclient.InferenceServerClient(match.group(1).removeprefix("http://"))
        tensor = httpclient.InferInput("features", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        score = float(client.infer("risk", [tensor]).as_numpy("score")[0, 0])
        client.close()
        process.signal_group(signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        process.popen.wait(timeout=60)
        return {"serving_s": round(serving_s, 2), "exit_code": process.popen.returncode, "risk_score": score,
                "stopped_cleanly": "every process started is gone" in log.read_text()}
    finally:
        process.stop(grace_s=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-runs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpctl-startup-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        runs = [{"kind": "cold (creates .venv, installs)", **one_start(clone, Path(tmp) / "run", Path(tmp) / "log")}]
        for _ in range(args.warm_runs):
            runs.append({"kind": "warm", **one_start(clone, Path(tmp) / "run", Path(tmp) / "log")})
    today = datetime.date.today().isoformat()
    print(f"`make up` on a fresh clone ({today}, {os.cpu_count()} cores)\n")
    print("| run | until serving (s) | request ok | Ctrl-C exit code | clean stop |\n|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['kind']} | {run['serving_s']} | score {run['risk_score']:.3f} | {run['exit_code']} | "
              f"{run['stopped_cleanly']} |")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"startup-{today}.json").write_text(json.dumps({"date": today, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
