"""Where the time goes in the gateway targets still missed on this machine (issue 10), in one run.

Runs the bench stack (bench/overload.yaml: two real Triton shards, the gateway, nginx) and measures, setups
alternating, 2 rounds each:
1. peak, `work` at 0 ms (wrk closed loop, 64 connections, as the suite): per setup the req/s, the CPU a request
   of the proxy and of the Triton shards (servers and their model stubs), Triton's mean batch, and how busy the
   machine's cores were. Where the load generator, the proxy and the shards share the cores, throughput is
   about cores / (CPU a request summed over all of them).
2. half load, `work` at 5 ms (open loop at half of direct's peak, one class, as the suite's overhead step):
   client P50 against the time Triton itself reports a request took (queue + compute, its mean), per setup.
3. flood: critical at 100 req/s alone and beside 256 connections of `sheddable` (as the suite's flood group),
   per model: the critical latency the client sees against the one the gateway measures itself (from its
   reading the request to its answer, the cp_latency_seconds histogram): the difference waited in sockets
   and in the event loop before the gateway read the request, or after it answered.

    .venv/bin/python bench/diagnose/gateway_limits.py [OUT_DIR]     # ~5 min; bench/results by default

Writes gateway-limits-<date>.{json,md}. Every process is the stack's or wrk's and is stopped at the end.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from controlplane.bench import procstat
from controlplane.bench.loadgen import Flow, summarize
from controlplane.bench.suite import (
    API_KEY,
    Setups,
    critical_run,
    machine,
    open_loop,
    work_body,
    wrk_peak,
)
from controlplane.bench.wrk import script as wrk_script
from controlplane.procs import group_members

ROUNDS = 2
PEAK_S, HALF_S, FLOOD_S = 4, 5.0, 5.0


def busy_cpu_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / procstat.CLOCK_TICKS  # minus idle and iowait


def triton_pids(setups: Setups) -> list[int]:
    """Every process of every shard: tritonserver and its Python backend stubs (one process group each)."""
    state = json.loads(setups.state_file.read_text())
    return [pid for shard in state["shards"] for pid in group_members(shard["pid"])]


def triton_stats(setups: Setups) -> dict[str, float]:
    """Triton's counters of `work`, summed over the shards."""
    total = {"executions": 0.0, "inferences": 0.0, "queue_ns": 0.0, "compute_ns": 0.0, "success_ns": 0.0,
             "successes": 0.0}
    for url in setups.urls["direct"]:
        with urllib.request.urlopen(url + "/v2/models/work/stats", timeout=5) as answer:
            stats = json.load(answer)["model_stats"][0]
        inference = stats["inference_stats"]
        total["executions"] += stats["execution_count"]
        total["inferences"] += stats["inference_count"]
        total["queue_ns"] += inference["queue"]["ns"]
        total["compute_ns"] += inference["compute_infer"]["ns"]
        total["success_ns"] += inference["success"]["ns"]
        total["successes"] += inference["success"]["count"]
    return total


class Window:
    """CPU of the proxy, of the shards and of the whole machine, and Triton's counters, over a measurement."""

    def __init__(self, setups: Setups, proxy_pids: list[int]) -> None:
        self.setups, self.proxy_pids, self.shard_pids = setups, proxy_pids, triton_pids(setups)
        self.start = time.monotonic()
        self.proxy0 = procstat.total_cpu_seconds(proxy_pids)
        self.shards0 = procstat.total_cpu_seconds(self.shard_pids)
        self.busy0 = busy_cpu_seconds()
        self.triton0 = triton_stats(setups)

    def end(self) -> dict[str, float]:
        wall = time.monotonic() - self.start
        triton = {k: v - self.triton0[k] for k, v in triton_stats(self.setups).items()}
        requests = max(triton["inferences"], 1.0)
        return {
            "requests": triton["inferences"],
            "proxy_cpu_us": (procstat.total_cpu_seconds(self.proxy_pids) - self.proxy0) / requests * 1e6,
            "triton_cpu_us": (procstat.total_cpu_seconds(self.shard_pids) - self.shards0) / requests * 1e6,
            "machine_busy_cores": (busy_cpu_seconds() - self.busy0) / wall,
            "mean_batch": triton["inferences"] / max(triton["executions"], 1.0),
            "triton_request_ms": triton["success_ns"] / max(triton["successes"], 1.0) / 1e6,
            "triton_queue_ms": triton["queue_ns"] / max(triton["successes"], 1.0) / 1e6,
        }


def proxy_pids(setups: Setups, setup: str) -> list[int]:
    return {"gateway": setups.gateway_pids(), "nginx": setups.nginx_pids()}.get(setup, [])


def mean_of(windows: list[dict]) -> dict[str, float]:
    return {k: round(statistics.fmean(w[k] for w in windows), 3) for k in windows[0]}


def peak(setups: Setups, workdir: Path) -> dict:
    runs: dict[str, list[dict]] = {s: [] for s in ("direct", "nginx", "gateway")}
    wrk_peak(setups.urls["gateway"], {"work_ms": 0}, 1, 64, workdir)  # warm-up
    for _ in range(ROUNDS):
        for setup in runs:
            window = Window(setups, proxy_pids(setups, setup))
            rps = wrk_peak(setups.urls[setup], {"work_ms": 0}, PEAK_S, 64, workdir)["rps"]
            runs[setup].append({"rps": rps, **window.end()})
    return {setup: mean_of(windows) for setup, windows in runs.items()}


def half_load(setups: Setups, workdir: Path) -> dict:
    rate = 0.5 * wrk_peak(setups.urls["direct"], {"work_ms": 5}, PEAK_S, 64, workdir)["rps"]
    flow = [Flow(name="standard", weight=1, api_key=API_KEY, deadline_ms=1000, send_deadline=False,
                 body=work_body({"work_ms": 5}))]
    runs: dict[str, list[dict]] = {s: [] for s in ("direct", "nginx", "gateway")}
    for _ in range(ROUNDS):
        for setup in runs:
            window = Window(setups, proxy_pids(setups, setup))
            client = open_loop(setups.urls[setup], rate, HALF_S, flow)["all"]
            runs[setup].append({"client_p50_ms": client["ok_p50_ms"], "client_p99_ms": client["ok_p99_ms"],
                                **window.end()})
    return {"rate": round(rate), **{setup: mean_of(windows) for setup, windows in runs.items()}}


def critical_latency_cdf(setups: Setups) -> dict[str, float]:
    """The gateway's cp_latency_seconds buckets of the critical class (cumulative counts by bound)."""
    with urllib.request.urlopen(setups.urls["gateway"][0] + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("cp_latency_seconds_bucket{") and 'class="critical"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[bound] = float(line.rsplit(" ", 1)[1])
    return out


def flood(setups: Setups, workdir: Path) -> dict:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", "x-priority": "sheddable"}
    out = {}
    for label, work_ms in (("5ms", 5), ("0ms", 0)):
        lua = wrk_script(workdir / f"flood-{label}.lua", json.dumps(work_body({"work_ms": work_ms})), headers,
                         count_statuses=True)
        row: dict = {}
        for mode in ("alone", "flood"):
            samples, cdf_runs, windows = [], [], []
            for _ in range(ROUNDS):
                setups.wait_gateway_idle()
                before, window = critical_latency_cdf(setups), Window(setups, setups.gateway_pids())
                got, _, traffic = critical_run(setups, "gateway", work_ms, FLOOD_S, lua if mode == "flood" else None)
                windows.append(window.end())
                after = critical_latency_cdf(setups)
                samples += got
                cdf_runs.append({bound: after[bound] - before.get(bound, 0.0) for bound in after})
            client = summarize(samples, FLOOD_S * ROUNDS)
            counted = sum(run["+Inf"] for run in cdf_runs) or 1.0
            cdf = {bound: round(sum(run[bound] for run in cdf_runs) / counted, 4) for bound in cdf_runs[0]}
            row[mode] = {"client_p50_ms": client["ok_p50_ms"], "client_p90_ms": client["ok_p90_ms"],
                         "client_p99_ms": client["ok_p99_ms"], "statuses": client["statuses"],
                         "gateway_measured_cdf": cdf, **mean_of(windows)}
        out[label] = row
    return out


def markdown(result: dict) -> str:
    lines = [f"# Where the gateway's time goes on this machine, {result['date']}", "",
             f"Machine: {result['machine']}. `{result['command']}`; means over {ROUNDS} rounds, setups alternating.",
             "", "## 1. Peak, `work` at 0 ms (wrk, 64 connections)", "",
             "| setup | req/s | proxy CPU us/req | Triton CPU us/req (servers + stubs) | proxy + Triton us/req | "
             "Triton mean batch | machine busy cores |", "|---|---|---|---|---|---|---|"]
    for setup, r in result["peak"].items():
        lines.append(f"| {setup} | {r['rps']:.0f} | {r['proxy_cpu_us']:.1f} | {r['triton_cpu_us']:.1f} | "
                     f"{r['proxy_cpu_us'] + r['triton_cpu_us']:.1f} | {r['mean_batch']:.2f} | "
                     f"{r['machine_busy_cores']:.2f} |")
    half = result["half_load"]
    lines += ["", f"## 2. Half load, `work` at 5 ms, open loop at {half['rate']} req/s", "",
              "| setup | client P50 ms | client P99 ms | Triton's mean request ms (queue) | client P50 - Triton mean |"
              " Triton mean batch | proxy CPU us/req |", "|---|---|---|---|---|---|---|"]
    for setup in ("direct", "nginx", "gateway"):
        r = half[setup]
        lines.append(f"| {setup} | {r['client_p50_ms']:.2f} | {r['client_p99_ms']:.2f} | "
                     f"{r['triton_request_ms']:.2f} ({r['triton_queue_ms']:.2f}) | "
                     f"{r['client_p50_ms'] - r['triton_request_ms']:.2f} | {r['mean_batch']:.2f} | "
                     f"{r['proxy_cpu_us']:.1f} |")
    lines += ["", "## 3. Flood: critical at 100 req/s, alone and beside 256 `sheddable` connections (gateway)", "",
              "| model | mode | client P50 / P90 / P99 ms | gateway-measured share <= 2.5 / 5 / 10 / 25 ms | "
              "critical statuses | Triton CPU us/req | machine busy cores |", "|---|---|---|---|---|---|---|"]
    for label, row in result["flood"].items():
        for mode, r in row.items():
            cdf = r["gateway_measured_cdf"]
            lines.append(f"| {label} | {mode} | {r['client_p50_ms']:.2f} / {r['client_p90_ms']:.2f} / "
                         f"{r['client_p99_ms']:.2f} | {cdf.get('0.0025')} / {cdf.get('0.005')} / {cdf.get('0.01')} / "
                         f"{cdf.get('0.025')} | {r['statuses']} | {r['triton_cpu_us']:.1f} | "
                         f"{r['machine_busy_cores']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-limits-"))
    setups = Setups(workdir)
    try:
        setups.wait_all_ready()
        result = {"date": datetime.date.today().isoformat(), "machine": machine(),
                  "command": "python bench/diagnose/gateway_limits.py"}
        print("peak, 0 ms", flush=True)
        result["peak"] = peak(setups, workdir)
        print(json.dumps(result["peak"]), "\nhalf load, 5 ms", flush=True)
        result["half_load"] = half_load(setups, workdir)
        print(json.dumps(result["half_load"]), "\nflood", flush=True)
        result["flood"] = flood(setups, workdir)
    finally:
        setups.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"gateway-limits-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
