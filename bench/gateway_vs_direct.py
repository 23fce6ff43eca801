"""Gateway vs Triton direct: peak throughput and latency on the `work` model, side by side in one run.

Starts the example stack (`cpctl up`, two real Triton shards behind the gateway), then alternates
closed-loop wrk runs: through the gateway (which balances over both shards), and direct (one wrk per shard,
half the connections each, so the shards see the same load without the gateway). Prints a table and writes
bench/results/gateway-vs-direct-<date>.{json,md}. Every process it starts is tracked and stopped.

    .venv/bin/python bench/gateway_vs_direct.py [--rounds 3] [--seconds 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.procs import ManagedProcess  # noqa: E402

SPEC = ROOT / "examples" / "local" / "cluster.yaml"
RESULTS = ROOT / "bench" / "results"


def wrk_script(work_ms: float, path: Path) -> Path:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
                       "parameters": {"work_ms": work_ms}})
    path.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')
    return path


def parse_wrk(output: str) -> dict:
    def ms(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    percentiles = {p: ms(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)", output, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "requests": int(re.search(r"(\d+) requests in", output).group(1)),
            "p50_ms": percentiles.get("50"), "p90_ms": percentiles.get("90"), "p99_ms": percentiles.get("99"),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def run_wrk(urls: list[str], connections: int, seconds: int, script: Path, model_path: str) -> dict:
    """One wrk per URL at once (connections split between them); throughput summed, latency of the worst."""
    per_url = max(1, connections // len(urls))
    procs = [subprocess.Popen(["wrk", "-t1", f"-c{per_url}", f"-d{seconds}s", "--latency", "-s", str(script),
                               url + model_path], stdout=subprocess.PIPE, text=True) for url in urls]
    results = [parse_wrk(p.communicate(timeout=seconds + 30)[0]) for p in procs]
    return {"rps": sum(r["rps"] for r in results), "requests": sum(r["requests"] for r in results),
            "p50_ms": max(r["p50_ms"] for r in results), "p90_ms": max(r["p90_ms"] for r in results),
            "p99_ms": max(r["p99_ms"] for r in results), "non_2xx": sum(r["non_2xx"] for r in results),
            "socket_errors": "; ".join(r["socket_errors"] for r in results if r["socket_errors"])}


def start_stack(run_dir: Path) -> tuple[ManagedProcess, dict]:
    env = {**os.environ, "CPCTL_RUN_DIR": str(run_dir)}
    stack = ManagedProcess([sys.executable, "-m", "controlplane.cli", "up", "-f", str(SPEC), "--port", "0"],
                           env=env, log_path=run_dir / "cpctl.log", cwd=ROOT)
    state_file = run_dir / "local-demo" / "state.json"
    deadline = time.monotonic() + 60
    while not state_file.exists():
        if stack.poll() is not None or time.monotonic() > deadline:
            stack.stop()
            sys.exit(f"cpctl up failed: {stack.log_tail()}")
        time.sleep(0.05)
    return stack, json.loads(state_file.read_text())


def gateway_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--work-ms", type=float, nargs="+", default=[5.0, 0.0])
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")

    with tempfile.TemporaryDirectory(prefix="cpctl-bench-") as tmp:
        tmp_path = Path(tmp)
        stack, state = start_stack(tmp_path)
        try:
            gateway = state["gateway"]
            shards = [s["url"] for s in state["shards"] if s["url"]]
            rows = []
            for work_ms in args.work_ms:
                script = wrk_script(work_ms, tmp_path / f"work-{work_ms}.lua")
                setups = {"gateway": [gateway], "direct": shards}
                run_wrk([gateway], args.connections, 1, script, "/v2/models/work/infer")  # warm-up
                samples: dict[str, list[dict]] = {name: [] for name in setups}
                for _ in range(args.rounds):  # A B A B ...: drift on a shared machine hits both alike
                    for name, urls in setups.items():
                        samples[name].append(run_wrk(urls, args.connections, args.seconds, script,
                                                     "/v2/models/work/infer"))
                for name, runs in samples.items():
                    rows.append({"work_ms": work_ms, "setup": name,
                                 "rps": statistics.median(r["rps"] for r in runs),
                                 "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                                 "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                                 "non_2xx": sum(r["non_2xx"] for r in runs), "runs": runs})
            rss = gateway_rss_mb(stack.pid)
        finally:
            stack.popen.send_signal(signal.SIGINT)
            try:
                stack.popen.wait(timeout=30)
            finally:
                stack.stop(grace_s=1)

    report(rows, rss, args)


def report(rows: list[dict], rss_mb: float, args: argparse.Namespace) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    machine = {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}
    today = datetime.date.today().isoformat()
    lines = [f"# Gateway vs Triton direct, `work` model ({today})", "",
             f"Machine: {machine['cores']} cores, {cpu}. wrk closed loop, {args.connections} connections, "
             f"{args.seconds} s x {args.rounds} rounds alternating, medians. Client, gateway and both shards share "
             "the machine.", "",
             "| work per batch | setup | req/s | P50 ms | P99 ms | non-2xx | gateway/direct req/s |",
             "|---|---|---|---|---|---|---|"]
    ratios = {}
    for row in rows:
        direct = next(r for r in rows if r["work_ms"] == row["work_ms"] and r["setup"] == "direct")
        ratio = row["rps"] / direct["rps"]
        if row["setup"] == "gateway":
            ratios[f"work_{row['work_ms']:g}ms"] = round(ratio, 3)
        lines.append(f"| {row['work_ms']:g} ms | {row['setup']} | {row['rps']:.0f} | {row['p50_ms']:.2f} | "
                     f"{row['p99_ms']:.2f} | {row['non_2xx']} | {ratio:.3f} |")
    lines += ["", f"Gateway RSS after the run: {rss_mb:.1f} MB.", "",
              "Reproduce: `.venv/bin/python bench/gateway_vs_direct.py`"]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gateway-vs-direct-{today}.md").write_text(text + "\n")
    (RESULTS / f"gateway-vs-direct-{today}.json").write_text(json.dumps(
        {"date": today, "machine": machine, "connections": args.connections, "seconds": args.seconds,
         "rounds": args.rounds, "gateway_rss_mb": round(rss_mb, 1), "ratios": ratios, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
