"""Where the time goes in the gateway targets still missed on this machine (issue 10), in one run.

Runs the bench stack (bench/overload.yaml: two real Triton shards, the gateway, nginx) and measures, setups
alternating, 2 rounds each (`--rounds`):
1. peak, `work` at 0 ms (wrk closed loop, 64 connections, as the suite): per setup the req/s, the CPU a request
   of the proxy and of the Triton shards (servers and their model stubs), Triton's mean batch, and how busy the
   machine's cores were. Where the load generator, the proxy and the shards share the cores, throughput is
   about cores / (CPU a request summed over all of them).
2. half load, `work` at 5 ms (open loop at half of direct's peak, one class, as the suite's overhead step):
   client P50 against the time Triton itself reports a request took (queue + compute, its mean), per setup.
3. refusal cost: each gateway's CPU a request, admitted (0 ms model) and refused at admission (a tenant of
   1 req/s), as the suite's cpu group measures it.
4. flood: critical at 100 req/s alone and beside 256 connections of `sheddable` (as the suite's flood group),
   per model: the critical latency the client sees against the one the gateway measures itself (from its
   reading the request to its answer, the cp_latency_seconds histogram): the difference waited in sockets
   and in the event loop before the gateway read the request, or after it answered.
5. mix: the suite's shard-bound overload mix (10% critical, 30% standard, 60% sheddable of the GPU-like `work`)
   at 0.5x and 3x direct's capacity, per gateway: each class's P99 and goodput, Triton's mean batch, the shards'
   requests in flight. Where the gateway trades the other classes' throughput for critical latency
   (`concurrency.urgent_bound`, `urgent_tolerance`), a variant shows the other side of the trade.

With `--variant NAME='{"concurrency": {...}}'` a second gateway (`cpctl gateway`, the same spec with that JSON
merged into its `gateway` section, in front of the same shards) runs as one more setup, `gateway:NAME`,
alternating with the others: an A/B of a gateway setting in one run. Each gateway window also records what the
gateway measured itself (its mean latency from reading a request to answering it, its mean queue wait) and, sampled
every SAMPLE_S, its shards' requests in flight and adaptive limits.

    .venv/bin/python bench/diagnose/gateway_limits.py [OUT_DIR] [--variant NAME=JSON] [--stem STEM]
    # ~5 min (more with a variant); bench/results by default

Writes <STEM or gateway-limits-<date>>.{json,md}. Every process is the stack's, the variant gateway's or wrk's and
is stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from controlplane.bench import procstat
from controlplane.bench.loadgen import Flow, summarize
from controlplane.bench.suite import (
    API_KEY,
    MIX_CAPACITY,
    REFUSED_KEY,
    Setups,
    critical_run,
    machine,
    metric_sum,
    mix_flows,
    open_loop,
    target,
    work_body,
    wrk_peak,
)
from controlplane.bench.wrk import WrkRun
from controlplane.bench.wrk import script as wrk_script
from controlplane.procs import ManagedProcess, free_port, group_members
from controlplane.resources import project_file

ROUNDS = 2  # rounds of each setup by default (`--rounds`)
PEAK_S, HALF_S, FLOOD_S = 4, 5.0, 5.0
SAMPLE_S = 0.25  # how often a gateway's shard gauges are read during a window
PARTS = ("peak", "half", "refusal", "flood", "mix")
MIX_MULTIPLES = (0.5, 3.0)  # multiples of direct's capacity in the suite (MIX_CAPACITY)


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


def gateway_readings(url: str) -> dict[str, float]:
    """From a gateway's /metrics: its latency and queue-wait sums and counts (all classes), and its shards'
    requests in flight and adaptive limits (summed over the shards)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()

    names = {"latency_s": "cp_latency_seconds_sum", "latency_n": "cp_latency_seconds_count",
             "wait_s": "cp_queue_wait_seconds_sum", "wait_n": "cp_queue_wait_seconds_count",
             "in_flight": "cp_shard_in_flight", "limit": "cp_shard_concurrency_limit",
             "overload_actions": "cp_overload_actions_total"}
    return {key: metric_sum(text, name) for key, name in names.items()}


class GaugeSampler:
    """Reads a gateway's in-flight and limit gauges every SAMPLE_S while a window runs (a thread)."""

    def __init__(self, url: str) -> None:
        self.url, self.samples = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            reading = gateway_readings(self.url)
            self.samples.append((reading["in_flight"], reading["limit"]))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=5)
        samples = self.samples or [(0.0, 0.0)]
        return {"in_flight_mean": statistics.fmean(s[0] for s in samples),
                "in_flight_max": max(s[0] for s in samples), "limit_mean": statistics.fmean(s[1] for s in samples),
                "limit_min": min(s[1] for s in samples)}


class Window:
    """CPU of the proxy, of the shards and of the whole machine, and Triton's counters, over a measurement; for a
    gateway (`gateway_url`) also what it measured itself."""

    def __init__(self, setups: Setups, proxy_pids: list[int], gateway_url: str | None = None) -> None:
        self.setups, self.proxy_pids, self.shard_pids = setups, proxy_pids, triton_pids(setups)
        self.gateway_url = gateway_url
        self.gateway0 = gateway_readings(gateway_url) if gateway_url else None
        self.sampler = GaugeSampler(gateway_url) if gateway_url else None
        self.start = time.monotonic()
        self.proxy0 = procstat.total_cpu_seconds(proxy_pids)
        self.run_queue0 = procstat.run_queue(proxy_pids)
        self.shards0 = procstat.total_cpu_seconds(self.shard_pids)
        self.busy0 = busy_cpu_seconds()
        self.triton0 = triton_stats(setups)

    def end(self) -> dict[str, float]:
        wall = time.monotonic() - self.start
        triton = {k: v - self.triton0[k] for k, v in triton_stats(self.setups).items()}
        requests = max(triton["inferences"], 1.0)
        return {**self._gateway(),
            "requests": triton["inferences"],
            "proxy_cpu_us": (procstat.total_cpu_seconds(self.proxy_pids) - self.proxy0) / requests * 1e6,
            **self._run_queue(requests),
            "triton_cpu_us": (procstat.total_cpu_seconds(self.shard_pids) - self.shards0) / requests * 1e6,
            "machine_busy_cores": (busy_cpu_seconds() - self.busy0) / wall,
            "mean_batch": triton["inferences"] / max(triton["executions"], 1.0),
            "triton_request_ms": triton["success_ns"] / max(triton["successes"], 1.0) / 1e6,
            "triton_queue_ms": triton["queue_ns"] / max(triton["successes"], 1.0) / 1e6,
        }

    def _run_queue(self, requests: float) -> dict[str, float]:
        """Per request: how long the proxy waited for a core (runnable while the load generator or the shards held
        both), and how many times it was given one (about its event loop's wake-ups)."""
        waited, slices = procstat.run_queue(self.proxy_pids)
        return {"proxy_run_queue_us": (waited - self.run_queue0[0]) / requests * 1e6,
                "proxy_slices": (slices - self.run_queue0[1]) / requests}

    def _gateway(self) -> dict[str, float]:
        """The gateway's own mean latency and queue wait over the window, and its sampled gauges."""
        if self.gateway_url is None:
            return {}
        gauges = self.sampler.stop()
        now, then = gateway_readings(self.gateway_url), self.gateway0
        answered = max(now["latency_n"] - then["latency_n"], 1.0)
        waited = max(now["wait_n"] - then["wait_n"], 1.0)
        return {"gateway_latency_ms": (now["latency_s"] - then["latency_s"]) / answered * 1000,
                "gateway_queue_wait_ms": (now["wait_s"] - then["wait_s"]) / waited * 1000,
                "overload_actions": now["overload_actions"] - then["overload_actions"], **gauges}


class Variant:
    """A second gateway in front of the same shards: the bench spec with `overrides` merged into its `gateway`
    section, run by `cpctl gateway` (static endpoints: the stack's shards)."""

    def __init__(self, setups: Setups, name: str, overrides: dict, workdir: Path) -> None:
        self.name = f"gateway:{name}"
        spec_path = project_file("bench/overload.yaml")
        spec = yaml.safe_load(spec_path.read_text())
        spec["model_repository"] = str((spec_path.parent / spec["model_repository"]).resolve())
        port = free_port()
        spec["gateway"] = {**spec["gateway"], "port": port, **overrides}
        spec["shards_backend"] = {"kind": "static"}
        variant_spec, endpoints = workdir / f"variant-{name}.yaml", workdir / f"endpoints-{name}.json"
        variant_spec.write_text(yaml.safe_dump(spec))
        shards = json.loads(setups.state_file.read_text())["shards"]
        endpoints.write_text(json.dumps([{"name": s["name"], "host": "127.0.0.1", "models": ["work"],
                                          "port": int(s["url"].rsplit(":", 1)[1])} for s in shards]))
        self.process = ManagedProcess([sys.executable, "-m", "controlplane.cli", "gateway", "-f", str(variant_spec),
                                       "--endpoints", str(endpoints)], log_path=workdir / f"variant-{name}.log")
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.stop()
                    raise RuntimeError(f"the variant gateway did not start: {self.process.log_tail()}") from None
                time.sleep(0.2)

    def pids(self) -> list[int]:
        """Its worker processes (each leads its own process group), not the supervisor: as the stack's."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children]


def setup_names(variants: list[Variant]) -> list[str]:
    return ["direct", "nginx", "gateway", *(v.name for v in variants)]


def setup_urls(setups: Setups, setup: str, variants: list[Variant]) -> list[str]:
    variant = next((v for v in variants if v.name == setup), None)
    return [variant.url] if variant else setups.urls[setup]


def proxy_pids(setups: Setups, setup: str, variants: list[Variant]) -> list[int]:
    variant = next((v for v in variants if v.name == setup), None)
    if variant is not None:
        return variant.pids()
    return setups.proxy_pids(setup)


def window(setups: Setups, setup: str, variants: list[Variant]) -> Window:
    gateway_url = setup_urls(setups, setup, variants)[0] if setup.startswith("gateway") else None
    return Window(setups, proxy_pids(setups, setup, variants), gateway_url)


def mean_of(windows: list[dict]) -> dict[str, float]:
    return {k: round(statistics.fmean(w[k] for w in windows), 3) for k in windows[0]}


def mean_and_spread(windows: list[dict]) -> dict[str, float]:
    """Means over the rounds, and for the headline numbers their spread (max - min) and each round's value."""
    out = mean_of(windows)
    headline = [key for key in ("rps", "client_p50_ms", "client_p99_ms", "mean_batch", "proxy_cpu_us")
                if key in windows[0]]
    for key in headline:
        out[f"{key}_spread"] = round(max(w[key] for w in windows) - min(w[key] for w in windows), 3)
    out["rounds"] = [{key: round(w[key], 3) for key in headline} for w in windows]  # for paired comparisons
    return out


def peak(setups: Setups, workdir: Path, variants: list[Variant], rounds: int) -> dict:
    runs: dict[str, list[dict]] = {s: [] for s in setup_names(variants)}
    for setup in runs:  # warm-up: connections, limits
        if setup.startswith("gateway"):
            wrk_peak(setup_urls(setups, setup, variants), {"work_ms": 0}, 1, 64, workdir)
    for _ in range(rounds):
        for setup in runs:
            measured = window(setups, setup, variants)
            rps = wrk_peak(setup_urls(setups, setup, variants), {"work_ms": 0}, PEAK_S, 64, workdir)["rps"]
            runs[setup].append({"rps": rps, **measured.end()})
    return {setup: mean_and_spread(windows) for setup, windows in runs.items()}


def half_load(setups: Setups, workdir: Path, variants: list[Variant], rounds: int) -> dict:
    rate = 0.5 * wrk_peak(setups.urls["direct"], {"work_ms": 5}, PEAK_S, 64, workdir)["rps"]
    flow = [Flow(name="standard", weight=1, api_key=API_KEY, deadline_ms=1000, send_deadline=False,
                 body=work_body({"work_ms": 5}))]
    runs: dict[str, list[dict]] = {s: [] for s in setup_names(variants)}
    for _ in range(rounds):
        for setup in runs:
            measured = window(setups, setup, variants)
            client = open_loop(setup_urls(setups, setup, variants), rate, HALF_S, flow)["all"]
            runs[setup].append({"client_p50_ms": client["ok_p50_ms"], "client_p99_ms": client["ok_p99_ms"],
                                **measured.end()})
    return {"rate": round(rate), **{setup: mean_and_spread(windows) for setup, windows in runs.items()}}


def refusal_cost(setups: Setups, workdir: Path, variants: list[Variant], rounds: int) -> dict:
    """CPU a request of each gateway, admitted (0 ms model) and refused at admission (the `refused` tenant, 1 req/s),
    as the suite's cpu group measures it (wrk, 64 connections, 2 threads), gateways and kinds alternating."""
    body = json.dumps(work_body({"work_ms": 0}))
    scripts = {kind: wrk_script(workdir / f"cost-{kind}.lua", body, {"Content-Type": "application/json",
                                                                    "Authorization": f"Bearer {key}"},
                                count_statuses=True)
               for kind, key in (("admitted", API_KEY), ("refused", REFUSED_KEY))}
    gateways = [s for s in setup_names(variants) if s.startswith("gateway")]
    runs: dict[str, dict[str, list[dict]]] = {g: {"admitted": [], "refused": []} for g in gateways}
    for _ in range(rounds):
        for kind, lua in scripts.items():
            for setup in gateways:
                pids = proxy_pids(setups, setup, variants)
                before, kernel_before = procstat.total_cpu_seconds(pids), procstat.kernel_cpu_seconds(pids)
                traffic = WrkRun(setup_urls(setups, setup, variants), "/v2/models/work/infer", lua, PEAK_S, 64,
                                 threads=2).wait()
                requests = max(sum(traffic.statuses.values()), 1)
                runs[setup][kind].append({"us": (procstat.total_cpu_seconds(pids) - before) / requests * 1e6,
                                          "kernel_us": (procstat.kernel_cpu_seconds(pids) - kernel_before)
                                          / requests * 1e6,
                                          "rps": traffic.rps, "statuses": traffic.statuses})
    out = {}
    for setup, kinds in runs.items():
        row = {kind: {"us_per_request": round(statistics.fmean(r["us"] for r in got), 2),
                      "us_spread": round(max(r["us"] for r in got) - min(r["us"] for r in got), 2),
                      "kernel_us_per_request": round(statistics.fmean(r["kernel_us"] for r in got), 2),
                      "rps": round(statistics.fmean(r["rps"] for r in got)),
                      "statuses": [r["statuses"] for r in got]} for kind, got in kinds.items()}
        row["refused_over_admitted"] = round(row["refused"]["us_per_request"] / row["admitted"]["us_per_request"], 3)
        out[setup] = row
    return out


def critical_latency_cdf(url: str) -> dict[str, float]:
    """A gateway's cp_latency_seconds buckets of the critical class (cumulative counts by bound)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("cp_latency_seconds_bucket{") and 'class="critical"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[bound] = float(line.rsplit(" ", 1)[1])
    return out


def flood(setups: Setups, workdir: Path, variants: list[Variant], rounds: int) -> dict:
    """Per model, per gateway (the stack's and each variant, alternating), critical alone and beside the flood."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", "x-priority": "sheddable"}
    gateways = [s for s in setup_names(variants) if s.startswith("gateway")]
    for variant in variants:  # (critical_run finds a setup's URL there)
        setups.urls[variant.name] = [variant.url]
    out: dict = {}
    for label, work_ms in (("5ms", 5), ("0ms", 0)):
        lua = wrk_script(workdir / f"flood-{label}.lua", json.dumps(work_body({"work_ms": work_ms})), headers,
                         count_statuses=True)
        runs: dict = {(g, m): {"samples": [], "cdfs": [], "windows": []} for g in gateways for m in ("alone", "flood")}
        for _ in range(rounds):
            for setup in gateways:
                url = setup_urls(setups, setup, variants)[0]
                for mode in ("alone", "flood"):
                    setups.wait_gateway_idle()
                    run = runs[setup, mode]
                    before, measured = critical_latency_cdf(url), window(setups, setup, variants)
                    got, _, _ = critical_run(setups, setup, work_ms, FLOOD_S, lua if mode == "flood" else None)
                    run["windows"].append(measured.end())
                    after = critical_latency_cdf(url)
                    run["samples"] += got
                    run["cdfs"].append({bound: after[bound] - before.get(bound, 0.0) for bound in after})
        out[label] = {}
        for (setup, mode), run in runs.items():
            client = summarize(run["samples"], FLOOD_S * rounds)
            counted = sum(c["+Inf"] for c in run["cdfs"]) or 1.0
            cdf = {bound: round(sum(c[bound] for c in run["cdfs"]) / counted, 4) for bound in run["cdfs"][0]}
            out[label].setdefault(setup, {})[mode] = {
                "client_p50_ms": client["ok_p50_ms"], "client_p90_ms": client["ok_p90_ms"],
                "client_p99_ms": client["ok_p99_ms"], "statuses": client["statuses"], "gateway_measured_cdf": cdf,
                **mean_of(run["windows"])}
    return out


def mix(setups: Setups, workdir: Path, variants: list[Variant], rounds: int) -> dict:
    """Per gateway (alternating) and load multiple: the suite's overload mix, each class's P99 and goodput."""
    gateways = [s for s in setup_names(variants) if s.startswith("gateway")]
    runs: dict = {(g, m): [] for m in MIX_MULTIPLES for g in gateways}
    for _ in range(rounds):
        for multiple in MIX_MULTIPLES:
            for setup in gateways:
                setups.wait_shards_idle()
                measured = window(setups, setup, variants)
                got = open_loop(setup_urls(setups, setup, variants), MIX_CAPACITY * multiple, FLOOD_S,
                                mix_flows(True))
                runs[setup, multiple].append({
                    **{f"{c}_p99_ms": f["ok_p99_ms"] for c, f in got["flows"].items()},
                    **{f"{c}_goodput": f["goodput_rps"] for c, f in got["flows"].items()},
                    "goodput": sum(f["goodput_rps"] for f in got["flows"].values()),
                    "generator_lag_p99_ms": got["generator_lag_p99_ms"], **measured.end()})
    return {f"{setup} {multiple:g}x": mean_of(windows) for (setup, multiple), windows in runs.items()}


def targets(result: dict) -> list[dict]:
    """Issue 10's targets that this run measures, for each gateway setup (the suite's definitions)."""
    found = []
    for setup in [s for s in result.get("peak", result.get("half_load", {})) if s.startswith("gateway")]:
        if "peak" in result:
            ratio = result["peak"][setup]["rps"] / result["peak"]["nginx"]["rps"]
            found.append(target(f"peak throughput {setup} / nginx, 0 ms model", ratio, ">= 0.9", ratio >= 0.9))
        if "half_load" in result:
            half = result["half_load"]
            for name, limit in (("p50", 0.5), ("p99", 1.5)):
                extra = half[setup][f"client_{name}_ms"] - half["direct"][f"client_{name}_ms"]
                found.append(target(f"overhead {name.upper()} ms at ~50% load ({setup} - direct)", extra,
                                    f"<= {limit}", extra <= limit))
        if setup in result.get("refusal", {}):
            ratio = result["refusal"][setup]["refused_over_admitted"]
            found.append(target(f"CPU per refused / per admitted request ({setup})", ratio, "<= 0.1", ratio <= 0.1))
    for label, row in result.get("flood", {}).items():
        for setup, modes in row.items():
            ratio = round(modes["flood"]["client_p99_ms"] / max(modes["alone"]["client_p99_ms"], 1e-9), 3)
            found.append(target(f"critical P99 with flood / alone ({setup}, {label} model)", ratio, "<= 1.5",
                                ratio <= 1.5))
    rows = result.get("mix", {})
    for setup in sorted({key.split(" ")[0] for key in rows}):
        low, high = rows[f"{setup} {MIX_MULTIPLES[0]:g}x"], rows[f"{setup} {MIX_MULTIPLES[-1]:g}x"]
        ratio = high["critical_p99_ms"] / max(low["critical_p99_ms"], 1e-9)
        found.append(target(f"critical P99 at 3x / at 0.5x ({setup})", ratio, "<= 1.5", ratio <= 1.5))
        share = high["goodput"] / MIX_CAPACITY
        found.append(target(f"goodput at 3x / direct's capacity in the suite ({setup})", share, ">= 0.9", share >= 0.9))
    return found


def gateway_cells(r: dict) -> str:
    """What a gateway measured itself over a window (blank cells for the other setups)."""
    if "gateway_latency_ms" not in r:
        return "| | | | |"
    return (f"| {r['gateway_latency_ms']:.2f} / {r['gateway_queue_wait_ms']:.3f} | {r['in_flight_mean']:.1f} "
            f"(max {r['in_flight_max']:.0f}) | {r['limit_mean']:.1f} (min {r['limit_min']:.1f}) | "
            f"{r['overload_actions']:.0f} |")


GATEWAY_COLUMNS = ("gateway-measured latency / queue wait, mean ms | shards' in flight, sampled mean (max) | "
                   "shards' limits summed, sampled mean (min) | overload actions (refusals, holds) |")


def markdown(result: dict) -> str:
    lines = [f"# Where the gateway's time goes on this machine, {result['date']}", "", "## Targets", "",
             "| target | value | goal | met |", "|---|---|---|---|",
             *(f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'NO'} |"
               for t in result.get("targets", [])), "",
             f"Machine: {result['machine']}. `{result['command']}`; means over {result['rounds']} rounds, setups "
             "alternating (spread: max - min over the rounds).",
             "", "## 1. Peak, `work` at 0 ms (wrk, 64 connections)", "",
             "| setup | req/s (spread) | proxy CPU us/req | Triton CPU us/req (servers + stubs) | "
             "proxy + Triton us/req | Triton mean batch (spread) | machine busy cores | " + GATEWAY_COLUMNS,
             "|---" * 11 + "|"]
    for setup, r in result.get("peak", {}).items():
        lines.append(f"| {setup} | {r['rps']:.0f} ({r['rps_spread']:.0f}) | {r['proxy_cpu_us']:.1f} | "
                     f"{r['triton_cpu_us']:.1f} | {r['proxy_cpu_us'] + r['triton_cpu_us']:.1f} | "
                     f"{r['mean_batch']:.2f} ({r['mean_batch_spread']:.2f}) | {r['machine_busy_cores']:.2f} "
                     + gateway_cells(r))
    half = result.get("half_load", {"rate": 0})
    lines += ["", f"## 2. Half load, `work` at 5 ms, open loop at {half['rate']} req/s", "",
              "| setup | client P50 ms (spread) | client P99 ms (spread) | Triton's mean request ms (queue) | "
              "client P50 - Triton mean | Triton mean batch | proxy CPU us/req | proxy waited for a core, us/req "
              "| proxy given a core, times/req | machine busy cores | " + GATEWAY_COLUMNS, "|---" * 14 + "|"]
    for setup, r in half.items():
        if setup == "rate":
            continue
        lines.append(f"| {setup} | {r['client_p50_ms']:.2f} ({r['client_p50_ms_spread']:.2f}) | "
                     f"{r['client_p99_ms']:.2f} ({r['client_p99_ms_spread']:.2f}) | "
                     f"{r['triton_request_ms']:.2f} ({r['triton_queue_ms']:.2f}) | "
                     f"{r['client_p50_ms'] - r['triton_request_ms']:.2f} | {r['mean_batch']:.2f} | "
                     f"{r['proxy_cpu_us']:.1f} | {r['proxy_run_queue_us']:.1f} | {r['proxy_slices']:.2f} | "
                     f"{r['machine_busy_cores']:.2f} " + gateway_cells(r))
    if "refusal" in result:
        lines += ["", "## Refusal cost: gateway CPU a request, admitted (0 ms model) and refused at admission "
                  "(wrk, 64 connections)", "", "| setup | admitted us/req (spread) | admitted req/s | "
                  "refused us/req (spread) | of which in the kernel | refused req/s | refused / admitted |",
                  "|---|---|---|---|---|---|---|"]
        for setup, r in result["refusal"].items():
            admitted, refused = r["admitted"], r["refused"]
            lines.append(f"| {setup} | {admitted['us_per_request']:.1f} ({admitted['us_spread']:.1f}) | "
                         f"{admitted['rps']} | {refused['us_per_request']:.1f} ({refused['us_spread']:.1f}) | "
                         f"{refused['kernel_us_per_request']:.1f} | {refused['rps']} | "
                         f"{r['refused_over_admitted']:.3f} |")
    if "mix" in result:
        lines += ["", "## Overload mix (10% critical / 30% standard / 60% sheddable, GPU-like `work`), open loop", "",
                  "| gateway, load | critical P99 ms / goodput | standard | sheddable | goodput req/s | "
                  "Triton mean batch | generator lag P99 ms | " + GATEWAY_COLUMNS, "|---" * 11 + "|"]
        for key, r in result["mix"].items():
            classes = " | ".join(f"{r[f'{c}_p99_ms']:.0f} / {r[f'{c}_goodput']:.0f}"
                                 for c in ("critical", "standard", "sheddable"))
            lines.append(f"| {key} | {classes} | {r['goodput']:.0f} | {r['mean_batch']:.2f} | "
                         f"{r['generator_lag_p99_ms']:.2f} " + gateway_cells(r))
    if "flood" not in result:
        return "\n".join(lines) + "\n"
    lines += ["", "## 3. Flood: critical at 100 req/s, alone and beside 256 `sheddable` connections", "",
              "| model | gateway | mode | client P50 / P90 / P99 ms | P99 flood / alone | gateway-measured share "
              "<= 2.5 / 5 / 10 / 25 ms | critical statuses | Triton CPU us/req | machine busy cores |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, row in result["flood"].items():
        for setup, modes in row.items():
            for mode, r in modes.items():
                cdf = r["gateway_measured_cdf"]
                ratio = r["client_p99_ms"] / max(modes["alone"]["client_p99_ms"], 1e-9)
                lines.append(f"| {label} | {setup} | {mode} | {r['client_p50_ms']:.2f} / {r['client_p90_ms']:.2f} / "
                             f"{r['client_p99_ms']:.2f} | {ratio:.2f} | {cdf.get('0.0025')} / {cdf.get('0.005')} / "
                             f"{cdf.get('0.01')} / {cdf.get('0.025')} | {r['statuses']} | {r['triton_cpu_us']:.1f} | "
                             f"{r['machine_busy_cores']:.2f} |")
    return "\n".join(lines) + "\n"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("bench/results"))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="a second gateway with JSON merged into the spec's `gateway` section")
    parser.add_argument("--stem", help="output file name without suffix (default gateway-limits-DATE)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of each setup, alternating")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run, of {','.join(PARTS)}")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-limits-"))
    setups = Setups(workdir)
    variants: list[Variant] = []
    try:
        setups.wait_all_ready()
        for variant in args.variant:
            name, _, overrides = variant.partition("=")
            variants.append(Variant(setups, name, json.loads(overrides), workdir))
        result = {"date": datetime.date.today().isoformat(), "machine": machine(),
                  "command": "python bench/diagnose/gateway_limits.py " + " ".join(sys.argv[1:]),
                  "variants": args.variant, "rounds": args.rounds}
        rounds = args.rounds
        steps = {"peak": lambda: peak(setups, workdir, variants, rounds),
                 "half": lambda: half_load(setups, workdir, variants, rounds),
                 "refusal": lambda: refusal_cost(setups, workdir, variants, rounds),
                 "flood": lambda: flood(setups, workdir, variants, rounds),
                 "mix": lambda: mix(setups, workdir, variants, rounds)}
        for part in args.parts.split(","):
            if part not in steps:
                raise SystemExit(f"unknown part '{part}' (parts: {', '.join(PARTS)})")
            print(part, flush=True)
            result[{"half": "half_load"}.get(part, part)] = steps[part]()
    finally:
        for variant in variants:
            variant.process.stop()
        setups.close()
    result["targets"] = targets(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / (args.stem or f"gateway-limits-{result['date']}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
