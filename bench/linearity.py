"""Gateway workers 1 -> W when nothing behind them is the bottleneck (issue 10: 1 -> 8 workers >= 0.8x linear).

On the 16-core GPU machine, Triton on CPU serves ~36k req/s of `work` in all (bench/scaling.py): what two or three
compiled gateway workers pass. There, 1 -> 8 workers measures Triton, not the gateway. Here the shards are a
stand-in that costs next to nothing: nginx answering each route the gateway calls with what a real tritonserver
answered for `work`, recorded at the start (model metadata, model config, one infer response; 200 to
GET /v2/health/ready). The stand-in does no inference: it measures the proxy, and the README says so.

The cores are split so that the proxy under test has cores of its own: the proxy on the first W of PROXY cores (the
gateway's W workers, or nginx with W workers in front of the same stand-in, for comparison), wrk on LOAD cores, the
stand-in on the rest. The proxy cores are one logical CPU per physical core while there are enough (SMT siblings
share a core's execution units). Per W: 2xx req/s, efficiency (req/s at W / (W x req/s at 1)), CPU per request,
and `targets`; writes <OUT>/linearity-<date>.{json,md}.

    python bench/linearity.py OUT [--workers 1,2,4,8] [--load-cores 4] [--standin-ports 4] [--seconds 5]
                                  [--rounds 2] [--connections 512]

Every process is tracked (ManagedProcess) and stopped; all traffic stays on loopback; each wrk run is bounded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scaling import Stack, model_repository, peak, save, spec_text  # noqa: E402
from controlplane.bench.suite import API_KEY, machine, run_nginx, start_nginx, target, wait_serving, work_body  # noqa: E402
from controlplane.bench.wrk import script as wrk_script  # noqa: E402
from controlplane.procs import ManagedProcess, children, free_port, group_members  # noqa: E402

EFFICIENCY_GOAL = 0.8
WORK_MS = 0  # the cheapest model: the proxy's own cost is all there is to measure


def core_layout(workers: int, load_cores: int) -> dict[str, list[int]]:
    """Logical CPUs for the proxy (`workers` of them, distinct physical cores first), wrk and the stand-in."""
    cpus = sorted(os.sched_getaffinity(0))
    first_threads = [c for c in cpus if sibling_rank(c) == 0]
    ordered = first_threads + [c for c in cpus if c not in first_threads]
    proxy = ordered[:workers]
    rest = [c for c in cpus if c not in proxy] or cpus
    load = rest[:load_cores]
    standin = rest[load_cores:] or rest
    return {"proxy": proxy, "load": load, "standin": standin}


def sibling_rank(cpu: int) -> int:
    """0 for the first logical CPU of its physical core, 1 for its SMT sibling, ..."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    siblings = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        siblings += range(int(low), int(high or low) + 1)
    return sorted(siblings).index(cpu) if cpu in siblings else 0


def record_triton(workdir: Path, repository: Path) -> dict[str, str]:
    """What a real tritonserver answers for `work` on the routes the gateway calls (one shard of `cpctl up`)."""
    stack = Stack(workdir, spec_text(repository, 1, 1))
    try:
        shard = next(s["url"] for s in stack.state()["shards"] if s["url"])

        def get(path: str, body: bytes | None = None) -> str:
            request = urllib.request.Request(shard + path, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.read().decode()

        return {"metadata": get("/v2/models/work"), "config": get("/v2/models/work/config"),
                "infer": get("/v2/models/work/infer", json.dumps(work_body({"work_ms": WORK_MS})).encode())}
    finally:
        stack.close()


def start_standin(workdir: Path, answers: dict[str, str], ports: list[int], workers: int) -> ManagedProcess:
    """nginx answering the recorded documents on each of `ports` (one shard each)."""
    for text in answers.values():
        if any(c in text for c in "'$\\"):
            raise RuntimeError("a recorded answer holds ', $ or \\, which nginx's `return` would misread")
    routes = "\n".join(f"""    location = {path} {{ return 200 '{answers[name]}'; }}""" for path, name in (
        ("/v2/models/work", "metadata"), ("/v2/models/work/config", "config"), ("/v2/models/work/infer", "infer")))
    servers = "".join(f"""
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 10000000;
    default_type application/json;
    location = /v2/health/ready {{ return 200; }}
{routes}
  }}""" for port in ports)
    workdir.mkdir(parents=True, exist_ok=True)
    return run_nginx(workdir, workers, servers, ports[0])


def gateway_spec(repository: Path, workers: int, ports: list[int]) -> str:
    """The scaling spec for `cpctl gateway` in front of the stand-in's ports (static shards)."""
    spec = yaml.safe_load(spec_text(repository, len(ports), workers))
    spec["shards_backend"] = {"kind": "static"}
    return yaml.safe_dump(spec, sort_keys=False)


def start_gateway(workdir: Path, repository: Path, workers: int, ports: list[int]) -> tuple[ManagedProcess, str]:
    """`cpctl gateway` with `workers` workers in front of the stand-in; returns it and its URL once it serves."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.yaml").write_text(gateway_spec(repository, workers, ports))
    (workdir / "endpoints.json").write_text(json.dumps(
        [{"name": f"standin-{i}", "host": "127.0.0.1", "port": port, "models": ["work"]}
         for i, port in enumerate(ports)]))
    port = free_port()
    process = ManagedProcess([sys.executable, "-m", "controlplane.cli", "gateway", "-f", str(workdir / "spec.yaml"),
                              "--endpoints", str(workdir / "endpoints.json"), "--port", str(port)],
                             log_path=workdir / "gateway.log", cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    wait_serving(process, url, 60, "cpctl gateway")
    return process, url


def measure(workers: int, args: argparse.Namespace, layout: dict[str, list[int]], repository: Path,
            ports: list[int], workdir: Path, lua: Path, log) -> dict:
    """Both proxies at `workers` workers on their cores, alternating, `args.rounds` runs each."""
    proxy_cpus = layout["proxy"][:workers]
    os.sched_setaffinity(0, proxy_cpus)  # what starts now inherits the proxy's cores
    gateway, gateway_url = start_gateway(workdir / "gateway", repository, workers, ports)
    nginx = None
    try:
        nginx_port = free_port()
        (workdir / "nginx").mkdir(parents=True, exist_ok=True)
        nginx = start_nginx(workdir / "nginx", nginx_port, [f"http://127.0.0.1:{p}" for p in ports], workers=workers)
        os.sched_setaffinity(0, layout["load"])  # wrk runs on the load cores
        urls = {"gateway": [gateway_url], "nginx": [f"http://127.0.0.1:{nginx_port}"]}
        # the supervising `cpctl gateway` and its workers (each worker leads a process group of its own)
        pids = {"gateway": [gateway.pid, *children(gateway.pid)], "nginx": group_members(nginx.pgid)}
        threads = len(layout["load"])
        for setup in urls:  # warm-up: connections, the gateway's signature cache and concurrency limits
            peak(urls[setup], lua, 1, args.connections, threads, [])
        runs: dict[str, list[dict]] = {s: [] for s in urls}
        for index in range(args.rounds):
            for setup in (("gateway", "nginx") if index % 2 == 0 else ("nginx", "gateway")):
                runs[setup].append(peak(urls[setup], lua, args.seconds, args.connections, threads, pids[setup]))
        row = {s: {"ok_rps": statistics.median(r["ok_rps"] for r in v),
                   "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in v),
                   "non_2xx": sum(r["non_2xx"] for r in v), "runs": v} for s, v in runs.items()}
        row["proxy_cpus"] = proxy_cpus
        row["gateway_workers"] = len(pids["gateway"]) - 1
        log(f"  W={workers} on cpus {proxy_cpus}: gateway ({row['gateway_workers']} workers) "
            f"{row['gateway']['ok_rps']:.0f} req/s "
            f"({row['gateway']['cpu_us_per_request']:.1f} us CPU a request), nginx {row['nginx']['ok_rps']:.0f} "
            f"({row['nginx']['cpu_us_per_request']:.1f} us); non-2xx gateway {row['gateway']['non_2xx']}, "
            f"nginx {row['nginx']['non_2xx']}")
        return row
    finally:
        if nginx is not None:
            nginx.stop(grace_s=2)
        gateway.stop(grace_s=10)


def efficiency(rows: dict[str, dict], setup: str) -> dict[str, float | None]:
    base = rows.get("1", {}).get(setup, {}).get("ok_rps")
    return {w: round(v[setup]["ok_rps"] / (int(w) * base), 3) if base else None for w, v in rows.items()}


def linearity_targets(r: dict) -> list[dict]:
    measured = sorted(int(w) for w in r["workers"])
    top = max(measured)
    value = r["efficiency"]["gateway"].get(str(top)) if 1 in measured and top > 1 else None
    return [target(f"gateway throughput 1 -> {top} workers / linear, 0 ms model, stand-in shards", value,
                   f">= {EFFICIENCY_GOAL}", value is not None and value >= EFFICIENCY_GOAL)]


def markdown(r: dict) -> str:
    m, c, layout = r["machine"], r["config"], r["layout"]
    lines = [f"# Gateway workers 1 -> W with stand-in shards, {r['date']}", "",
             f"Machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, kernel {m['kernel']}. "
             f"The proxy under test on cpus {layout['proxy']} (the first W of them), wrk on {layout['load']} "
             f"({len(layout['load'])} threads, {c['connections']} connections, closed loop), the stand-in (nginx, "
             f"{c['standin_ports']} ports as {c['standin_ports']} shards, {len(layout['standin'])} workers) on "
             f"{layout['standin']}. The stand-in answers what a real tritonserver answered for `work` at "
             f"{WORK_MS} ms (recorded at the start); it does no inference. {c['rounds']} round(s) of {c['seconds']} s "
             "per cell, gateway and nginx alternating; req/s counts 2xx only (median of rounds).", "",
             "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'NO'} |" for t in r["targets"]]
    lines += ["", "## Peak 2xx req/s", "",
              "| workers | proxy cpus | gateway | nginx | gateway/nginx | efficiency gateway | efficiency nginx | "
              "gateway CPU us/req | nginx CPU us/req | non-2xx (g/n) |", "|---" * 10 + "|"]
    for w, v in r["workers"].items():
        lines.append(f"| {w} | {v['proxy_cpus']} | {v['gateway']['ok_rps']:.0f} | {v['nginx']['ok_rps']:.0f} | "
                     f"{v['gateway']['ok_rps'] / max(v['nginx']['ok_rps'], 1e-9):.3f} | "
                     f"{r['efficiency']['gateway'][w]} | {r['efficiency']['nginx'][w]} | "
                     f"{v['gateway']['cpu_us_per_request']:.1f} | {v['nginx']['cpu_us_per_request']:.1f} | "
                     f"{v['gateway']['non_2xx']}/{v['nginx']['non_2xx']} |")
    arguments = " ".join(f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in c.items())
    lines += ["", f"Reproduce: `python bench/linearity.py OUT {arguments}` (on the GPU machine: "
              "bench/device/linearity.sh)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="Directory for linearity-<date>.{json,md}.")
    parser.add_argument("--workers", default="1,2,4,8", help="Gateway (and nginx) worker counts, comma-separated.")
    parser.add_argument("--load-cores", type=int, default=4, help="Cores (and wrk threads) of the load generator.")
    parser.add_argument("--standin-ports", type=int, default=4, help="Ports of the stand-in (shards to the proxies).")
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of one wrk run.")
    parser.add_argument("--rounds", type=int, default=2, help="Runs of each proxy per cell (median taken).")
    parser.add_argument("--connections", type=int, default=512, help="wrk connections (both proxies alike).")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if not 1 <= args.seconds <= 60 or not 1 <= args.rounds <= 5 or not 1 <= max(args.workers) <= 64:
        parser.error("bounds: 1 <= seconds <= 60, 1 <= rounds <= 5, 1 <= workers <= 64")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    config = {k: getattr(args, k) for k in ("workers", "load_cores", "standin_ports", "seconds", "rounds",
                                             "connections")}
    layout = core_layout(max(args.workers), args.load_cores)
    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine(), "config": config,
                     "layout": layout, "workers": {}}
    log(f"linearity on {results['machine']['cores']} cores: {config}; cpus {layout}")
    everything = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="cpctl-linearity-") as tmp:
        repository = model_repository(Path(tmp) / "models", 1)
        answers = record_triton(Path(tmp) / "record", repository)
        ports = [free_port() for _ in range(args.standin_ports)]
        os.sched_setaffinity(0, layout["standin"])
        standin = start_standin(Path(tmp) / "standin", answers, ports, len(layout["standin"]))
        try:
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
            lua = wrk_script(Path(tmp) / "work.lua", json.dumps(work_body({"work_ms": WORK_MS})), headers,
                             count_statuses=False)
            for workers in args.workers:
                results["workers"][str(workers)] = measure(workers, args, layout, repository, ports,
                                                           Path(tmp) / f"w{workers}", lua, log)
        finally:
            standin.stop(grace_s=2)
            os.sched_setaffinity(0, everything)
    results["efficiency"] = {s: efficiency(results["workers"], s) for s in ("gateway", "nginx")}
    results["targets"] = linearity_targets(results)
    save(results, args.out / f"linearity-{results['date']}", markdown(results), log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
