"""Scaling: W gateway workers vs nginx with W workers vs Triton direct, closed-loop peak, for W = 1, 2, 4, 8.

Meant for a machine with many cores (the 16-core GPU machine; no GPU is used: Triton runs the `work` model on
CPU). For each W: `cpctl up` of a generated spec (K shards of `work`, `gateway.workers: W`), nginx with W worker
processes in front of the same shards (round robin, upstream keepalive, as the suite's), then, per model
(0 ms and 5 ms a batch) and round, wrk against each setup in turn (direct: one wrk per shard, summed).
Reports 2xx req/s per setup, gateway/nginx, scaling efficiency (rps at W / (W x rps at 1)), CPU per request of
the gateway's and nginx's processes, and `targets`; writes <OUT>/scaling-<date>.{json,md}.

    python bench/scaling.py OUT [--workers 1,2,4,8] [--models 0,5] [--shards 4] [--instances 2] [--seconds 5]
                                [--rounds 2] [--connections 512] [--threads N]

A W the spec refuses (no `gateway.workers` in the schema yet) or that fails to start is recorded as an error
and skipped. Every process is tracked (ManagedProcess) and stopped; all traffic stays on loopback; each wrk run
is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.bench import procstat  # noqa: E402
from controlplane.bench.suite import API_KEY, machine, start_nginx, target, work_body  # noqa: E402
from controlplane.bench.wrk import WrkRun  # noqa: E402
from controlplane.bench.wrk import script as wrk_script  # noqa: E402
from controlplane.procs import ManagedProcess, free_port, group_members  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK_MODEL = ROOT / "examples" / "models" / "work"
SETUPS = ("direct", "nginx", "gateway")
GOALS = {0: 0.9, 5: 0.95}  # gateway/nginx at the most workers, per model (work ms)
EFFICIENCY_GOAL = 0.8

def model_repository(directory: Path, instances: int) -> Path:
    """A model repository holding `work` with `instances` CPU instances (its model files as they are: they make
    their tensors so that numpy 1 and 2 both work, see examples/models/risk/1/tensors.py)."""
    work = directory / "work"
    shutil.copytree(WORK_MODEL / "1", work / "1", ignore=shutil.ignore_patterns("__pycache__"))
    config = (WORK_MODEL / "config.pbtxt").read_text()
    config = config.replace("instance_group [ { count: 2, kind: KIND_CPU } ]",
                            f"instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]")
    (work / "config.pbtxt").write_text(config)
    return directory


def spec_text(repository: Path, shards: int, workers: int) -> str:
    spec = {
        "cluster": f"bench-scaling-w{workers}",
        "model_repository": str(repository),
        "node_pools": [{"name": "local", "provider": "existing", "instance_type": "this-machine"}],
        "models": [{"name": "work", "path": "work", "memory_mb": 32, "instance_count": 2, "max_batch": 64}],
        "shards": [{"name": "main", "models": ["work"], "replicas": shards}],
        "priority_classes": [
            {"name": "critical", "level": 300, "default_deadline_ms": 250, "share": 0.5},
            {"name": "standard", "level": 200, "default_deadline_ms": 1000, "share": 0.3},
            {"name": "sheddable", "level": 100, "default_deadline_ms": 2000, "share": 0.2},
        ],
        "tenants": [{"name": "bench", "api_key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                     "default_class": "standard", "allowed_classes": ["critical", "standard", "sheddable"],
                     "rate": 10_000_000, "burst": 10_000_000}],
        "gateway": {"listen": "127.0.0.1", "port": 0, "workers": workers,
                    "limits": {"max_body_bytes": 1048576, "max_connections": 16384}},
    }
    return yaml.safe_dump(spec, sort_keys=False)


class Stack:
    """`cpctl up` of a generated spec, and its state."""

    def __init__(self, workdir: Path, spec: str, timeout_s: float = 120.0, up_args: tuple[str, ...] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        spec_file = workdir / "spec.yaml"
        spec_file.write_text(spec)
        cluster = yaml.safe_load(spec)["cluster"]
        env = {**os.environ, "CPCTL_RUN_DIR": str(workdir / "run")}
        self.process = ManagedProcess([sys.executable, "-m", "controlplane.cli", "up", "-f", str(spec_file), *up_args],
                                      env=env, log_path=workdir / "cpctl.log", cwd=ROOT)
        self.state_file = workdir / "run" / cluster / "state.json"
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"cpctl up failed: {self.process.log_tail(1500)}")
            time.sleep(0.1)

    def ready(self) -> bool:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        return all(s["state"] == "ready" for s in state["shards"])

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.popen.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.popen.wait(timeout=20)
        self.process.stop(grace_s=3)


def peak(urls: list[str], lua: Path, seconds: float, connections: int, threads: int, pids: list[int]) -> dict:
    """One closed-loop wrk run: 2xx req/s, non-2xx, and CPU per request of `pids` (the proxy's processes)."""
    before = procstat.total_cpu_seconds(pids) if pids else 0.0
    result = WrkRun(urls, "/v2/models/work/infer", lua, seconds, connections, threads=threads).wait()
    cpu = procstat.total_cpu_seconds(pids) - before if pids else 0.0
    ok = result.requests - result.non_2xx
    return {"ok_rps": round(ok / max(result.seconds, 1e-9), 1), "rps": round(result.rps, 1),
            "requests": result.requests, "non_2xx": result.non_2xx, "socket_errors": result.socket_errors,
            "cpu_us_per_request": round(cpu / max(result.requests, 1) * 1e6, 2) if pids else None}


def measure_workers(workers: int, args: argparse.Namespace, repository: Path, workdir: Path, log) -> dict:
    stack = Stack(workdir / "stack", spec_text(repository, args.shards, workers))
    nginx = None
    try:
        state = stack.state()
        shard_urls = [s["url"] for s in state["shards"] if s["url"]]
        gateway_pids = procstat.gateway_pids(state)
        port = free_port()
        nginx = start_nginx(workdir, port, shard_urls, workers=workers)
        urls = {"direct": shard_urls, "nginx": [f"http://127.0.0.1:{port}"], "gateway": [state["gateway"]]}
        out: dict = {"gateway_processes": len(gateway_pids), "shards": len(shard_urls)}
        for work_ms in args.models:
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
            lua = wrk_script(workdir / f"work-{work_ms}.lua", json.dumps(work_body({"work_ms": work_ms})), headers,
                             count_statuses=False)
            for setup in SETUPS:  # warm-up: connections, batching, the gateway's concurrency limits
                peak(urls[setup], lua, 1, args.connections, args.threads, [])
            runs: dict[str, list[dict]] = {s: [] for s in SETUPS}
            for index in range(args.rounds):
                for setup in (SETUPS if index % 2 == 0 else tuple(reversed(SETUPS))):
                    pids = {"gateway": gateway_pids, "nginx": group_members(nginx.pgid), "direct": []}[setup]
                    runs[setup].append(peak(urls[setup], lua, args.seconds, args.connections, args.threads, pids))
            row = {s: {"ok_rps": statistics.median(r["ok_rps"] for r in v),
                       "non_2xx": sum(r["non_2xx"] for r in v), "runs": v} for s, v in runs.items()}
            row["gateway_over_nginx"] = round(row["gateway"]["ok_rps"] / max(row["nginx"]["ok_rps"], 1e-9), 3)
            out[f"{work_ms}ms"] = row
            log(f"  W={workers} work {work_ms} ms: " + ", ".join(f"{s} {row[s]['ok_rps']:.0f}" for s in SETUPS)
                + f" req/s; gateway/nginx {row['gateway_over_nginx']:.3f}; non-2xx "
                + ", ".join(f"{s} {row[s]['non_2xx']}" for s in SETUPS))
        out["gateway_memory_mb"] = {str(pid): procstat.memory_mb(pid) for pid in gateway_pids
                                    if Path(f"/proc/{pid}").exists()}
        return out
    finally:
        if nginx is not None:
            nginx.stop(grace_s=2)
        stack.close()


def scaling_targets(r: dict) -> list[dict]:
    measured = sorted(int(w) for w, v in r["workers"].items() if "error" not in v)
    found = []
    top = max(measured) if measured else None
    for work_ms in r["config"]["models"]:
        key, goal = f"{work_ms}ms", GOALS.get(work_ms, 0.95)
        if top is not None and top >= 8:
            value = r["workers"][str(top)][key]["gateway_over_nginx"]
            found.append(target(f"gateway/nginx peak req/s at {top} workers, {work_ms} ms model", value,
                                f">= {goal}", value >= goal))
        else:
            found.append(target(f"gateway/nginx peak req/s at 8 workers, {work_ms} ms model (not run)", None,
                                f">= {goal}", False))
        if top is not None and top > 1 and 1 in measured:
            value = r["efficiency"][key]["gateway"][str(top)]
            found.append(target(f"gateway throughput 1 -> {top} workers / linear, {work_ms} ms model", value,
                                f">= {EFFICIENCY_GOAL}", value is not None and value >= EFFICIENCY_GOAL))
        if top is None or top < 8:
            found.append(target(f"gateway throughput 1 -> 8 workers / linear, {work_ms} ms model (not run)", None,
                                f">= {EFFICIENCY_GOAL}", False))
    return found


def efficiency(r: dict) -> dict:
    """rps at W / (W x rps at 1), per model and proxy."""
    out: dict = {}
    for work_ms in r["config"]["models"]:
        key = f"{work_ms}ms"
        out[key] = {}
        for setup in ("gateway", "nginx"):
            base = r["workers"].get("1", {}).get(key, {}).get(setup, {}).get("ok_rps")
            out[key][setup] = {
                w: (round(v[key][setup]["ok_rps"] / (int(w) * base), 3) if base else None)
                for w, v in r["workers"].items() if "error" not in v}
    return out


def markdown(r: dict) -> str:
    m, c = r["machine"], r["config"]
    lines = [f"# Scaling: gateway workers vs nginx workers vs Triton direct, {r['date']}", "",
             f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, kernel {m['kernel']}. "
             f"{c['shards']} Triton shards of `work` ({c['instances']} CPU instances each), wrk {c['threads']} threads "
             f"/ {c['connections']} connections (closed loop; direct: split over the shards), {c['rounds']} round(s) "
             f"of {c['seconds']} s per cell, setups alternating; req/s counts 2xx only (median of rounds). "
             "Load generator, proxies and shards share the machine's cores.", "",
             "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'NO'} |" for t in r["targets"]]
    for work_ms in c["models"]:
        key = f"{work_ms}ms"
        lines += ["", f"## work {work_ms} ms a batch: peak 2xx req/s", "",
                  "| workers | direct | nginx | gateway | gateway/nginx | efficiency gateway | efficiency nginx | "
                  "gateway CPU us/req | nginx CPU us/req | non-2xx (d/n/g) |", "|---" * 10 + "|"]
        for w, v in r["workers"].items():
            if "error" in v:
                lines.append(f"| {w} | error: {v['error'][:200]} | | | | | | | | |")
                continue
            row, eff = v[key], r["efficiency"][key]
            cpu = {s: statistics.median(x["cpu_us_per_request"] for x in row[s]["runs"]) for s in ("gateway", "nginx")}
            lines.append(f"| {w} | {row['direct']['ok_rps']:.0f} | {row['nginx']['ok_rps']:.0f} | "
                         f"{row['gateway']['ok_rps']:.0f} | {row['gateway_over_nginx']:.3f} | "
                         f"{eff['gateway'].get(w)} | {eff['nginx'].get(w)} | {cpu['gateway']:.1f} | "
                         f"{cpu['nginx']:.1f} | "
                         f"{row['direct']['non_2xx']}/{row['nginx']['non_2xx']}/{row['gateway']['non_2xx']} |")
    arguments = " ".join(f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in r["config"].items())
    lines += ["", "Reproduce (GPU machine, nothing installed: bench/device/pack.sh here, then bench/device/run.sh "
              f"there): `python bench/scaling.py OUT {arguments}`."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    cores = os.cpu_count() or 2
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="Directory for scaling-<date>.{json,md}.")
    parser.add_argument("--workers", default="1,2,4,8", help="Gateway (and nginx) worker counts, comma-separated.")
    parser.add_argument("--models", default="0,5", help="work_ms of the runs, comma-separated.")
    parser.add_argument("--shards", type=int, default=4, help="Triton shards (replicas of the `work` shard).")
    parser.add_argument("--instances", type=int, default=2, help="CPU instances of `work` per shard.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of one wrk run.")
    parser.add_argument("--rounds", type=int, default=2, help="Runs of each setup per cell (median taken).")
    parser.add_argument("--connections", type=int, default=512, help="wrk connections (all setups alike).")
    parser.add_argument("--threads", type=int, default=max(2, min(8, cores // 2)), help="wrk threads in all.")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.models = [int(m) for m in args.models.split(",")]
    if not 1 <= args.seconds <= 60 or not 1 <= args.rounds <= 5 or max(args.workers) > 64:
        parser.error("bounds: 1 <= seconds <= 60, 1 <= rounds <= 5, workers <= 64")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    def log(line: str) -> None:
        print(line, flush=True)

    config = {k: getattr(args, k) for k in ("workers", "models", "shards", "instances", "seconds", "rounds",
                                             "connections", "threads")}
    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine(), "config": config, "workers": {}}
    log(f"scaling on {results['machine']['cores']} cores: {config}")
    with tempfile.TemporaryDirectory(prefix="cpctl-scaling-") as tmp:
        repository = model_repository(Path(tmp) / "models", args.instances)
        for workers in args.workers:
            started = time.monotonic()
            try:
                results["workers"][str(workers)] = measure_workers(workers, args, repository, Path(tmp) / f"w{workers}",
                                                                   log)
            except RuntimeError as exc:
                results["workers"][str(workers)] = {"error": str(exc)}
                log(f"  W={workers}: error: {exc}")
            log(f"  W={workers} took {time.monotonic() - started:.0f} s")
    results["efficiency"] = efficiency(results)
    results["targets"] = scaling_targets(results)
    save(results, args.out / f"scaling-{results['date']}", markdown(results), log)
    return 0


def save(results: dict, stem: Path, text: str, log) -> None:
    """Write `stem`.json (the results) and `stem`.md (`text`), and log the targets."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(text)
    for t in results["targets"]:
        log(f"  {'yes' if t['met'] else 'NO ':3s} {t['name']}: {t['value']} ({t['target']})")
    log(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
