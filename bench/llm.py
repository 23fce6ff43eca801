"""The llm benchmark (issue 12): tokens/s, time to first token and inter-token latency of the 7B example.

Meant for the GPU machine (bench/device/llm.sh runs it there); `--small` runs the same steps on a CPU with the
tiny config and few tokens, to check the script before spending device time. Steps:
  1. a seeded checkpoint (examples/llm/make_checkpoint.py; 7b in bfloat16, or tiny with --small);
  2. the baseline: single-process transformers `generate` on the same device, the requests one at a time;
  3. `cpctl up` of a generated spec per setup: the whole model as 1 stage shard, and 4 stage shards (on one
     GPU without MIG: the card's MIG mode is never changed here), each behind the gateway's `pipelines`;
     closed-loop streaming clients (`/generate_stream`) at each `--concurrency`, recording time to first token,
     every inter-token gap, and the aggregate tokens/s;
  4. mixed priority on the 4-shard setup: critical sequences alone, then the same critical load beside
     standard sequences at `--overload` x the concurrency that setup served best; critical TTFT P99 and 5xx.
Writes OUT/llm-<date>.{json,md} after every step, with `targets` (issue 12).

    python bench/llm.py OUT [--small] [--concurrency 1,8,32,64] [--tokens 128] [--requests-per-client 4]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.llm.pipeline import encode  # noqa: E402
from controlplane.procs import ManagedProcess  # noqa: E402

API_KEY = "cp-demo-key"  # the demo tenant of examples/llm/cluster.yaml
PROMPT = "Serving a seven billion parameter model split into four pipeline stages. " * 2


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def summary(ttfts: list[float], gaps: list[float], tokens: int, seconds: float, statuses: dict) -> dict:
    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1e3, 2)

    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": ms(ttfts, 0.5), "ttft_p99_ms": ms(ttfts, 0.99),
            "itl_p50_ms": ms(gaps, 0.5), "itl_p99_ms": ms(gaps, 0.99), "statuses": statuses}


# --- 2. the baseline ---------------------------------------------------------------------------------------------
def baseline(checkpoint: Path, device: str, dtype: str, requests: int, tokens: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).to(device).eval()
    prompt = torch.tensor([encode(PROMPT)], device=device)

    def generate(new_tokens: int) -> None:
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()

    generate(2)  # warm-up
    ttfts, gaps, started = [], [], time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        generate(1)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        generate(tokens)
        total = time.perf_counter() - t1
        ttfts.append(ttft)
        gaps.append((total - ttft) / max(1, tokens - 1))
    # the requests one at a time: the TTFT runs are measurement, not service; count the full generations only
    seconds = time.perf_counter() - started - sum(ttfts)
    return summary(ttfts, gaps, requests * tokens, seconds, {"200": requests})


# --- 3. served -------------------------------------------------------------------------------------------------
def spec_text(stages: int, checkpoint: Path, repository: Path, gpu: bool, max_tokens: int) -> str:
    names = [f"llm_{k}of{stages}" for k in range(1, stages + 1)]
    spec = yaml.safe_load((ROOT / "examples" / "llm" / "cluster.yaml").read_text())
    spec["cluster"] = f"llm-bench-{stages}"
    spec["model_repository"] = str(repository)
    spec["node_pools"][0].pop("mig")  # MIG mode is never changed here: the stages share the whole GPU
    if not gpu:
        spec["node_pools"][0]["gpu"] = {"model": "none", "per_node": 0}
    spec["models"] = [{"name": n, "path": "llm_stage", "memory_mb": 1024, "max_batch": 64} for n in names]
    spec["shards"] = [{"name": f"llm-stage{k + 1}", "models": [n], **({"gpu": 0} if gpu else {})}
                      for k, n in enumerate(names)]
    spec["pipelines"] = [{**spec["pipelines"][0], "stages": names, "max_tokens": max_tokens}]
    spec["gateway"]["port"] = 0
    return yaml.safe_dump(spec, sort_keys=False)


def stage_repository(target: Path, checkpoint: Path) -> Path:
    import shutil

    shutil.copytree(ROOT / "examples" / "models" / "llm_stage", target / "llm_stage")
    config = target / "llm_stage" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "checkpoint"', f'string_value: "{checkpoint}"'))
    return target


class Served:
    """`cpctl up` of a spec, as a user runs it; stopped with Ctrl-C."""

    def __init__(self, spec: Path, run_dir: Path, timeout_s: float) -> None:
        env = {**os.environ, "CPCTL_RUN_DIR": str(run_dir)}
        self.state_file = run_dir / yaml.safe_load(spec.read_text())["cluster"] / "state.json"
        self.process = ManagedProcess([sys.executable, "-m", "controlplane.cli", "up", "-f", str(spec), "--port", "0"],
                                      env=env, log_path=run_dir / "cpctl.log", cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cpctl up did not serve: {self.process.log_tail()}")
            time.sleep(0.5)

    def ready(self) -> bool:
        if not self.state_file.exists():
            return False
        state = json.loads(self.state_file.read_text())
        return all(s["state"] == "ready" for s in state["shards"])

    @property
    def address(self) -> str:
        return json.loads(self.state_file.read_text())["gateway"].removeprefix("http://")

    def stop(self) -> None:
        self.process.popen.send_signal(2)
        try:
            self.process.popen.wait(timeout=60)
        finally:
            self.process.stop(grace_s=5)


def stream_once(address: str, tokens: int, priority: str) -> tuple[int, float | None, list[float], int]:
    """One /generate_stream: status, time to first token, the gaps between tokens, tokens received."""
    connection = http.client.HTTPConnection(address, timeout=300)
    started = time.perf_counter()
    connection.request("POST", "/v2/models/llm/generate_stream",
                       body=json.dumps({"text_input": PROMPT, "max_tokens": tokens}),
                       headers={"authorization": f"Bearer {API_KEY}", "x-priority": priority})
    response = connection.getresponse()
    if response.status != 200:
        response.read()
        connection.close()
        return response.status, None, [], 0
    arrivals = []
    for line in response:
        if line.startswith(b"data: ") and b'"token_id"' in line:
            arrivals.append(time.perf_counter())
    connection.close()
    if not arrivals:
        return 200, None, [], 0
    return 200, arrivals[0] - started, [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], len(arrivals)


def closed_loop(address: str, clients: int, per_client: int, tokens: int, priority: str) -> dict:
    ttfts, gaps, statuses, received = [], [], {}, [0]
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_client):
            status, ttft, between, count = stream_once(address, tokens, priority)
            with lock:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                received[0] += count
                if ttft is not None:
                    ttfts.append(ttft)
                gaps.extend(between)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1800)
    return summary(ttfts, gaps, received[0], time.perf_counter() - started, statuses)


def mixed(address: str, critical_clients: int, standard_clients: int, per_client: int, tokens: int) -> dict:
    results: dict = {}

    def run(name: str, clients: int, priority: str) -> None:
        results[name] = closed_loop(address, clients, per_client, tokens, priority)

    background = threading.Thread(target=run, args=("standard", standard_clients, "standard"))
    background.start()
    time.sleep(1.0)  # the standard flood is under way before critical sequences arrive
    run("critical", critical_clients, "critical")
    background.join(timeout=1800)
    return results


# --- the report --------------------------------------------------------------------------------------------------
def targets(results: dict, reference_concurrency: int) -> list[dict]:
    found = []
    four = results.get("served", {}).get("4", {}).get(str(reference_concurrency))
    one = results.get("served", {}).get("1", {}).get(str(reference_concurrency))
    base = results.get("baseline")
    if four and base:
        value = four["tokens_per_s"] / base["tokens_per_s"]
        found.append({"name": f"4 shards, {reference_concurrency} sequences: tokens/s over the baseline",
                      "value": round(value, 2), "target": 4.0, "met": value >= 4.0})
    if four and one:
        value = four["tokens_per_s"] / one["tokens_per_s"]
        found.append({"name": f"4 shards over 1 shard at {reference_concurrency} sequences, tokens/s",
                      "value": round(value, 2), "target": 0.8, "met": value >= 0.8})
    overload = results.get("overload")
    if overload:
        alone, loaded = overload["critical_alone"]["ttft_p99_ms"], overload["mixed"]["critical"]["ttft_p99_ms"]
        value = loaded / alone if alone else float("inf")
        found.append({"name": "critical TTFT P99 under overload over alone", "value": round(value, 2),
                      "target": 1.5, "met": value <= 1.5})
        errors = sum(n for part in (overload["mixed"]["critical"], overload["mixed"]["standard"])
                     for status, n in part["statuses"].items() if status.startswith("5"))
        found.append({"name": "5xx under overload", "value": errors, "target": 0, "met": errors == 0})
    return found


def write(out: Path, results: dict, reference_concurrency: int) -> None:
    results["targets"] = targets(results, reference_concurrency)
    name = f"llm-{results['date']}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# llm benchmark ({results['date']}, {results['device']}, config {results['config']})", "",
             "| setup | sequences | tokens/s | TTFT P50 ms | TTFT P99 ms | ITL P50 ms | ITL P99 ms | statuses |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("baseline (transformers, one at a time)", "1", results["baseline"])] if "baseline" in results else []
    for stages, levels in results.get("served", {}).items():
        rows += [(f"{stages} shard(s) via the gateway", c, r) for c, r in levels.items()]
    for label, clients, r in rows:
        lines.append(f"| {label} | {clients} | {r['tokens_per_s']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | "
                     f"{r['itl_p50_ms']} | {r['itl_p99_ms']} | {r['statuses']} |")
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {t['met']} |" for t in results["targets"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--small", action="store_true", help="tiny config, CPU-sized load (checks the script)")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--overload", type=float, default=3.0)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    levels = [int(c) for c in args.concurrency.split(",")]
    config, dtype = ("tiny", "float32") if args.small else ("7b", "bfloat16" if gpu else "float32")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": datetime.date.today().isoformat(), "config": config, "tokens": args.tokens,
                     "device": torch.cuda.get_device_name(0) if gpu else "cpu", "served": {}}
    reference = 32 if 32 in levels else levels[-1]
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        checkpoint = work / "checkpoint"
        log(f"1. checkpoint {config} ({dtype})")
        subprocess.run([sys.executable, str(ROOT / "examples" / "llm" / "make_checkpoint.py"), "--config", config,
                        "--dtype", dtype, "--out", str(checkpoint)], check=True)
        log("2. baseline")
        results["baseline"] = baseline(checkpoint, "cuda" if gpu else "cpu", dtype, args.requests_per_client,
                                       args.tokens)
        write(args.out, results, reference)
        repository = stage_repository(work / "models", checkpoint)
        for stages in (1, 4):
            log(f"3. {stages} stage shard(s)")
            spec = work / f"llm-{stages}.yaml"
            spec.write_text(spec_text(stages, checkpoint, repository, gpu, args.tokens))
            run_dir = work / f"run-{stages}"
            run_dir.mkdir()
            served = Served(spec, run_dir, args.start_timeout_s)
            try:
                closed_loop(served.address, 1, 1, 4, "standard")  # warm-up, unrecorded
                results["served"][str(stages)] = {}
                for clients in levels:
                    results["served"][str(stages)][str(clients)] = closed_loop(
                        served.address, clients, args.requests_per_client, args.tokens, "standard")
                    write(args.out, results, reference)
                if stages == 4:
                    log("4. mixed priority overload")
                    critical = max(1, levels[0])
                    alone = closed_loop(served.address, critical, args.requests_per_client, args.tokens, "critical")
                    standard = max(1, int(args.overload * reference))
                    results["overload"] = {"critical_clients": critical, "standard_clients": standard,
                                           "critical_alone": alone,
                                           "mixed": mixed(served.address, critical, standard,
                                                          args.requests_per_client, args.tokens)}
                    write(args.out, results, reference)
            finally:
                served.stop()
    log(f"done: {args.out}")


if __name__ == "__main__":
    main()
