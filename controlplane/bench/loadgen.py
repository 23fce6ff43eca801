"""Open-loop load generation against any KServe v2 endpoint, and the report of one run.

Requests leave on a schedule (constant rate or Poisson arrivals) whatever the server does, so queueing
shows up in the latencies instead of slowing the sender down (no coordinated omission). Latency is measured
from the *intended* send time. The generator watches itself: it reports the intended and achieved send
rates and its own lag, and flags a run where it fell behind (then the numbers describe the generator).
Every run is bounded in requests and in time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import Field

from controlplane.bench.client import ClientError, HttpClient
from controlplane.spec import StrictModel

MAX_REQUESTS = 200_000
MAX_DURATION_S = 600.0
BEHIND_LAG_S = 0.005  # a send this late (P99) means the generator, not the server, set the pace


class Flow(StrictModel):
    """One part of the traffic mix."""

    name: str = Field(description="Label in the report, usually the priority class.")
    weight: float = Field(gt=0, description="Share of the requests.")
    model: str = Field("work", description="Model to call.")
    priority: str | None = Field(None, description="Sent as x-priority.")
    api_key: str | None = Field(None, description="Sent as Authorization: Bearer.")
    deadline_ms: float = Field(1000, gt=0, description="Deadline sent as x-deadline-ms; goodput counts within it.")
    send_deadline: bool = Field(True, description="Send x-deadline-ms (peers without flow control ignore it).")
    body: dict = Field(default_factory=dict, description="The JSON infer request.")
    binary_body: bytes | None = Field(None, description="A binary infer request (the KServe binary tensor "
                                      "extension) sent instead of `body`, with its `binary_headers`.")
    binary_headers: dict[str, str] = Field(default_factory=dict, description="Headers of `binary_body`, e.g. "
                                           "Inference-Header-Content-Length.")


class Scenario(StrictModel):
    rate: float = Field(gt=0, le=50_000, description="Requests per second offered.")
    duration_s: float = Field(gt=0, le=MAX_DURATION_S, description="How long requests are sent.")
    arrivals: str = Field("poisson", pattern="^(poisson|constant)$")
    flows: list[Flow] = Field(min_length=1)
    timeout_s: float = Field(10.0, gt=0, description="A request unanswered this long counts as a timeout.")
    seed: int = 1


def load_scenario(path: Path) -> Scenario:
    return Scenario.model_validate(yaml.safe_load(path.read_text()))


@dataclass
class Sample:
    flow: str
    status: int  # 0: no HTTP answer (connection error or timeout)
    latency_s: float
    lag_s: float
    deadline_s: float
    reason: str = ""
    sent_s: float = 0.0  # the intended send time, seconds since the run started


@dataclass
class RunReport:
    intended_rate: float
    achieved_rate: float
    duration_s: float
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict:
        lags = sorted(s.lag_s for s in self.samples)
        per_flow = {}
        for name in sorted({s.flow for s in self.samples}):
            per_flow[name] = summarize([s for s in self.samples if s.flow == name], self.duration_s)
        every = summarize(self.samples, self.duration_s)
        lag_p99 = percentile(lags, 99)
        behind = lag_p99 > BEHIND_LAG_S or self.achieved_rate < 0.95 * self.intended_rate
        return {"intended_rate": round(self.intended_rate, 1), "achieved_rate": round(self.achieved_rate, 1),
                "generator_lag_p99_ms": round(lag_p99 * 1000, 3), "generator_fell_behind": behind,
                "all": every, "flows": per_flow}


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def p99(values: list[float]) -> float:
    """The 99th percentile of `values`, in any order."""
    return percentile(sorted(values), 99)


def summarize(samples: list[Sample], duration_s: float) -> dict:
    ok = sorted(s.latency_s for s in samples if 200 <= s.status < 300)
    shed = sorted(s.latency_s for s in samples if s.status == 429)
    good = sum(1 for s in samples if 200 <= s.status < 300 and s.latency_s <= s.deadline_s)
    statuses = Counter(str(s.status) for s in samples)
    return {
        "sent": len(samples),
        "ok": len(ok),
        "goodput_rps": round(good / duration_s, 1) if duration_s else 0.0,
        "ok_p50_ms": ms(percentile(ok, 50)), "ok_p90_ms": ms(percentile(ok, 90)),
        "ok_p99_ms": ms(percentile(ok, 99)), "ok_p999_ms": ms(percentile(ok, 99.9)),
        "shed": len(shed), "shed_p99_ms": ms(percentile(shed, 99)),
        "shed_reasons": dict(Counter(s.reason for s in samples if s.status == 429)),
        "statuses": dict(sorted(statuses.items())),
        "errors_5xx": sum(n for code, n in statuses.items() if code.startswith("5")),
        "no_answer": statuses.get("0", 0),
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def shed_reason(body: bytes) -> str:
    """The gateway's `reason` of a 429 (rate, queue_full, displaced, deadline); "other" from other servers."""
    try:
        return str(json.loads(body).get("reason") or "other")
    except (ValueError, AttributeError):
        return "other"


async def run(scenario: Scenario, urls: list[str], progress: Callable[[int, int], None] | None = None
              ) -> RunReport:
    """Offer `scenario` to the endpoints in `urls` (round robin when several: Triton direct)."""
    rng = random.Random(scenario.seed)
    clients = [HttpClient.for_url(url, timeout_s=scenario.timeout_s) for url in urls]
    total = min(MAX_REQUESTS, int(scenario.rate * scenario.duration_s))
    weights = [f.weight for f in scenario.flows]
    prepared = []
    for flow in scenario.flows:
        headers = {"Content-Type": "application/json"}
        if flow.priority:
            headers["x-priority"] = flow.priority
        if flow.api_key:
            headers["Authorization"] = f"Bearer {flow.api_key}"
        if flow.send_deadline:
            headers["x-deadline-ms"] = str(int(flow.deadline_ms))
        if flow.binary_body is not None:
            headers |= flow.binary_headers
        body = flow.binary_body if flow.binary_body is not None else json.dumps(flow.body).encode()
        prepared.append((flow, f"/v2/models/{flow.model}/infer", body, headers))
    samples: list[Sample] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(index: int, intended: float, started: float) -> None:
        flow, path, body, headers = rng.choices(prepared, weights)[0] if len(prepared) > 1 else prepared[0]
        lag = time.perf_counter() - intended
        client = clients[index % len(clients)]
        try:
            response = await client.request("POST", path, body, headers)
            status, reason = response.status, shed_reason(response.body) if response.status == 429 else ""
        except (ClientError, TimeoutError):
            status, reason = 0, ""
        samples.append(Sample(flow.name, status, time.perf_counter() - intended, lag, flow.deadline_ms / 1000,
                              reason, intended - started))

    # The collector's full passes scan every object of the process (in the suite, all that earlier scenarios left):
    # tens of milliseconds in which nothing is sent. Off for the run; its garbage is bounded by MAX_REQUESTS.
    collecting = gc.isenabled()
    gc.disable()
    try:
        started = time.perf_counter()
        next_send = started
        for index in range(total):
            next_send += rng.expovariate(scenario.rate) if scenario.arrivals == "poisson" else 1.0 / scenario.rate
            delay = next_send - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.get_running_loop().create_task(one(index, next_send, started))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if progress is not None and index % 256 == 0:
                progress(index, total)
        sending_s = time.perf_counter() - started
        if pending:
            await asyncio.wait(pending, timeout=scenario.timeout_s + 1)
        for client in clients:
            client.close()
        if progress is not None:
            progress(total, total)
    finally:
        if collecting:
            gc.enable()
    return RunReport(intended_rate=scenario.rate, achieved_rate=total / sending_s if sending_s else 0.0,
                     duration_s=scenario.duration_s, samples=samples)
