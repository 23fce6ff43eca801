"""The llm benchmark (issue 12): tokens/s, time to first token and inter-token latency of the 7B example.

Meant for the GPU machine (bench/device/llm.sh runs it there); `--small` runs the same steps on a CPU with the
tiny config and few tokens, to check the script before spending device time. Parts (`--parts`, in that order):
  checkpoint  always: a seeded checkpoint (examples/llm/make_checkpoint.py; 7b in bfloat16 initialised on the
              GPU, or tiny with --small), read by the real loading code of every stage;
  baseline    single-process transformers `generate` on the same device: a batch of N identical prompts at
              each concurrency N (N=1: the requests one at a time), timed token by token through a streamer;
  shards4     `cpctl up` of a generated spec with 4 stage shards on one GPU (MIG mode is never changed here:
              the stages share the whole card) behind the gateway's `pipelines` (one gateway worker); closed-
              loop streaming clients (`/generate_stream`) at each `--concurrency`, recording time to first
              token, every inter-token gap, aggregate tokens/s, and each stage's Triton statistics (batches
              formed, queue and compute time) for the profile;
  overload    on the 4-shard setup, `--rounds` rounds pooled: critical sequences alone, then the same critical
              load beside a standard flood of `--overload` x the reference concurrency (32) closed-loop clients,
              once per `--variants` setting (each its own pipeline over the same stages). Critical
              sequences arrive open loop (`--critical-rate` a second for `--phase-s`, `--critical-tokens` each);
              the flood fills the pipeline first (`--fill-s`), a shed (429) client waits its Retry-After before it
              asks again, and the flood's clients leave mid-stream when the phase ends. Critical TTFT P50/P90/P99
              and the sample count, 5xx, and per phase each stage's Triton statistics and the gateway's step gate;
  shards1     the same levels with the whole model as 1 stage shard.
Writes OUT/llm-<date>.{json,md} after every step, with `targets` (issue 12). `--merge FILE` starts from an
earlier run's JSON (a benchmark split over two device calls).

    python bench/llm.py OUT [--small] [--parts baseline,shards4,overload,shards1] [--concurrency 1,8,32,64]
                            [--tokens 64] [--requests-per-client 2] [--max-steps-per-stage N] [--merge FILE]
                            [--rounds 4] [--phase-s 13] [--critical-rate 2] [--critical-tokens 16]
                            [--variants off,0,0+batch]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.llm.pipeline import encode  # noqa: E402
from controlplane.procs import ManagedProcess  # noqa: E402

API_KEY = "cp-demo-key"  # the demo tenant of examples/llm/cluster.yaml
PROMPT = "Serving a seven billion parameter model split into four pipeline stages. " * 2
PARTS = ("baseline", "shards4", "overload", "shards1")
REFERENCE_CONCURRENCY = 32  # the issue's targets are read at 32 sequences
# The bench's pipeline: 64 places for standard sequences (every level runs unshed) plus 8 kept for critical
PIPELINE_PLACES, TOP_CLASS_RESERVE = 72, 8
# The stages' own bound (and their batch: every waiting step joins the next one) stays above the gateway's
STAGE_MAX_SEQUENCES = 128
SHED_WAIT_S = 1.0  # what the gateway's Retry-After asks of a refused client


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: of 100 values the P99 is the 99th, not the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q) - 1)] if ordered else float("nan")


def summary(ttfts: list[float], gaps: list[float], tokens: int, seconds: float, statuses: dict) -> dict:
    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1e3, 2)

    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": ms(ttfts, 0.5), "ttft_p90_ms": ms(ttfts, 0.9), "ttft_p99_ms": ms(ttfts, 0.99),
            "itl_p50_ms": ms(gaps, 0.5), "itl_p99_ms": ms(gaps, 0.99),
            "itl_mean_ms": round(sum(gaps) / len(gaps) * 1e3, 2) if gaps else float("nan"),
            "sequences": len(ttfts), "statuses": statuses}


# --- the baseline ------------------------------------------------------------------------------------------------
def baseline(checkpoint: Path, device: str, dtype: str, levels: list[int], requests: int, tokens: int) -> dict:
    """transformers `generate`, one process, a batch of `level` identical prompts (no padding) per level."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class TokenTimes(BaseStreamer):
        """When each new token of the batch exists (generate hands the prompt first, then a token per step)."""

        def __init__(self) -> None:
            self.prompt_seen, self.times = False, []

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())  # value came to the CPU: the step is done
            self.prompt_seen = True

        def end(self) -> None:
            pass

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).to(device).eval()
    prompt = encode(PROMPT)

    def generate(batch: int, new_tokens: int) -> tuple[float, list[float]]:
        ids = torch.tensor([prompt] * batch, device=device)
        times = TokenTimes()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=times)
        return started, times.times

    generate(1, 2)  # warm-up
    results = {}
    for level in levels:
        ttfts, gaps, seconds = [], [], 0.0
        for _ in range(requests):
            started, times = generate(level, tokens)
            ttfts += [times[0] - started] * level
            gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
            seconds += times[-1] - started
        results[str(level)] = summary(ttfts, gaps, level * tokens * requests, seconds, {"200": level * requests})
        log(f"   baseline {level}: {results[str(level)]['tokens_per_s']} tokens/s")
    return results


# --- served ----------------------------------------------------------------------------------------------------
def spec_text(stages: int, repository: Path, gpu: bool, max_tokens: int, max_steps_per_stage: int = 0,
              variants: tuple[str, ...] = ()) -> str:
    """The bench's spec: pipeline `llm` (the example's step gate settings), and one more per setting the overload
    compares (`overload_pipeline`), all over the same stage shards."""
    names = [f"llm_{k}of{stages}" for k in range(1, stages + 1)]
    spec = yaml.safe_load((ROOT / "examples" / "llm" / "cluster.yaml").read_text())
    spec["cluster"] = f"llm-bench-{stages}"
    spec["model_repository"] = str(repository)
    spec["node_pools"][0].pop("mig")  # MIG mode is never changed here: the stages share the whole GPU
    if not gpu:
        spec["node_pools"][0]["gpu"] = {"model": "none", "per_node": 0}
    spec["models"] = [{"name": n, "path": "llm_stage", "memory_mb": 1024, "max_batch": STAGE_MAX_SEQUENCES}
                      for n in names]
    spec["shards"] = [{"name": f"llm-stage{k + 1}", "models": [n], **({"gpu": 0} if gpu else {})}
                      for k, n in enumerate(names)]
    pipeline = {**spec["pipelines"][0], "stages": names, "max_tokens": max_tokens, "max_sequences": PIPELINE_PLACES,
                "reserved_for_top_class": TOP_CLASS_RESERVE, "max_steps_per_stage": max_steps_per_stage}
    spec["pipelines"] = [pipeline] + [{**pipeline, "name": overload_pipeline(variant), **variant_settings(variant)}
                                      for variant in variants]
    # One worker holds all the places: with several, the clients' connections split unevenly between workers
    # and a worker's share sheds before the pipeline is full.
    spec["gateway"].update(port=0, workers=1)
    return yaml.safe_dump(spec, sort_keys=False)


def stage_repository(target: Path, checkpoint: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "models" / "llm_stage", target / "llm_stage",
                    ignore=shutil.ignore_patterns("__pycache__", "checkpoint"))
    config = target / "llm_stage" / "config.pbtxt"
    text = config.read_text().replace('string_value: "checkpoint"', f'string_value: "{checkpoint}"')
    text = text.replace('{ key: "max_sequences", value: { string_value: "64" } }',
                        f'{{ key: "max_sequences", value: {{ string_value: "{STAGE_MAX_SEQUENCES}" }} }}')
    text = text.replace("max_batch_size: 64", f"max_batch_size: {STAGE_MAX_SEQUENCES}")
    config.write_text(text)
    return target


class Served:
    """`cpctl up` of a spec, as a user runs it; stopped with Ctrl-C."""

    def __init__(self, spec: Path, run_dir: Path, timeout_s: float) -> None:
        env = {**os.environ, "CPCTL_RUN_DIR": str(run_dir)}
        self.state_file = run_dir / yaml.safe_load(spec.read_text())["cluster"] / "state.json"
        self.process = ManagedProcess([sys.executable, "-m", "controlplane.cli", "up", "-f", str(spec), "--port", "0",
                                       "--ready-timeout", str(timeout_s)],
                                      env=env, log_path=run_dir / "cpctl.log", cwd=ROOT)
        deadline = time.monotonic() + timeout_s + 30
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cpctl up did not serve: {self.process.log_tail()}")
            time.sleep(0.5)

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def ready(self) -> bool:
        if not self.state_file.exists():
            return False
        shards = self.state()["shards"]
        return bool(shards) and all(s["state"] == "ready" for s in shards)

    @property
    def address(self) -> str:
        return self.state()["gateway"].removeprefix("http://")

    def stage_stats(self) -> dict[str, dict]:
        """Each stage model's Triton statistics (cumulative): requests, batches, queue and compute time."""
        found = {}
        for shard in self.state()["shards"]:
            for model in shard["models"]:
                with urllib.request.urlopen(f"{shard['url']}/v2/models/{model}/stats", timeout=10) as answer:
                    stats = json.load(answer)["model_stats"][0]
                inference = stats["inference_stats"]
                found[model] = {"requests": stats["inference_count"], "batches": stats["execution_count"],
                                "success_ns": inference["success"]["ns"], "queue_ns": inference["queue"]["ns"],
                                "compute_ns": inference["compute_infer"]["ns"]}
        return found

    def stop(self) -> None:
        self.process.popen.send_signal(2)
        try:
            self.process.popen.wait(timeout=60)
        finally:
            self.process.stop(grace_s=5)


def stage_profile(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per stage over one run: steps, batches, mean batch size, mean queue wait and batch compute per step."""
    profile = {}
    for model, end in after.items():
        delta = {key: end[key] - before.get(model, {}).get(key, 0) for key in end}
        steps, batches = delta["requests"], max(1, delta["batches"])
        per_step = max(1, steps)
        profile[model] = {"steps": steps, "batches": delta["batches"], "mean_batch": round(steps / batches, 2),
                          "queue_ms": round(delta["queue_ns"] / per_step / 1e6, 3),
                          "compute_ms": round(delta["compute_ns"] / per_step / 1e6, 3),  # a step's batch time
                          "in_server_ms": round(delta["success_ns"] / per_step / 1e6, 3)}
    return profile


def variant_settings(variant: str) -> dict:
    """A compared setting of the pipeline's step gate: `off` (none) or `N` (urgent_steps_per_stage N), then
    `+batch` (one_batch_per_stage) and `+stage` (one_stage_at_a_time), e.g. `0+batch+stage`."""
    urgent, *extras = variant.split("+")
    if not (urgent == "off" or urgent.isdigit()) or not set(extras) <= {"batch", "stage"} \
            or len(set(extras)) < len(extras):
        raise ValueError(f"variant '{variant}': expected off or N, then +batch and/or +stage")
    return {"urgent_steps_per_stage": None if urgent == "off" else int(urgent),
            "one_batch_per_stage": "batch" in extras, "one_stage_at_a_time": "stage" in extras}


def overload_pipeline(variant: str) -> str:
    return "llm_" + variant.replace("+", "_")


def stream_once(address: str, tokens: int, priority: str, pipeline: str = "llm",
                stop: threading.Event | None = None) -> tuple[int, float | None, list[float], int]:
    """One /generate_stream: status, time to first token, the gaps between tokens, tokens received. With `stop`,
    the client leaves mid-stream once it is set (the gateway then releases the sequence)."""
    connection = http.client.HTTPConnection(address, timeout=300)
    started = time.perf_counter()
    connection.request("POST", f"/v2/models/{pipeline}/generate_stream",
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
        if stop is not None and stop.is_set():
            break
    connection.close()
    if not arrivals:
        return 200, None, [], 0
    return 200, arrivals[0] - started, [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], len(arrivals)


class Tally:
    """Streams' outcomes, pooled (over clients, rounds): TTFTs, inter-token gaps, tokens, statuses, seconds."""

    def __init__(self) -> None:
        self.ttfts: list[float] = []
        self.gaps: list[float] = []
        self.statuses: dict[str, int] = {}
        self.tokens, self.seconds = 0, 0.0
        self.lock = threading.Lock()

    def add(self, status: int, ttft: float | None, gaps: list[float], count: int) -> None:
        with self.lock:
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            self.tokens += count
            if ttft is not None:
                self.ttfts.append(ttft)
            self.gaps.extend(gaps)

    def summary(self) -> dict:
        return summary(self.ttfts, self.gaps, self.tokens, self.seconds, self.statuses)


def closed_loop(address: str, clients: int, per_client: int, tokens: int, priority: str,
                stop: threading.Event | None = None, pipeline: str = "llm", tally: Tally | None = None) -> dict:
    """`clients` threads, each streaming `per_client` sequences one after another (or, with `stop`, until it is
    set, at most `per_client`, leaving a stream when it is); a refused client waits SHED_WAIT_S before asking again."""
    tally = tally or Tally()
    pause = stop or threading.Event()

    def client() -> None:
        for _ in range(per_client):
            if pause.is_set():
                return
            status, ttft, between, count = stream_once(address, tokens, priority, pipeline, stop)
            tally.add(status, ttft, between, count)
            if status != 200:  # a refusal (429 shed, 503 at a saturated gateway's accept): its Retry-After
                pause.wait(SHED_WAIT_S)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1800)
    tally.seconds += time.perf_counter() - started
    return tally.summary()


def open_loop(address: str, rate: float, count: int, tokens: int, priority: str, pipeline: str,
              tally: Tally) -> None:
    """`count` sequences arriving `1 / rate` s apart whatever the answers (open loop), each on its own thread;
    returns when all have ended."""
    threads, started = [], time.perf_counter()
    for index in range(count):
        time.sleep(max(0.0, started + index / rate - time.perf_counter()))
        thread = threading.Thread(target=lambda: tally.add(*stream_once(address, tokens, priority, pipeline)))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(timeout=600)
    tally.seconds += time.perf_counter() - started


def gate_counters(address: str) -> dict[str, list[float]]:
    """The gateway's step gate counters (cp_pipeline_steps*): "pipeline/class" -> [steps, held, seconds waited]."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        lines = answer.read().decode().splitlines()
    found: dict[str, list[float]] = {}
    for index, metric in enumerate(("cp_pipeline_steps_total{", "cp_pipeline_steps_held_total{",
                                    "cp_pipeline_gate_wait_seconds_total{")):
        for line in lines:
            if line.startswith(metric):
                labels = dict(part.split("=") for part in line[len(metric):line.index("}")].split(","))
                key = f"{labels['pipeline'].strip(chr(34))}/{labels['class'].strip(chr(34))}"
                found.setdefault(key, [0.0, 0.0, 0.0])[index] = float(line.rsplit(" ", 1)[1])
    return found


class Phase:
    """One kind of phase of the overload, pooled over its rounds: the critical streams, the flood's, and what
    each stage (Triton's statistics) and the gateway's step gate saw while it ran."""

    def __init__(self) -> None:
        self.critical, self.flood = Tally(), Tally()
        self.stage_totals: dict[str, dict[str, int]] = {}
        self.gate_totals: dict[str, list[float]] = {}

    def measure(self, served: Served, run) -> None:  # noqa: ANN001 - the phase's body
        stages, gate = served.stage_stats(), gate_counters(served.address)
        run()
        for model, end in served.stage_stats().items():
            total = self.stage_totals.setdefault(model, dict.fromkeys(end, 0))
            for key in end:
                total[key] += end[key] - stages[model][key]
        for key, end in gate_counters(served.address).items():
            total = self.gate_totals.setdefault(key, [0.0, 0.0, 0.0])
            total[:] = [t + e - b for t, e, b in zip(total, end, gate.get(key, [0.0, 0.0, 0.0]), strict=True)]

    def report(self, with_flood: bool) -> dict:
        found = {"critical": self.critical.summary(), "ttft_samples_ms": sorted(round(t * 1e3, 1)
                                                                              for t in self.critical.ttfts),
                 "stages": stage_profile({}, self.stage_totals),
                 "gate": {key: {"steps": int(steps), "held": int(held),
                                "mean_wait_ms": round(waited / held * 1e3, 2) if held else 0.0}
                          for key, (steps, held, waited) in self.gate_totals.items() if steps}}
        if with_flood:
            found["standard"] = self.flood.summary()
        return found


def overload(served: Served, args: argparse.Namespace, variants: tuple[str, ...],
             after_round: Callable[[dict], None]) -> None:
    """Rounds of: critical sequences alone, then the same critical load beside a standard flood once per
    step gate setting (`variant_settings`: its own pipeline over the same stages). Critical sequences arrive open
    loop at `critical_rate` a second, `critical_count` a phase; the flood is `standard_clients` closed-loop clients
    that fill the pipeline first and leave mid-stream at the phase's end. Everything pooled over the rounds, and
    handed to `after_round` after each (a run cut short keeps the rounds it finished)."""
    address, flood_clients = served.address, max(1, int(args.overload * REFERENCE_CONCURRENCY))
    count = max(1, round(args.critical_rate * args.phase_s))
    alone = Phase()
    mixed = {variant: Phase() for variant in variants}
    shipped = overload_pipeline(variants[-1])  # critical traffic alone: the gate holds nothing of it
    for round_index in range(args.rounds):
        alone.measure(served, lambda: open_loop(address, args.critical_rate, count, args.critical_tokens, "critical",
                                                shipped, alone.critical))
        for variant, phase in mixed.items():
            pipeline, stop = overload_pipeline(variant), threading.Event()
            flood = threading.Thread(target=closed_loop, args=(address, flood_clients, 10_000, args.tokens,
                                                               "standard", stop, pipeline, phase.flood))

            def beside_the_flood(pipeline: str = pipeline, phase: Phase = phase, stop: threading.Event = stop,
                                 flood: threading.Thread = flood) -> None:
                flood.start()
                time.sleep(args.fill_s)  # the flood fills the pipeline before critical sequences arrive
                open_loop(address, args.critical_rate, count, args.critical_tokens, "critical", pipeline,
                          phase.critical)
                stop.set()
                flood.join(timeout=600)

            phase.measure(served, beside_the_flood)
        log(f"   overload round {round_index + 1}/{args.rounds}: critical TTFT P99 alone "
            f"{alone.critical.summary()['ttft_p99_ms']} ms, beside the flood "
            + ", ".join(f"{v} {p.critical.summary()['ttft_p99_ms']} ms" for v, p in mixed.items()))
        after_round({"critical_rate_per_s": args.critical_rate, "critical_tokens": args.critical_tokens,
                     "critical_per_phase": count, "rounds": round_index + 1, "standard_clients": flood_clients,
                     "flood_tokens": args.tokens, "alone": alone.report(with_flood=False),
                     "mixed": {variant: {**variant_settings(variant), **phase.report(with_flood=True)}
                               for variant, phase in mixed.items()}})


def serve_levels(served: Served, levels: list[int], per_client: int, tokens: int) -> dict:
    found = {}
    for clients in levels:
        before = served.stage_stats()
        found[str(clients)] = closed_loop(served.address, clients, per_client, tokens, "standard")
        found[str(clients)]["stages"] = stage_profile(before, served.stage_stats())
        log(f"   {clients} sequences: {found[str(clients)]['tokens_per_s']} tokens/s, "
            f"ITL P50 {found[str(clients)]['itl_p50_ms']} ms")
    return found


# --- the report --------------------------------------------------------------------------------------------------
def targets(results: dict) -> list[dict]:
    found = []
    reference = str(REFERENCE_CONCURRENCY)
    four = results.get("served", {}).get("4", {}).get(reference)
    one = results.get("served", {}).get("1", {}).get(reference)
    alone = results.get("baseline", {}).get("1")
    if four and alone:
        value = four["tokens_per_s"] / alone["tokens_per_s"]
        found.append({"name": f"4 shards, {reference} sequences: tokens/s over the baseline one at a time",
                      "value": round(value, 2), "target": 4.0, "met": value >= 4.0})
    if four and one:
        value = four["tokens_per_s"] / one["tokens_per_s"]
        found.append({"name": f"4 shards over 1 shard at {reference} sequences, tokens/s",
                      "value": round(value, 2), "target": 0.8, "met": value >= 0.8})
    load = results.get("overload")
    if load:
        alone_p99 = load["alone"]["critical"]["ttft_p99_ms"]
        for variant, mixed in load["mixed"].items():
            value = mixed["critical"]["ttft_p99_ms"] / alone_p99 if alone_p99 else float("inf")
            found.append({"name": f"critical TTFT P99 under overload over alone, step gate {variant}",
                          "value": round(value, 2), "target": 1.5, "met": value <= 1.5})
        errors = sum(n for mixed in load["mixed"].values() for part in (mixed["critical"], mixed["standard"])
                     for status, n in part["statuses"].items() if status.startswith("5"))
        found.append({"name": "5xx under overload", "value": errors, "target": 0, "met": errors == 0})
    return found


def write(out: Path, results: dict) -> None:
    results["targets"] = targets(results)
    name = f"llm-{results['date']}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# llm benchmark ({results['date']}, {results['device']}, config {results['config']}, "
             f"{results['tokens']} tokens a sequence)", "",
             "| setup | sequences | tokens/s | TTFT P50 ms | TTFT P99 ms | ITL P50 ms | ITL P99 ms | statuses |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("baseline (transformers generate, a batch of N)", c, r) for c, r in results.get("baseline", {}).items()]
    for stages, levels in results.get("served", {}).items():
        rows += [(f"{stages} shard(s) via the gateway", c, r) for c, r in levels.items()]
    for label, clients, r in rows:
        lines.append(f"| {label} | {clients} | {r['tokens_per_s']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | "
                     f"{r['itl_p50_ms']} | {r['itl_p99_ms']} | {r['statuses']} |")
    lines += ["", "Per stage (Triton's statistics over each run): mean batch formed, queue wait and batch compute "
              "per step, ms.", "", "| setup | sequences | stage | steps | mean batch | queue ms | compute ms |",
              "|---|---|---|---|---|---|---|"]
    for stages, levels in results.get("served", {}).items():
        for clients, r in levels.items():
            for model, p in r.get("stages", {}).items():
                lines.append(f"| {stages} shard(s) | {clients} | {model} | {p['steps']} | {p['mean_batch']} | "
                             f"{p['queue_ms']} | {p['compute_ms']} |")
    if results.get("overload"):
        lines += overload_lines(results["overload"])
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {t['met']} |" for t in results["targets"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def overload_lines(load: dict) -> list[str]:
    lines = ["", f"Overload (4 shards): {load['rounds']} rounds, each of critical sequences alone, then beside a "
             f"standard flood of {load['standard_clients']} closed-loop clients ({load['flood_tokens']} tokens) once "
             "per step gate setting (off: none; N: `urgent_steps_per_stage` N; +batch: and "
             "`one_batch_per_stage`; +stage: and `one_stage_at_a_time`); critical sequences arrive open loop, "
             f"{load['critical_rate_per_s']} a second, {load['critical_per_phase']} a phase, "
             f"{load['critical_tokens']} tokens each; every phase pooled over the rounds.", "",
             "| phase | step gate | critical sequences | TTFT P50 ms | TTFT P90 ms | TTFT P99 ms | "
             "ITL P50 ms | ITL P99 ms | critical statuses | flood tokens/s | flood statuses |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    phases = [("critical alone", "-", load["alone"])]
    phases += [("beside the flood", variant, m) for variant, m in load["mixed"].items()]
    for label, gate, phase in phases:
        c, flood = phase["critical"], phase.get("standard")
        lines.append(f"| {label} | {gate} | {c['sequences']} | {c['ttft_p50_ms']} | {c['ttft_p90_ms']} | "
                     f"{c['ttft_p99_ms']} | {c['itl_p50_ms']} | {c['itl_p99_ms']} | {c['statuses']} | "
                     f"{flood['tokens_per_s'] if flood else '-'} | {flood['statuses'] if flood else '-'} |")
    lines += ["", "Per stage in each phase (Triton's statistics, pooled): mean batch, queue wait and batch compute "
              "per step, ms; and the gateway's step gate per class: steps sent, steps held, their mean wait.", "",
              "| phase | step gate | stage | steps | mean batch | queue ms | compute ms |",
              "|---|---|---|---|---|---|---|"]
    for label, gate, phase in phases:
        for model, p in phase["stages"].items():
            lines.append(f"| {label} | {gate} | {model} | {p['steps']} | {p['mean_batch']} | {p['queue_ms']} | "
                         f"{p['compute_ms']} |")
    lines += ["", "| phase | step gate | pipeline/class | steps | held at the gate | mean wait ms |",
              "|---|---|---|---|---|---|"]
    for label, gate, phase in phases:
        for key, g in phase["gate"].items():
            lines.append(f"| {label} | {gate} | {key} | {g['steps']} | {g['held']} | {g['mean_wait_ms']} |")
    return lines


def make_checkpoint(checkpoint: Path, config: str, dtype: str, device: str) -> None:
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "examples" / "llm" / "make_checkpoint.py"), "--config", config,
                    "--dtype", dtype, "--device", device, "--out", str(checkpoint)], check=True)
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    log(f"   checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s")


def run_setup(stages: int, work: Path, repository: Path, gpu: bool, args: argparse.Namespace, levels: list[int],
              results: dict, with_levels: bool, with_overload: bool) -> None:
    spec = work / f"llm-{stages}.yaml"
    spec.write_text(spec_text(stages, repository, gpu, args.tokens, args.max_steps_per_stage,
                              tuple(args.variants.split(","))))
    run_dir = work / f"run-{stages}"
    run_dir.mkdir()
    started = time.perf_counter()
    served = Served(spec, run_dir, args.start_timeout_s)
    log(f"   serving after {time.perf_counter() - started:.1f} s")
    try:
        closed_loop(served.address, 1, 1, 4, "standard")  # warm-up, unrecorded
        if with_levels:
            results["served"][str(stages)] = {}
            for level in levels:
                results["served"][str(stages)].update(serve_levels(served, [level], args.requests_per_client,
                                                                   args.tokens))
                write(args.out, results)
        if with_overload:
            log("   mixed priority overload")

            def keep(load: dict) -> None:
                results["overload"] = load
                write(args.out, results)

            overload(served, args, tuple(args.variants.split(",")), keep)
    finally:
        served.stop()
        keep_logs(run_dir, args.out / f"logs-{stages}")


def keep_logs(run_dir: Path, target: Path) -> None:
    """The stack's logs (cpctl, gateway, each tritonserver) next to the results: the run directory is temporary."""
    target.mkdir(parents=True, exist_ok=True)
    for path in run_dir.rglob("*.log"):
        shutil.copy(path, target / "-".join(path.relative_to(run_dir).parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--small", action="store_true", help="tiny config, CPU-sized load (checks the script)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)} to run")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--overload", type=float, default=3.0, help="the flood's clients over 32")
    parser.add_argument("--rounds", type=int, default=4, help="overload rounds (alone, then each flood), pooled")
    parser.add_argument("--phase-s", type=float, default=13.0, help="seconds of critical arrivals per phase")
    parser.add_argument("--critical-rate", type=float, default=2.0, help="critical sequences a second (open loop)")
    parser.add_argument("--critical-tokens", type=int, default=16)
    parser.add_argument("--fill-s", type=float, default=3.0, help="the flood's head start over critical arrivals")
    parser.add_argument("--variants", default="off,0,0+batch",
                        help="the step gate settings the overload compares (off: none; N: urgent_steps_per_stage N; "
                             "+batch: and one_batch_per_stage; +stage: and one_stage_at_a_time); the last is "
                             "the example's")
    parser.add_argument("--start-timeout-s", type=float, default=180.0)
    parser.add_argument("--max-steps-per-stage", type=int, default=0,
                        help="the pipeline's gate: steps in flight at a stage, the rest wait in class order (0: off)")
    parser.add_argument("--merge", type=Path, help="an earlier run's JSON to add this run's results to")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    try:
        for variant in args.variants.split(","):
            variant_settings(variant)
    except ValueError as error:
        parser.error(f"--variants: {error}")
    import torch

    gpu = torch.cuda.is_available()
    levels = [int(c) for c in args.concurrency.split(",")]
    config, dtype = ("tiny", "float32") if args.small else ("7b", "bfloat16" if gpu else "float32")
    device = "cuda" if gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads(args.merge.read_text()) if args.merge else {}
    results.setdefault("served", {})
    results.update(date=datetime.date.today().isoformat(), config=config, tokens=args.tokens,
                   max_steps_per_stage=args.max_steps_per_stage,
                   device=torch.cuda.get_device_name(0) if gpu else "cpu")
    results.setdefault("runs", []).append({"parts": parts, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())})
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        checkpoint = work / "checkpoint"
        log(f"checkpoint {config} ({dtype}, initialised on {device})")
        make_checkpoint(checkpoint, config, dtype, device)
        if "baseline" in parts:
            log("baseline")
            results["baseline"] = baseline(checkpoint, device, dtype, levels, args.requests_per_client, args.tokens)
            write(args.out, results)
            if gpu:
                torch.cuda.empty_cache()  # the baseline's weights leave the card before the stages load theirs
        repository = stage_repository(work / "models", checkpoint)
        if "shards4" in parts or "overload" in parts:
            log("4 stage shards")
            run_setup(4, work, repository, gpu, args, levels, results, "shards4" in parts, "overload" in parts)
        if "shards1" in parts:
            log("1 stage shard")
            run_setup(1, work, repository, gpu, args, levels, results, True, False)
    log(f"done: {args.out}")


if __name__ == "__main__":
    main()
