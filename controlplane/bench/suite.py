"""The overload benchmark: our gateway vs nginx vs Triton direct, side by side in one run.

Starts the stack of bench/overload.yaml (`cpctl up`: two real Triton shards behind the gateway) and nginx
(Debian package, one worker, round robin with upstream keepalive) in front of the same shards, then runs,
alternating between setups:
1. peak: closed-loop wrk, `work` at 5 ms and at 0 ms a batch (throughput ceiling of each setup);
2. overhead: open loop at half of direct's 5 ms peak, one class;
3. capacity: the highest open-loop rate each setup serves with P99 under the SLO, on the GPU-like workload
   (10 ms a batch + 4 ms a row);
4. overload: the class mix (10% critical, 30% standard, 60% sheddable) at 0.5x, 1x, 2x, 3x of direct's capacity;
5. fault: the mix at 1x while one shard is SIGKILLed and another SIGSTOPped for 3 s;
6. flood (gateway-bound overload): the cheap model (5 ms and 0 ms a batch: the shards are not the bottleneck),
   256 closed-loop wrk connections of the lowest class that ignore Retry-After, and critical traffic open loop
   at 100 req/s (Poisson): critical P50/P99 with the flood against critical alone, alternating, per setup;
   the flood's statuses; gateway memory per process;
7. cpu: gateway CPU (utime + stime from /proc) per request, admitted (0 ms model, wrk peak) and refused at
   admission (a tenant of 1 req/s flooded: every request is a 429).
Groups of scenarios run alone with `only` (`cpctl bench suite --only flood,cpu`): "overload" (1-5), "flood",
"cpu". Writes bench/results/<name>-<date>.{json,md} (name: overload for the whole suite, which also writes
overload-latest.json and a plot; else the groups run, e.g. flood-cpu), with `targets`.
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
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import uvloop

from controlplane.bench import procstat
from controlplane.bench.loadgen import Flow, Sample, Scenario, ms, run, summarize
from controlplane.bench.wrk import WrkResult, WrkRun
from controlplane.bench.wrk import script as wrk_script
from controlplane.procs import ManagedProcess, free_port, group_members
from controlplane.resources import project_file

SPEC = "bench/overload.yaml"  # a project file (controlplane/resources.py): its models are ../examples/models
API_KEY = "cp-bench-key"
REFUSED_KEY = "cp-bench-refused-key"  # the `refused` tenant: 1 req/s, burst 1
GPU_LIKE = {"work_ms": 10, "per_item_ms": 4}
MIX_CAPACITY = 800.0  # req/s: direct's capacity of the mix as the suite measures it here (for the diagnostics)
SLO_MS = 250.0  # the critical class's deadline
MIX = (("critical", 0.1, 250), ("standard", 0.3, 1000), ("sheddable", 0.6, 2000))
SETUPS = ("direct", "nginx", "gateway")
GROUPS = ("overload", "flood", "cpu")
FLOOD_SETUPS = ("gateway", "nginx", "direct")
FLOOD_CONNECTIONS = 256
FLOOD_LEAD_S = 0.5  # the flood starts this long before the critical traffic beside it
SLOWEST_KEPT = 15  # the slowest critical requests beside the gateway's flood kept, to locate a burst (P99 is the 10th)
CRITICAL_RATE = 100.0
FLOOD_MODELS = (("5ms", 5), ("0ms", 0))


def work_body(parameters: dict) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
            "parameters": parameters}


def mix_flows(send_deadline: bool) -> list[Flow]:
    return [Flow(name=name, weight=weight, priority=name, api_key=API_KEY, deadline_ms=deadline,
                 send_deadline=send_deadline, body=work_body(GPU_LIKE)) for name, weight, deadline in MIX]


def metrics_text(url: str) -> str | None:
    """A Prometheus text exposition, or None when its server does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def metric_sum(text: str, name: str) -> float:
    """The sum of a metric's samples over all its label sets (or its one sample, unlabelled)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([\d.e+-]+)$", text, re.M))


def metric_total(text: str, name: str) -> int:
    """The same, of a count."""
    return int(metric_sum(text, name))


class Setups:
    """The running stack, nginx, and the URL of each setup."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        env = {**os.environ, "CPCTL_RUN_DIR": str(workdir / "run")}
        spec = project_file(SPEC)
        self.stack = ManagedProcess([sys.executable, "-m", "controlplane.cli", "up", "-f", str(spec)], env=env,
                                    log_path=workdir / "cpctl.log", cwd=workdir)
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
        self.nginx_port, refusal_port = free_port(), free_port()
        self.nginx = start_nginx(workdir, self.nginx_port, [s["url"] for s in self.shards.values()],
                                 refusal_port=refusal_port)
        self.urls = {"direct": [s["url"] for s in self.shards.values()],
                     "nginx": [f"http://127.0.0.1:{self.nginx_port}"], "gateway": [state["gateway"]],
                     "nginx_429": [f"http://127.0.0.1:{refusal_port}"]}
        self.memory_at_start = self.gateway_memory_mb()["processes"]  # before any traffic

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

    def gateway_pids(self) -> list[int]:
        """The gateway's processes (state.json's pid, plus its workers when there are several)."""
        return procstat.gateway_pids(json.loads(self.state_file.read_text()))

    def overload_actions(self) -> int:
        """The gateway's overload actions so far (refusals, holds, releases: cp_overload_actions_total)."""
        return metric_total(metrics_text(f"{self.urls['gateway'][0]}/metrics") or "", "cp_overload_actions_total")

    def gateway_backlog(self) -> tuple[int, int] | None:
        """Requests queued in the gateway and in flight to shards (its /metrics); None when it does not answer."""
        text = metrics_text(f"{self.urls['gateway'][0]}/metrics")
        if text is None:
            return None
        return metric_total(text, "cp_queue_depth"), metric_total(text, "cp_shard_in_flight")

    def wait_gateway_idle(self, timeout_s: float = 10.0, stuck_s: float = 1.0) -> dict:
        """Wait until the gateway has nothing queued or in flight (a flood leaves requests of clients that are
        gone), or until that backlog has not changed for `stuck_s` (stuck: e.g. leaked in-flight slots)."""
        started = time.monotonic()
        last, since = None, started
        while True:
            now = time.monotonic()
            backlog = self.gateway_backlog()
            if backlog == (0, 0) or now - started > timeout_s or (backlog == last and now - since > stuck_s):
                break
            if backlog != last:
                last, since = backlog, now
            time.sleep(0.05)
        queued, in_flight = backlog if backlog is not None else (-1, -1)
        return {"waited_s": round(time.monotonic() - started, 2), "queued": queued, "in_flight": in_flight}

    def wait_overload_calm(self, timeout_s: float = 15.0) -> float:
        """Wait until the gateway's overload level is 0 (it is left only after `cool_down_s` calm), so a cell does
        not start under the last one's overload; the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            text = metrics_text(f"{self.urls['gateway'][0]}/metrics")
            if text is not None and metric_sum(text, "cp_overload_level") == 0:
                break
            time.sleep(0.1)
        return round(time.monotonic() - started, 2)

    def shard_counts(self) -> tuple[int, int] | None:
        """(requests waiting in the shards' own queues, inferences done) summed over the shards, from Triton's
        metrics; None while a shard does not answer (or has no metrics URL while restarting)."""
        pending = done = 0
        for shard in json.loads(self.state_file.read_text())["shards"]:
            text = metrics_text(shard["metrics_url"]) if shard.get("metrics_url") else None
            if text is None:
                return None
            pending += metric_total(text, "nv_inference_pending_request_count")
            done += metric_total(text, "nv_inference_count")
        return pending, done

    def wait_shards_idle(self, timeout_s: float = 30.0) -> float:
        """Wait until the shards have nothing queued or executing (nothing done for 0.2 s); seconds waited. A setup
        that overloads them without shedding (nginx, direct at 3x) leaves thousands of requests in Triton's queue
        whose clients are gone; measured next, a setup would pay for them."""
        started = time.monotonic()
        last = None
        while time.monotonic() - started < timeout_s:
            counts = self.shard_counts()
            if counts is not None and counts[0] == 0 and counts == last:
                break
            last = counts
            time.sleep(0.2)
        return round(time.monotonic() - started, 2)

    def nginx_pids(self) -> list[int]:
        return group_members(self.nginx.pgid)

    def proxy_pids(self, setup: str) -> list[int]:
        """The processes of a setup's proxy: the gateway's or nginx's; none for Triton direct."""
        return {"gateway": self.gateway_pids, "nginx": self.nginx_pids}.get(setup, list)()

    def gateway_memory_mb(self) -> dict:
        """RSS now and at peak of the largest gateway process, and of each."""
        processes = {str(pid): procstat.memory_mb(pid) for pid in self.gateway_pids()}
        return {"rss_mb": max(p["rss_mb"] for p in processes.values()),
                "peak_rss_mb": max(p["peak_rss_mb"] for p in processes.values()), "processes": processes}

    def log_lines(self) -> list[str]:
        """Every line of the stack's logs: cpctl's, then each gateway worker's and shard's."""
        logs = [self.stack.log_tail(10_000_000)] + [
            path.read_text(errors="replace") for path in sorted((self.workdir / "run").glob("*/logs/*.log"))]
        return [line for text in logs for line in text.splitlines()]

    def log_errors(self, limit: int = 20) -> list[str]:
        """The first lines of the stack's logs that report an error (ERROR, Traceback), with their count."""
        lines = [line for line in self.log_lines() if "ERROR" in line or "Traceback" in line]
        return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])

    def close(self, grace_s: float = 15.0) -> bool:
        """Stop nginx and the stack (SIGINT, then the process group); False when the stack ignored SIGINT."""
        self.nginx.stop(grace_s=2)
        self.stack.popen.send_signal(signal.SIGINT)
        try:
            self.stack.popen.wait(timeout=grace_s)
            return True
        except subprocess.TimeoutExpired:
            return False
        finally:
            self.stack.stop(grace_s=2)


# What nginx answers on its refusal port: a 429 like the gateway's over-rate one (JSON body, Retry-After).
NGINX_REFUSAL = """
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    default_type application/json;
    location / {{
      add_header retry-after 1 always;
      return 429 '{{"error":"tenant \\'refused\\' is over its rate of 1 requests/s","reason":"rate"}}';
    }}
  }}"""


def start_nginx(workdir: Path, port: int, upstreams: list[str], workers: int = 1, refusal_port: int | None = None
                ) -> ManagedProcess:
    """nginx as a user would put it in front of Triton: round robin, upstream keepalive, `workers` workers. With
    `refusal_port`, it also answers every request there with `return 429`: the floor of a refusal's cost."""
    servers = "\n".join(f"    server {url.removeprefix('http://')};" for url in upstreams)
    return run_nginx(workdir, workers, f"""
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
  }}{NGINX_REFUSAL.format(port=refusal_port) if refusal_port else ""}""", port)


def run_nginx(workdir: Path, workers: int, http_blocks: str, probe_port: int) -> ManagedProcess:
    """nginx with `workers` workers serving `http_blocks` (upstreams and servers of its http block), files under
    `workdir`; returns once GET /v2/health/ready on `probe_port` answers."""
    if shutil.which("nginx") is None:
        raise RuntimeError("nginx is needed: apt-get install nginx-light (make test installs it as root)")
    conf = workdir / "nginx.conf"
    conf.write_text(f"""worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/nginx-body;
  proxy_temp_path {workdir}/nginx-proxy;
  fastcgi_temp_path {workdir}/nginx-fastcgi;
  uwsgi_temp_path {workdir}/nginx-uwsgi;
  scgi_temp_path {workdir}/nginx-scgi;
  client_max_body_size 8m;{http_blocks}
}}
""")
    process = ManagedProcess(["nginx", "-e", str(workdir / "nginx-error.log"), "-c", str(conf), "-p", str(workdir),
                              "-g", "daemon off;"],
                             log_path=workdir / "nginx.log")
    wait_serving(process, f"http://127.0.0.1:{probe_port}", 10, "nginx")
    return process


def wait_serving(process: ManagedProcess, url: str, timeout_s: float, what: str) -> None:
    """Return once GET `url`/v2/health/ready answers 200; stop `process` and raise if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1).close()
            return
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"{what} did not start: {process.log_tail(1500)}")


def wrk_peak(urls: list[str], work: dict, seconds: int, connections: int, workdir: Path, threads: int = 1) -> dict:
    """Closed-loop peak throughput; one wrk per URL at once (direct), results summed."""
    lua = wrk_script(workdir / f"wrk-{abs(hash(json.dumps(work)))}.lua", json.dumps(work_body(work)),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}, count_statuses=False)
    result = WrkRun(urls, "/v2/models/work/infer", lua, seconds, connections, threads=threads * len(urls)).wait()
    return {"rps": round(result.rps, 1), "non_2xx": result.non_2xx}


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


def run_suite(quick: bool = False, log: Callable[[str], None] = print, only: Sequence[str] | None = None,
              results_dir: Path = Path("bench/results")) -> dict:
    """Run every scenario (or the groups in `only`); return the results (also written to `results_dir`)."""
    groups = [g for g in GROUPS if only is None or g in only]
    unknown = sorted(set(only or ()) - set(GROUPS))
    if unknown or not groups:
        raise RuntimeError(f"unknown scenario group(s) {unknown}; choose from {', '.join(GROUPS)}")
    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine(), "quick": quick,
                     "groups": groups,
                     "setups": {"direct": "client round robin over the 2 shards", "nginx": "nginx 1 worker, "
                                "round robin, keepalive 512", "gateway": "cpctl up (one Python process)"}}
    with tempfile.TemporaryDirectory(prefix="cpctl-overload-") as tmp:
        setups = Setups(Path(tmp))
        try:
            # cpu first (a fresh gateway), then flood; overload last: its fault scenario kills a shard
            if "cpu" in groups:
                log("cpu per request (gateway processes' utime + stime, wrk, 64 connections, 0 ms model)")
                setups.wait_all_ready()
                results["cpu"] = cpu_scenario(setups, Path(tmp), quick, log)
            if "flood" in groups:
                log(f"flood: {FLOOD_CONNECTIONS} wrk connections of sheddable (ignoring Retry-After) + critical "
                    f"open loop at {CRITICAL_RATE:g} req/s, vs critical alone")
                setups.wait_all_ready()
                results["flood"] = flood_scenario(setups, Path(tmp), quick, log)
            if "overload" in groups:
                setups.wait_all_ready()
                overload_scenarios(setups, Path(tmp), quick, log, results)
        finally:
            results["stack_stopped_on_sigint"] = setups.close()
            if not results["stack_stopped_on_sigint"]:
                log("warning: the stack did not stop within 15 s of SIGINT (killed)")
            results["stack_log_errors"] = setups.log_errors()
            for line in results["stack_log_errors"][:5]:
                log(f"  stack log: {line}")
    results["targets"] = targets(results)
    write_results(results, results_dir)
    return results


def overload_scenarios(setups: Setups, tmp: Path, quick: bool, log: Callable[[str], None], results: dict) -> None:
    """Scenarios 1-5 (peak, overhead, capacity, overload, fault), in that order: each sizes the next."""
    rounds, peak_s, step_s = (1, 2, 2.0) if quick else (2, 4, 6.0)
    log("peak throughput (closed loop, wrk)")
    peak: dict = {}
    for label, work in (("5ms", {"work_ms": 5}), ("0ms", {"work_ms": 0})):
        runs: dict[str, list] = {s: [] for s in SETUPS}
        wrk_peak(setups.urls["gateway"], work, 1, 64, tmp)  # warm-up
        for _ in range(rounds):
            for setup in SETUPS:
                runs[setup].append(wrk_peak(setups.urls[setup], work, peak_s, 64, tmp))
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
            drained_s = setups.wait_shards_idle()  # what the previous setup left in Triton's queues
            actions = setups.overload_actions()
            summary = open_loop(setups.urls[setup], base * multiple, step_s, mix_flows(setup == "gateway"))
            overload[str(multiple)][setup] = {**summary, "shards_drained_before_s": drained_s}
            if setup == "gateway":  # the shards are the bottleneck here: the gateway's own overload should not act
                overload[str(multiple)][setup]["overload_actions"] = setups.overload_actions() - actions
            log(f"  {multiple}x {setup:8s} " + "  ".join(
                f"{c} P99 {summary['flows'][c]['ok_p99_ms']:.0f} ms ok {summary['flows'][c]['ok']}"
                for c in ("critical", "standard", "sheddable") if c in summary["flows"])
                + f"  5xx {summary['all']['errors_5xx']}  lag P99 {summary['generator_lag_p99_ms']} ms")
    results["overload"] = overload
    # The floor of a shed's latency as this generator measures it (from the intended send time, its own lag
    # included): nginx answering every request `return 429`, at the top step's rate.
    floor = open_loop(setups.urls["nginx_429"], base * 3, step_s, mix_flows(True))
    results["shed_floor"] = {"shed_p99_ms": floor["all"]["shed_p99_ms"],
                             "generator_lag_p99_ms": floor["generator_lag_p99_ms"]}
    log(f"  3x nginx `return 429`: P99 {floor['all']['shed_p99_ms']} ms, lag P99 {floor['generator_lag_p99_ms']} ms")
    results["gateway_memory"] = setups.gateway_memory_mb()

    log("fault: SIGKILL main-0 at 2 s, SIGSTOP main-1 from 5 s to 8 s, under the mix at 1x")
    fault = {}
    for setup in ("gateway", "nginx"):
        setups.wait_all_ready()
        actions = setups.overload_actions()
        fault[setup] = fault_run(setups, setup, base, 10.0 if not quick else 6.0)
        if setup == "gateway":
            fault[setup]["overload_actions"] = setups.overload_actions() - actions
        log(f"  {setup}: " + json.dumps({c: fault[setup]["flows"][c]["statuses"]
                                          for c in fault[setup]["flows"]}))
    results["fault"] = fault


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
        # when the lost critical requests were sent (s into the run), to tell the kill from the freeze
        lost = [s for s in report.samples if s.flow == "critical" and not 200 <= s.status < 300]
        return {**report.summary(), "critical_lost_sent_s": sorted(round(s.sent_s, 2) for s in lost)}

    return uvloop.run(both())


def critical_flow(work_ms: float, setup: str) -> list[Flow]:
    return [Flow(name="critical", weight=1, priority="critical", api_key=API_KEY, deadline_ms=250,
                 send_deadline=setup.startswith("gateway"), body=work_body({"work_ms": work_ms}))]


class MemorySampler:
    """Samples the RSS of some processes every `every_s` while running (a thread); keeps the largest."""

    def __init__(self, pids: list[int], every_s: float = 0.2) -> None:
        self.pids, self.every_s = pids, every_s
        self.max_rss: dict[str, float] = {str(p): 0.0 for p in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                try:
                    rss = procstat.memory_mb(pid)["rss_mb"]
                except OSError:
                    continue
                self.max_rss[str(pid)] = max(self.max_rss[str(pid)], rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def critical_run(setups: Setups, setup: str, work_ms: float, seconds: float, flood_lua: Path | None
                 ) -> tuple[list[Sample], dict, WrkResult | None]:
    """Critical traffic open loop at CRITICAL_RATE for `seconds`, alone or under a wrk flood of the lowest class
    (started 0.5 s before, ending ~1 s after). Returns the critical samples, the run's summary, the flood."""
    flood = None
    if flood_lua is not None:
        flood = WrkRun(setups.urls[setup], "/v2/models/work/infer", flood_lua, seconds + 1.5, FLOOD_CONNECTIONS,
                       threads=2)
        time.sleep(FLOOD_LEAD_S)
    try:
        scenario = Scenario(rate=CRITICAL_RATE, duration_s=seconds, flows=critical_flow(work_ms, setup),
                            arrivals="poisson", timeout_s=10, seed=int(time.monotonic() * 1000) % 100_000)
        report = uvloop.run(run(scenario, setups.urls[setup]))
    finally:
        result = flood.wait() if flood is not None else None
    return report.samples, report.summary(), result


def flood_scenario(setups: Setups, workdir: Path, quick: bool, log: Callable[[str], None]) -> dict:
    """Gateway-bound overload: critical P50/P99 with a flood of the lowest class vs alone, per setup."""
    rounds, step_s = (1, 1.5) if quick else (2, 5.0)
    out: dict = {"connections": FLOOD_CONNECTIONS, "critical_rate": CRITICAL_RATE, "step_s": step_s,
                 "rounds": rounds, "models": {}}
    gateway_pids = setups.gateway_pids()
    peak_rss: dict[str, float] = {str(p): 0.0 for p in gateway_pids}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", "x-priority": "sheddable"}
    for setup in FLOOD_SETUPS:  # warm-up: connections, shard batching, the gateway's limiters; not counted
        critical_run(setups, setup, 5, 1.0, None)
    for label, work_ms in FLOOD_MODELS:
        lua = wrk_script(workdir / f"flood-{label}.lua", json.dumps(work_body({"work_ms": work_ms})), headers,
                         count_statuses=True)
        samples: dict[str, dict[str, list[Sample]]] = {s: {"alone": [], "flood": []} for s in FLOOD_SETUPS}
        lags: dict[str, dict[str, list[float]]] = {s: {"alone": [], "flood": []} for s in FLOOD_SETUPS}
        floods: dict[str, WrkResult] = {s: WrkResult() for s in FLOOD_SETUPS}
        drains: dict[str, list[dict]] = {s: [] for s in FLOOD_SETUPS}  # the gateway's backlog after each flood
        slowest: list[dict] = []  # the gateway's slowest critical requests beside the flood, and when they were sent
        for index in range(rounds):
            for setup in FLOOD_SETUPS:
                order = ("alone", "flood") if index % 2 == 0 else ("flood", "alone")
                for mode in order:
                    setups.wait_gateway_idle()
                    if mode == "alone":
                        got, summary, _ = critical_run(setups, setup, work_ms, step_s, None)
                    elif setup == "gateway":
                        with MemorySampler(gateway_pids) as sampler:
                            got, summary, flood = critical_run(setups, setup, work_ms, step_s, lua)
                        for pid, rss in sampler.max_rss.items():
                            peak_rss[pid] = max(peak_rss.get(pid, 0.0), rss)
                    else:
                        got, summary, flood = critical_run(setups, setup, work_ms, step_s, lua)
                    samples[setup][mode] += got
                    lags[setup][mode].append(summary["generator_lag_p99_ms"])
                    if mode == "flood":
                        floods[setup].add(flood)
                        if setup == "gateway":
                            slowest += [{"round": index, "flood_first": order[0] == "flood",
                                         "since_flood_start_s": round(s.sent_s + FLOOD_LEAD_S, 3),
                                         "ms": ms(s.latency_s), "generator_lag_ms": ms(s.lag_s), "status": s.status}
                                        for s in got]
                            slowest = sorted(slowest, key=lambda s: -s["ms"])[:SLOWEST_KEPT]
                        drains[setup].append(setups.wait_gateway_idle())  # the gateway's, after any setup's
        row = {}
        for setup in FLOOD_SETUPS:
            alone = summarize(samples[setup]["alone"], step_s * rounds)
            flooded = summarize(samples[setup]["flood"], step_s * rounds)
            row[setup] = {"alone": alone, "flood": flooded,
                          "p99_ratio": ratio(flooded["ok_p99_ms"], alone["ok_p99_ms"], flooded["ok"] and alone["ok"]),
                          "p50_ratio": ratio(flooded["ok_p50_ms"], alone["ok_p50_ms"], flooded["ok"] and alone["ok"]),
                          "generator_lag_p99_ms": {m: max(v) for m, v in lags[setup].items()},
                          "flood_traffic": floods[setup].as_dict(),
                          "gateway_after_flood": max(drains[setup], key=lambda d: (d["in_flight"], d["waited_s"]))}
            if setup == "gateway":
                row[setup]["slowest_critical"] = slowest
            log(f"  {label} {setup:8s} critical P50/P99 alone {alone['ok_p50_ms']:.2f}/{alone['ok_p99_ms']:.2f} ms, "
                f"flood {flooded['ok_p50_ms']:.2f}/{flooded['ok_p99_ms']:.2f} ms (x{row[setup]['p99_ratio']}); "
                f"critical {flooded['statuses']}; flood {floods[setup].rps:.0f} req/s "
                f"{floods[setup].statuses} {floods[setup].socket_errors or ''}; gateway after: "
                f"{row[setup]['gateway_after_flood']}")
        out["models"][label] = row
    memory = setups.gateway_memory_mb()
    out["gateway_memory"] = {pid: {"rss_mb_at_start": setups.memory_at_start.get(pid, {}).get("rss_mb"),
                                   "max_rss_mb_during_flood": peak_rss.get(pid, 0.0), **memory["processes"][pid]}
                             for pid in memory["processes"]}
    log(f"  gateway memory per process: {out['gateway_memory']}")
    return out


def ratio(value: float, base: float, defined: bool | int = True) -> float | None:
    """value / base, rounded; None when undefined (e.g. no request was answered 2xx, so no percentile)."""
    return round(value / max(base, 1e-9), 3) if defined else None


def cpu_scenario(setups: Setups, workdir: Path, quick: bool, log: Callable[[str], None]) -> dict:
    """CPU (utime + stime) per request of the gateway's processes: admitted (proxied, 0 ms model) and refused at
    admission (the `refused` tenant: 1 req/s); nginx's per proxied request and per `return 429` (the floor of
    a refusal on this machine: a read and a write in C) for reference. Alternating."""
    rounds, seconds = (1, 2) if quick else (2, 5)
    body = json.dumps(work_body({"work_ms": 0}))
    kinds = {
        "admitted": ("gateway", {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}),
        "refused": ("gateway", {"Content-Type": "application/json", "Authorization": f"Bearer {REFUSED_KEY}"}),
        "nginx": ("nginx", {"Content-Type": "application/json"}),
        "nginx_429": ("nginx_429", {"Content-Type": "application/json"}),
    }
    totals = {k: {"cpu_s": 0.0, "kernel_s": 0.0, "requests": 0, "traffic": WrkResult()} for k in kinds}
    wrk_peak(setups.urls["gateway"], {"work_ms": 0}, 1, 64, workdir)  # warm-up
    for _ in range(rounds):
        for kind, (setup, headers) in kinds.items():
            lua = wrk_script(workdir / f"cpu-{kind}.lua", body, headers, count_statuses=True)
            pids = setups.gateway_pids() if setup == "gateway" else setups.nginx_pids()
            setups.wait_gateway_idle()
            if setup == "gateway":
                # the admitted cell leaves the gateway overloaded for `cool_down_s`, with a higher class seen: the
                # refused cell would then measure the overload manager holding its connections, not refusals
                setups.wait_overload_calm()
            before, kernel_before = procstat.total_cpu_seconds(pids), procstat.kernel_cpu_seconds(pids)
            result = WrkRun(setups.urls[setup], "/v2/models/work/infer", lua, seconds, 64, threads=2).wait()
            totals[kind]["cpu_s"] += procstat.total_cpu_seconds(pids) - before
            totals[kind]["kernel_s"] += procstat.kernel_cpu_seconds(pids) - kernel_before
            totals[kind]["requests"] += sum(result.statuses.values())
            totals[kind]["traffic"].add(result)
    out: dict = {"seconds": seconds, "rounds": rounds, "connections": 64}
    for kind, t in totals.items():
        out[kind] = {"cpu_s": round(t["cpu_s"], 3), "requests": t["requests"],
                     "us_per_request": round(t["cpu_s"] / max(t["requests"], 1) * 1e6, 2),
                     "kernel_us_per_request": round(t["kernel_s"] / max(t["requests"], 1) * 1e6, 2),
                     "statuses": dict(sorted(t["traffic"].statuses.items())),
                     "rps": round(t["traffic"].rps / rounds, 1), "socket_errors": t["traffic"].socket_errors}
        log(f"  {kind:8s}: {out[kind]['us_per_request']:.1f} us CPU a request ({out[kind]['requests']} requests, "
            f"{out[kind]['cpu_s']:.2f} s CPU, statuses {out[kind]['statuses']})")
    out["refused_over_admitted"] = round(out["refused"]["us_per_request"] /
                                         max(out["admitted"]["us_per_request"], 1e-9), 3)
    out["refused_over_nginx_429"] = round(out["refused"]["us_per_request"] /
                                          max(out["nginx_429"]["us_per_request"], 1e-9), 3)
    return out


def median_summary(summaries: list[dict]) -> dict:
    keys = ("ok_p50_ms", "ok_p90_ms", "ok_p99_ms", "ok_p999_ms", "goodput_rps")
    merged = {k: statistics.median(s[k] for s in summaries) for k in keys}
    merged["errors_5xx"] = sum(s["errors_5xx"] for s in summaries)
    return merged


def target(name: str, value: float | None, goal: str, met: bool) -> dict:
    return {"name": name, "value": None if value is None else round(value, 3), "target": goal, "met": bool(met)}


def targets(r: dict) -> list[dict]:
    found = []
    if "overload" in r:
        found += overload_targets(r)
    if "flood" in r:
        found += flood_targets(r["flood"])
    if "cpu" in r:
        found += cpu_targets(r["cpu"])
    return found


def flood_targets(f: dict) -> list[dict]:
    found = []
    for label, row in f["models"].items():
        gw = row["gateway"]
        found.append(target(f"critical P99 with flood / alone (gateway, {label} model)", gw["p99_ratio"], "<= 1.5",
                            gw["p99_ratio"] is not None and gw["p99_ratio"] <= 1.5))
        failed = gw["flood"]["sent"] - gw["flood"]["ok"]
        found.append(target(f"critical requests not answered 2xx under the flood (gateway, {label} model)", failed,
                            "== 0", failed == 0))
        for peer in ("nginx", "direct"):
            found.append(target(f"critical P99 with flood / alone ({peer}, {label} model, for reference)",
                                row[peer]["p99_ratio"], "none", True))
    errors = sum(row["gateway"][mode]["errors_5xx"] for row in f["models"].values() for mode in ("alone", "flood"))
    errors += sum(n for row in f["models"].values() for code, n in row["gateway"]["flood_traffic"]["statuses"].items()
                  if code.startswith("5"))
    found.append(target("5xx from the gateway in the flood scenario (critical and flood)", errors, "== 0", errors == 0))
    other = unanswered = 0
    for row in f["models"].values():
        traffic = row["gateway"]["flood_traffic"]
        other += sum(n for code, n in traffic["statuses"].items() if code not in ("200", "429"))
        unanswered += sum(traffic["socket_errors"].values())
    found.append(target("flood answers with a status other than 200/429 (gateway)", other, "== 0", other == 0))
    found.append(target("flood requests with no answer: wrk socket errors, timeout 2 s (gateway)", unanswered,
                        "== 0", unanswered == 0))
    left = max(row["gateway"]["gateway_after_flood"]["in_flight"] for row in f["models"].values())
    found.append(target("requests the gateway still counts in flight after its flood ended and drained", left,
                        "== 0", left == 0))
    worst = max(max(m["max_rss_mb_during_flood"], m["peak_rss_mb"]) for m in f["gateway_memory"].values())
    found.append(target("gateway RSS MB per process (largest, during the flood)", worst, "< 100", worst < 100))
    return found


def cpu_targets(c: dict) -> list[dict]:
    def share(kind: str, code: str) -> float:
        return c[kind]["statuses"].get(code, 0) / max(c[kind]["requests"], 1)

    # a measurement counts only when its requests got the answer it is about (>= 99% 200, or 429)
    admitted, valid = c["admitted"]["us_per_request"], share("admitted", "200") >= 0.99
    refused_valid = valid and share("refused", "429") >= 0.99
    return [
        target("gateway CPU us per admitted request (0 ms model, wrk peak; >= 99% answered 200)", admitted, "<= 50",
               valid and admitted <= 50),
        target("gateway CPU per refused / per admitted request (>= 99% of the refused answered 429)",
               c["refused_over_admitted"], "<= 0.1", refused_valid and c["refused_over_admitted"] <= 0.1),
        target("nginx CPU us per proxied request (for reference)", c["nginx"]["us_per_request"], "none", True),
        target("nginx CPU us per `return 429` (the floor of a refusal here, for reference)",
               c["nginx_429"]["us_per_request"], "none", True),
        target("gateway CPU per refused request / nginx's per `return 429` (for reference)",
               c["refused_over_nginx_429"], "none", True),
        # what the socket's read and write cost in the kernel alone, whatever runs above them
        target("gateway kernel CPU per refused request / all CPU per admitted one (for reference)",
               c["refused"]["kernel_us_per_request"] / max(admitted, 1e-9), "none", True),
    ]


def overload_targets(r: dict) -> list[dict]:
    over, gw = r["overload"], "gateway"
    crit_low = over["0.5"][gw]["flows"]["critical"]["ok_p99_ms"]
    crit_high = over["3"][gw]["flows"]["critical"]["ok_p99_ms"]
    nginx_ratio = (over["3"]["nginx"]["flows"]["critical"]["ok_p99_ms"] /
                   max(over["0.5"]["nginx"]["flows"]["critical"]["ok_p99_ms"], 1e-9))
    capacity = r["capacity"]["direct"]["rate"]
    goodput = over["3"][gw]["all"]["goodput_rps"]
    fault_critical = r["fault"][gw]["flows"]["critical"]
    # (runs before the suite counted them have none recorded)
    actions = sum(over[m][gw].get("overload_actions", 0) for m in over) + r["fault"][gw].get("overload_actions", 0)
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
        *([target("nginx `return 429` at the 3x rate, P99 ms (this generator's floor for a shed, for reference)",
                  r["shed_floor"]["shed_p99_ms"], "none", True)] if "shed_floor" in r else []),
        target("gateway overload actions in the shard-bound mix and the fault run (the shards are the bottleneck)",
               actions, "== 0", actions == 0),
        target("critical requests failed in the fault scenario (gateway)",
               fault_critical["sent"] - fault_critical["ok"], "== 0", fault_critical["sent"] == fault_critical["ok"]),
    ]


def write_results(r: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    name = "overload" if "overload" in r["groups"] else "-".join(r["groups"])
    stem = directory / f"{name}-{r['date']}"
    (stem.with_suffix(".json")).write_text(json.dumps(r, indent=1))
    (stem.with_suffix(".md")).write_text(markdown(r))
    if "overload" in r["groups"]:
        (directory / "overload-latest.json").write_text(json.dumps(r, indent=1))
        plot(r, stem.with_suffix(".png"))


def markdown(r: dict) -> str:
    m = r["machine"]
    title = "Overload benchmark" if "overload" in r["groups"] else f"Benchmark ({', '.join(r['groups'])})"
    lines = [f"# {title}, {r['date']}{' (quick)' if r['quick'] else ''}", "",
             f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}. Load generator, gateway, nginx and "
             "both Triton shards share these cores; every number comes from one run, setups alternating.", "",
             "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'NO'} |" for t in r["targets"]]
    if "flood" in r:
        lines += flood_markdown(r["flood"])
    if "cpu" in r:
        lines += cpu_markdown(r["cpu"])
    if "overload" in r:
        lines += overload_markdown(r)
    lines += ["", "Reproduce: `.venv/bin/cpctl bench suite` (or `.venv/bin/python bench/overload.py`); one group: "
              "`.venv/bin/cpctl bench suite --only flood,cpu` (or `.venv/bin/python bench/flood.py`)."]
    return "\n".join(lines) + "\n"


def flood_markdown(f: dict) -> list[str]:
    lines = ["", f"## Flood: {f['connections']} closed-loop wrk connections of `sheddable` (Retry-After ignored) "
             f"+ critical open loop at {f['critical_rate']:g} req/s (Poisson)", "",
             f"{f['rounds']} round(s) of {f['step_s']:g} s per cell, alone and with the flood alternating per setup; "
             "critical percentiles over the pooled samples of 2xx.", "",
             "| model | setup | critical alone P50 / P99 ms | with flood P50 / P99 ms | P99 ratio | critical statuses "
             "(flood) | flood req/s | flood statuses | flood socket errors | gateway after the flood |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, row in f["models"].items():
        for setup, c in row.items():
            a, w, t = c["alone"], c["flood"], c["flood_traffic"]
            lines.append(f"| work {label} | {setup} | {a['ok_p50_ms']:.2f} / {a['ok_p99_ms']:.2f} | "
                         f"{w['ok_p50_ms']:.2f} / {w['ok_p99_ms']:.2f} | {c['p99_ratio']} | {w['statuses']} | "
                         f"{t['rps']:.0f} | {t['statuses']} | {t['socket_errors'] or '-'} | "
                         f"{c['gateway_after_flood']} |")
    for label, row in f["models"].items():
        slowest = row["gateway"].get("slowest_critical")
        if slowest:
            lines += ["", f"Slowest critical requests beside the flood (gateway, {label} model; round, flood first, "
                      "s since the flood started, ms, generator lag ms): " + ", ".join(
                          f"({s['round']}, {'yes' if s['flood_first'] else 'no'}, {s['since_flood_start_s']:.2f}, "
                          f"{s['ms']:.1f}, {s['generator_lag_ms']:.1f})" for s in slowest)]
    lines += ["", "Gateway memory per process: " + "; ".join(
        f"pid {pid}: RSS at start {m['rss_mb_at_start']} MB, max during the floods {m['max_rss_mb_during_flood']} MB, "
        f"peak (VmHWM) {m['peak_rss_mb']} MB"
        for pid, m in f["gateway_memory"].items())]
    return lines


def cpu_markdown(c: dict) -> list[str]:
    lines = ["", f"## CPU per request (utime + stime of the processes from /proc; wrk, {c['connections']} connections, "
             f"{c['rounds']} x {c['seconds']} s each, alternating; 0 ms model)", "",
             "| what | us CPU / request | of which in the kernel | requests | CPU s | req/s | statuses |",
             "|---|---|---|---|---|---|---|"]
    names = {"admitted": "gateway, admitted (proxied)", "refused": "gateway, refused at admission (429)",
             "nginx": "nginx, proxied", "nginx_429": "nginx, `return 429` (the floor of a refusal)"}
    for kind, name in names.items():
        k = c[kind]
        lines.append(f"| {name} | {k['us_per_request']:.1f} | {k.get('kernel_us_per_request', '-')} | "
                     f"{k['requests']} | {k['cpu_s']:.2f} | {k['rps']:.0f} | {k['statuses']} |")
    lines += ["", f"Refused / admitted CPU per request: {c['refused_over_admitted']:.3f}; refused / nginx's "
              f"`return 429`: {c['refused_over_nginx_429']:.2f}."]
    return lines


def overload_markdown(r: dict) -> list[str]:
    lines = ["", "## Peak throughput (closed loop, wrk, 64 connections), req/s", "",
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
              "| load | setup | critical | standard | sheddable | sent/s achieved | generator lag P99 ms "
              "| shards drained before (s) | gateway overload actions |",
              "|---|---|---|---|---|---|---|---|---|"]
    for multiple, row in r["overload"].items():
        for setup in SETUPS:
            s = row[setup]
            cells = [class_cell(s["flows"].get(c)) for c in ("critical", "standard", "sheddable")]
            lines.append(f"| {multiple}x | {setup} | {' | '.join(cells)} | {s['achieved_rate']:.0f} | "
                         f"{s['generator_lag_p99_ms']}{' (behind)' if s['generator_fell_behind'] else ''} | "
                         f"{s.get('shards_drained_before_s', '-')} | {s.get('overload_actions', '')} |")
    if "shed_floor" in r:
        floor = r["shed_floor"]
        steps = ", ".join(f"{m}x {row['gateway']['all']['shed_p99_ms']} ms" for m, row in r["overload"].items())
        lines += ["", f"Sheds P99 per step (gateway): {steps}. The floor as this generator measures a shed (from the "
                  f"intended send time): nginx answering `return 429` to the 3x mix, P99 {floor['shed_p99_ms']} ms, "
                  f"generator lag P99 {floor['generator_lag_p99_ms']} ms."]
    lines += ["", "## Fault (SIGKILL one shard, SIGSTOP the other for 3 s, mix at 1x): statuses per class", ""]
    for setup, summary in r["fault"].items():
        actions = f" (overload actions: {summary['overload_actions']})" if "overload_actions" in summary else ""
        lost = summary.get("critical_lost_sent_s")
        lines.append(f"- {setup}: " + "; ".join(f"{c} {summary['flows'][c]['statuses']}" for c in summary["flows"])
                     + actions + (f"; critical lost, sent {lost[0]}-{lost[-1]} s into the run" if lost else ""))
    mem = r["gateway_memory"]
    lines += ["", f"Gateway process memory after the overload runs: RSS {mem['rss_mb']} MB, "
              f"peak {mem['peak_rss_mb']} MB."]
    return lines


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
