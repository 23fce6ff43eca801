"""The overload benchmark: our gateway vs nginx vs Triton direct, side by side in one run.

Starts the stack of bench/overload.yaml (`cpctl up`: two real Triton shards behind the gateway) and nginx
(Debian package, one worker, round robin with upstream keepalive) in front of the same shards, then runs,
alternating between setups:
1. peak: closed-loop wrk, `work` at 5 ms and at 0 ms a batch (throughput ceiling of each setup);
2. overhead: open loop at half of direct's 5 ms peak, one class;
3. capacity: the highest open-loop rate each setup serves with P99 under the SLO, on the GPU-like workload
   (10 ms a batch + 4 ms a row);
4. overload: the class mix (10% critical, 30% standard, 60% sheddable) at 0.5x, 1x, 2x, 3x of direct's capacity;
5. fault: the mix at 1x while one shard is SIGKILLed and another SIGSTOPped for 3 s.
Writes bench/results/overload-<date>.{json,md,png} and overload-latest.json, with `targets`.
Every process started here is tracked and stopped; all traffic stays on loopback.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable
from pathlib import Path

import uvloop

from controlplane.bench.loadgen import Flow, Scenario, run
from controlplane.procs import ManagedProcess

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC = ROOT / "bench" / "overload.yaml"
RESULTS = ROOT / "bench" / "results"
API_KEY = "cp-bench-key"
GPU_LIKE = {"work_ms": 10, "per_item_ms": 4}
SLO_MS = 250.0  # the critical class's deadline
MIX = (("critical", 0.1, 250), ("standard", 0.3, 1000), ("sheddable", 0.6, 2000))
SETUPS = ("direct", "nginx", "gateway")


def work_body(parameters: dict) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
            "parameters": parameters}


def mix_flows(send_deadline: bool) -> list[Flow]:
    return [Flow(name=name, weight=weight, priority=name, api_key=API_KEY, deadline_ms=deadline,
                 send_deadline=send_deadline, body=work_body(GPU_LIKE)) for name, weight, deadline in MIX]


class Setups:
    """The running stack, nginx, and the URL of each setup."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        env = {**os.environ, "CPCTL_RUN_DIR": str(workdir / "run")}
        self.stack = ManagedProcess([sys.executable, "-m", "controlplane.cli", "up", "-f", str(SPEC)], env=env,
                                    log_path=workdir / "cpctl.log", cwd=ROOT)
        state_file = workdir / "run" / "bench-overload" / "state.json"
        deadline = time.monotonic() + 90
        while not state_file.exists():
            if self.stack.poll() is not None or time.monotonic() > deadline:
                self.stack.stop()
                raise RuntimeError(f"cpctl up failed: {self.stack.log_tail()}")
            time.sleep(0.05)
        self.state_file = state_file
        state = json.loads(state_file.read_text())
        self.shards = {s["name"]: s for s in state["shards"] if s["url"]}
        self.nginx_port = free_port()
        self.nginx = start_nginx(workdir, self.nginx_port, [s["url"] for s in self.shards.values()])
        self.urls = {"direct": [s["url"] for s in self.shards.values()],
                     "nginx": [f"http://127.0.0.1:{self.nginx_port}"], "gateway": [state["gateway"]]}

    def shard_pid(self, name: str) -> int:
        state = json.loads(self.state_file.read_text())
        return next(s["pid"] for s in state["shards"] if s["name"] == name)

    def wait_all_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = json.loads(self.state_file.read_text())
            if all(s["state"] == "ready" for s in state["shards"]):
                return
            time.sleep(0.2)

    def gateway_memory_mb(self) -> dict:
        fields = {}
        for line in Path(f"/proc/{self.stack.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
        return {"rss_mb": fields.get("VmRSS"), "peak_rss_mb": fields.get("VmHWM")}

    def close(self) -> None:
        self.nginx.stop(grace_s=2)
        self.stack.popen.send_signal(signal.SIGINT)
        try:
            self.stack.popen.wait(timeout=30)
        finally:
            self.stack.stop(grace_s=2)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(workdir: Path, port: int, upstreams: list[str]) -> ManagedProcess:
    """nginx as a user would put it in front of Triton: round robin, upstream keepalive, one worker."""
    if shutil.which("nginx") is None:
        raise RuntimeError("nginx is needed: apt-get install nginx-light (make test installs it as root)")
    servers = "\n".join(f"    server {url.removeprefix('http://')};" for url in upstreams)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/nginx-body;
  proxy_temp_path {workdir}/nginx-proxy;
  client_max_body_size 8m;
  upstream shards {{
{servers}
    keepalive 512;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://shards;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
    process = ManagedProcess(["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                             log_path=workdir / "nginx.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            import urllib.request
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"nginx did not start: {process.log_tail()}")


def wrk_peak(urls: list[str], work: dict, seconds: int, connections: int, workdir: Path) -> dict:
    """Closed-loop peak throughput; one wrk per URL at once (direct), results summed."""
    script = workdir / f"wrk-{abs(hash(json.dumps(work)))}.lua"
    body = json.dumps(work_body(work))
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {API_KEY}"\n')
    per_url = max(1, connections // len(urls))
    procs = [subprocess.Popen(["wrk", "-t1", f"-c{per_url}", f"-d{seconds}s", "--latency", "-s", str(script),
                               f"{url}/v2/models/work/infer"], stdout=subprocess.PIPE, text=True) for url in urls]
    outputs = [p.communicate(timeout=seconds + 30)[0] for p in procs]
    rps = sum(float(re.search(r"Requests/sec:\s+([\d.]+)", o).group(1)) for o in outputs)
    non_2xx = sum(int(m.group(1)) for o in outputs if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", o)))
    return {"rps": round(rps, 1), "non_2xx": non_2xx}


def open_loop(urls: list[str], rate: float, seconds: float, flows: list[Flow]) -> dict:
    scenario = Scenario(rate=rate, duration_s=seconds, flows=flows, arrivals="poisson", timeout_s=10)
    return uvloop.run(run(scenario, urls)).summary()  # uvloop: the generator must not be the bottleneck


def find_capacity(urls: list[str], flows: list[Flow], log: Callable[[str], None], start: float = 100.0) -> dict:
    """The highest rate served with P99 under the SLO and >= 97% answered 2xx: doubling, then bisecting."""
    def passes(rate: float) -> bool:
        result = open_loop(urls, rate, 3.0, flows)["all"]
        ok = result["ok_p99_ms"] <= SLO_MS and result["ok"] >= 0.97 * result["sent"]
        log(f"    {rate:7.0f} req/s: P99 {result['ok_p99_ms']:8.1f} ms, ok {result['ok']}/{result['sent']}"
            f" -> {'pass' if ok else 'fail'}")
        return ok

    low, high = 0.0, start
    while passes(high):
        low, high = high, high * 2
        if high > 20000:
            break
    for _ in range(3):
        middle = (low + high) / 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return {"rate": round(low, 1)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release()}


def run_suite(quick: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run every scenario; return the results (also written under bench/results/)."""
    rounds, peak_s, step_s = (1, 2, 2.0) if quick else (2, 4, 6.0)
    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine(), "quick": quick,
                     "setups": {"direct": "client round robin over the 2 shards", "nginx": "nginx 1 worker, "
                                "round robin, keepalive 512", "gateway": "cpctl up (one Python process)"}}
    with tempfile.TemporaryDirectory(prefix="cpctl-overload-") as tmp:
        setups = Setups(Path(tmp))
        try:
            log("peak throughput (closed loop, wrk)")
            peak: dict = {}
            for label, work in (("5ms", {"work_ms": 5}), ("0ms", {"work_ms": 0})):
                runs: dict[str, list] = {s: [] for s in SETUPS}
                wrk_peak(setups.urls["gateway"], work, 1, 64, Path(tmp))  # warm-up
                for _ in range(rounds):
                    for setup in SETUPS:
                        runs[setup].append(wrk_peak(setups.urls[setup], work, peak_s, 64, Path(tmp)))
                peak[label] = {s: {"rps": statistics.median(r["rps"] for r in v), "runs": v} for s, v in runs.items()}
                log("  " + label + ": " + ", ".join(f"{s} {peak[label][s]['rps']:.0f}" for s in SETUPS))
            results["peak"] = peak

            log("overhead at ~50% of direct's 5 ms peak (open loop)")
            rate = peak["5ms"]["direct"]["rps"] * 0.5
            single = [Flow(name="standard", weight=1, api_key=API_KEY, deadline_ms=1000, send_deadline=False,
                           body=work_body({"work_ms": 5}))]
            overhead: dict[str, list] = {s: [] for s in SETUPS}
            for _ in range(rounds):
                for setup in SETUPS:
                    overhead[setup].append(open_loop(setups.urls[setup], rate, step_s, single)["all"])
            results["overhead"] = {"rate": round(rate, 1), **{s: median_summary(v) for s, v in overhead.items()}}
            log("  " + ", ".join(f"{s} P50 {results['overhead'][s]['ok_p50_ms']:.2f} ms P99 "
                                 f"{results['overhead'][s]['ok_p99_ms']:.2f} ms" for s in SETUPS))

            log(f"capacity (GPU-like work: {GPU_LIKE}; P99 <= {SLO_MS:g} ms)")
            capacity = {}
            for setup in SETUPS:
                log(f"  {setup}")
                capacity[setup] = find_capacity(setups.urls[setup], mix_flows(setup == "gateway"), log)
            results["capacity"] = capacity
            base = capacity["direct"]["rate"]
            log("  capacity: " + ", ".join(f"{s} {capacity[s]['rate']:.0f}" for s in SETUPS))

            log("overload mix (10% critical / 30% standard / 60% sheddable)")
            overload: dict = {}
            for multiple in (0.5, 1, 2, 3):
                overload[str(multiple)] = {}
                for setup in SETUPS:
                    summary = open_loop(setups.urls[setup], base * multiple, step_s, mix_flows(setup == "gateway"))
                    overload[str(multiple)][setup] = summary
                    log(f"  {multiple}x {setup:8s} " + "  ".join(
                        f"{c} P99 {summary['flows'][c]['ok_p99_ms']:.0f} ms ok {summary['flows'][c]['ok']}"
                        for c in ("critical", "standard", "sheddable") if c in summary["flows"])
                        + f"  5xx {summary['all']['errors_5xx']}  lag P99 {summary['generator_lag_p99_ms']} ms")
            results["overload"] = overload
            results["gateway_memory"] = setups.gateway_memory_mb()

            log("fault: SIGKILL main-0 at 2 s, SIGSTOP main-1 from 5 s to 8 s, under the mix at 1x")
            fault = {}
            for setup in ("gateway", "nginx"):
                setups.wait_all_ready()
                fault[setup] = fault_run(setups, setup, base, 10.0 if not quick else 6.0)
                log(f"  {setup}: " + json.dumps({c: fault[setup]["flows"][c]["statuses"]
                                                  for c in fault[setup]["flows"]}))
            results["fault"] = fault
        finally:
            setups.close()
    results["targets"] = targets(results)
    write_results(results)
    return results


def fault_run(setups: Setups, setup: str, rate: float, seconds: float) -> dict:
    async def faults() -> None:
        await asyncio.sleep(seconds * 0.2)
        os.kill(setups.shard_pid("main-0"), signal.SIGKILL)
        await asyncio.sleep(seconds * 0.3)
        frozen = setups.shard_pid("main-1")
        os.kill(frozen, signal.SIGSTOP)
        await asyncio.sleep(seconds * 0.3)
        os.kill(frozen, signal.SIGCONT)

    async def both():
        scenario = Scenario(rate=rate, duration_s=seconds, flows=mix_flows(setup == "gateway"), timeout_s=10)
        report, _ = await asyncio.gather(run(scenario, setups.urls[setup]), faults())
        return report.summary()

    return uvloop.run(both())


def median_summary(summaries: list[dict]) -> dict:
    keys = ("ok_p50_ms", "ok_p90_ms", "ok_p99_ms", "ok_p999_ms", "goodput_rps")
    merged = {k: statistics.median(s[k] for s in summaries) for k in keys}
    merged["errors_5xx"] = sum(s["errors_5xx"] for s in summaries)
    return merged


def target(name: str, value: float, goal: str, met: bool) -> dict:
    return {"name": name, "value": round(value, 3), "target": goal, "met": bool(met)}


def targets(r: dict) -> list[dict]:
    over, gw = r["overload"], "gateway"
    crit_low = over["0.5"][gw]["flows"]["critical"]["ok_p99_ms"]
    crit_high = over["3"][gw]["flows"]["critical"]["ok_p99_ms"]
    nginx_ratio = (over["3"]["nginx"]["flows"]["critical"]["ok_p99_ms"] /
                   max(over["0.5"]["nginx"]["flows"]["critical"]["ok_p99_ms"], 1e-9))
    capacity = r["capacity"]["direct"]["rate"]
    goodput = over["3"][gw]["all"]["goodput_rps"]
    fault_critical = r["fault"][gw]["flows"]["critical"]
    sheds = [over[m][gw]["all"]["shed_p99_ms"] for m in over if over[m][gw]["all"]["shed"]]
    peak_5, peak_0 = (r["peak"][k][gw]["rps"] / r["peak"][k]["nginx"]["rps"] for k in ("5ms", "0ms"))
    return [
        target("critical P99 at 3x / at 0.5x (gateway)", crit_high / max(crit_low, 1e-9), "<= 1.5",
               crit_high <= 1.5 * crit_low),
        target("critical P99 at 3x / at 0.5x (nginx, for reference)", nginx_ratio, "none", True),
        target("5xx from the gateway in overload", sum(over[m][gw]["all"]["errors_5xx"] for m in over), "== 0",
               all(over[m][gw]["all"]["errors_5xx"] == 0 for m in over)),
        target("goodput at 3x / measured capacity (gateway)", goodput / max(capacity, 1e-9), ">= 0.9",
               goodput >= 0.9 * capacity),
        target("gateway RSS MB (peak)", r["gateway_memory"]["peak_rss_mb"], "< 100",
               r["gateway_memory"]["peak_rss_mb"] < 100),
        target("overhead P50 ms at ~50% load (gateway - direct)",
               r["overhead"][gw]["ok_p50_ms"] - r["overhead"]["direct"]["ok_p50_ms"], "<= 0.5",
               r["overhead"][gw]["ok_p50_ms"] - r["overhead"]["direct"]["ok_p50_ms"] <= 0.5),
        target("overhead P99 ms at ~50% load (gateway - direct)",
               r["overhead"][gw]["ok_p99_ms"] - r["overhead"]["direct"]["ok_p99_ms"], "<= 1.5",
               r["overhead"][gw]["ok_p99_ms"] - r["overhead"]["direct"]["ok_p99_ms"] <= 1.5),
        target("peak throughput gateway / nginx, 5 ms model", peak_5, ">= 0.95", peak_5 >= 0.95),
        target("peak throughput gateway / nginx, 0 ms model", peak_0, ">= 0.9", peak_0 >= 0.9),
        target("shed answered, P99 ms (worst overload step)", max(sheds) if sheds else 0.0, "<= 1",
               (max(sheds) if sheds else 0.0) <= 1.0),
        target("critical requests failed in the fault scenario (gateway)",
               fault_critical["sent"] - fault_critical["ok"], "== 0", fault_critical["sent"] == fault_critical["ok"]),
    ]


def write_results(r: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"overload-{r['date']}"
    (stem.with_suffix(".json")).write_text(json.dumps(r, indent=1))
    (RESULTS / "overload-latest.json").write_text(json.dumps(r, indent=1))
    (stem.with_suffix(".md")).write_text(markdown(r))
    plot(r, stem.with_suffix(".png"))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Overload benchmark, {r['date']}", "",
             f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}. Load generator, gateway, nginx and "
             "both Triton shards share these cores; every number comes from one run, setups alternating.", "",
             "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'NO'} |" for t in r["targets"]]
    lines += ["", "## Peak throughput (closed loop, wrk, 64 connections), req/s", "",
              "| model | direct | nginx | gateway | gateway/nginx |", "|---|---|---|---|---|"]
    for label, row in r["peak"].items():
        lines.append(f"| work {label} | {row['direct']['rps']:.0f} | {row['nginx']['rps']:.0f} | "
                     f"{row['gateway']['rps']:.0f} | {row['gateway']['rps'] / row['nginx']['rps']:.3f} |")
    o = r["overhead"]
    lines += ["", f"## Overhead at {o['rate']:.0f} req/s (~50% of direct's peak), open loop", "",
              "| setup | P50 ms | P90 ms | P99 ms | P99.9 ms |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {o[s]['ok_p50_ms']:.2f} | {o[s]['ok_p90_ms']:.2f} | {o[s]['ok_p99_ms']:.2f} | "
              f"{o[s]['ok_p999_ms']:.2f} |" for s in SETUPS]
    lines += ["", "## Capacity (GPU-like work, P99 under 250 ms), req/s", "",
              " | ".join(f"{s}: {r['capacity'][s]['rate']:.0f}" for s in SETUPS), "",
              "## Overload mix, per class: P99 of 2xx (ms) / goodput (req/s) / shed / 5xx", "",
              "| load | setup | critical | standard | sheddable | sent/s achieved | generator lag P99 ms |",
              "|---|---|---|---|---|---|---|"]
    for multiple, row in r["overload"].items():
        for setup in SETUPS:
            s = row[setup]
            cells = [class_cell(s["flows"].get(c)) for c in ("critical", "standard", "sheddable")]
            lines.append(f"| {multiple}x | {setup} | {' | '.join(cells)} | {s['achieved_rate']:.0f} | "
                         f"{s['generator_lag_p99_ms']}{' (behind)' if s['generator_fell_behind'] else ''} |")
    lines += ["", "## Fault (SIGKILL one shard, SIGSTOP the other for 3 s, mix at 1x): statuses per class", ""]
    for setup, summary in r["fault"].items():
        lines.append(f"- {setup}: " + "; ".join(f"{c} {summary['flows'][c]['statuses']}" for c in summary["flows"]))
    mem = r["gateway_memory"]
    lines += ["", f"Gateway process memory after the overload runs: RSS {mem['rss_mb']} MB, "
              f"peak {mem['peak_rss_mb']} MB.",
              "", "Reproduce: `.venv/bin/cpctl bench suite` (or `.venv/bin/python bench/overload.py`)."]
    return "\n".join(lines) + "\n"


def class_cell(f: dict | None) -> str:
    if f is None:
        return "-"
    return f"{f['ok_p99_ms']:.0f} / {f['goodput_rps']:.0f} / {f['shed']} / {f['errors_5xx']}"


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multiples = [float(m) for m in r["overload"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    styles = {"direct": ":", "nginx": "--", "gateway": "-"}
    colours = {"critical": "tab:red", "standard": "tab:blue", "sheddable": "tab:gray"}
    for setup in SETUPS:
        for cls in ("critical", "standard", "sheddable"):
            p99 = [r["overload"][m][setup]["flows"][cls]["ok_p99_ms"] for m in r["overload"]]
            axes[0].plot(multiples, p99, styles[setup], color=colours[cls], marker="o", label=f"{setup} {cls}")
        goodput = [r["overload"][m][setup]["all"]["goodput_rps"] for m in r["overload"]]
        axes[1].plot(multiples, goodput, styles[setup], marker="o", label=setup)
        crit_good = [r["overload"][m][setup]["flows"]["critical"]["goodput_rps"] for m in r["overload"]]
        axes[2].plot(multiples, crit_good, styles[setup], marker="o", label=setup)
    axes[0].set(title="P99 of 2xx by class (ms, log)", xlabel="offered load / capacity", yscale="log")
    axes[1].set(title="goodput, all classes (req/s)", xlabel="offered load / capacity")
    axes[2].set(title="critical goodput (req/s)", xlabel="offered load / capacity")
    axes[0].legend(fontsize=6, ncol=3)
    axes[1].legend()
    axes[2].legend()
    fig.suptitle(f"Overload: gateway vs nginx vs Triton direct ({r['date']}, {r['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
