"""The search: each point is loaded into the running Triton server as a config override (the repository API's
load with a `config` parameter; the server must run with explicit model control, as cpctl's shards do), then
offered the same open-loop load (controlplane.bench.loadgen); the best point has the most goodput (answers
within the P99 target) among those whose P99 meets the target with no 5xx.

The seed's per-GPU starting points are the reference the result is reported against: A100 batch 64 FP16,
H100 batch 128 FP8, any other GPU batch 32 FP32.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from controlplane.bench.client import ClientError, HttpClient
from controlplane.bench.loadgen import Flow, Scenario, run

SEED_DEFAULTS = {"A100": (64, "fp16"), "H100": (128, "fp8")}
OTHER_DEFAULT = (32, "fp32")
# What a config override keeps of the served config: the rest (Triton's filled-in defaults) fails to load back.
KEPT_FIELDS = ("name", "platform", "backend", "max_batch_size", "input", "output", "instance_group",
               "dynamic_batching", "parameters", "model_transaction_policy", "default_model_filename")
READY_TIMEOUT_S = 120.0


class TuneError(RuntimeError):
    """The server refused a point or cannot be reached: the message says which and why."""


def seed_default(gpu: str) -> tuple[int, str]:
    """(max batch, precision) the seed starts from on this GPU (an nvidia-smi name such as 'NVIDIA H100 80GB')."""
    return next((default for name, default in SEED_DEFAULTS.items() if name in gpu.upper()), OTHER_DEFAULT)


@dataclass(frozen=True)
class Point:
    model: str  # the variant served (each precision is its own model)
    max_batch: int
    queue_delay_us: int
    instances: int


@dataclass
class Measured:
    point: Point
    goodput_rps: float
    p99_ms: float
    sent: int
    ok: int
    errors_5xx: int
    meets_target: bool


def points(models: list[str], batches: list[int], delays: list[int], instances: list[int]) -> list[Point]:
    return [Point(*values) for values in itertools.product(models, batches, delays, instances)]


def loadable(served: dict) -> dict:
    """The part of a served config that loads back as an override: the fields a config file would set."""
    config = {k: copy.deepcopy(v) for k, v in served.items() if k in KEPT_FIELDS}
    batching = config.get("dynamic_batching")
    if batching is not None and not batching.get("priority_queue_policy"):
        batching.pop("priority_queue_policy", None)
    config["instance_group"] = [{k: v for k, v in group.items() if k in ("kind", "count") or (k == "gpus" and v)}
                                for group in config.get("instance_group") or [{"count": 1}]]
    return config


def override(served: dict, point: Point) -> dict:
    """The served config changed to `point` (preferred batch sizes above the new max are dropped)."""
    config = loadable(served)
    config["max_batch_size"] = point.max_batch
    batching = config.setdefault("dynamic_batching", {})
    batching["max_queue_delay_microseconds"] = point.queue_delay_us
    batching["preferred_batch_size"] = [b for b in batching.get("preferred_batch_size", []) if b <= point.max_batch]
    config["instance_group"] = [config["instance_group"][0] | {"count": point.instances}]
    return config


def example_request(metadata: dict, batch: int = 1) -> dict:
    """A JSON infer request of `batch` rows built from a model's metadata (variable dims of 4)."""
    inputs = []
    for i, tensor in enumerate(metadata["inputs"]):
        shape = [batch if j == 0 else (4 if d < 0 else d) for j, d in enumerate(int(d) for d in tensor["shape"])]
        count = 1
        for d in shape:
            count *= d
        if tensor["datatype"] == "BYTES":
            data = ["cpctl tune"] * count
        elif tensor["datatype"] == "BOOL":
            data = [j % 2 == 0 for j in range(count)]
        elif tensor["datatype"].startswith(("FP", "BF")):
            data = [round((j % 7) / 7 * (i + 1), 3) for j in range(count)]
        else:
            data = [j % 7 for j in range(count)]
        inputs.append({"name": tensor["name"], "shape": shape, "datatype": tensor["datatype"], "data": data})
    return {"inputs": inputs}


def best(results: list[Measured]) -> Measured | None:
    meeting = [r for r in results if r.meets_target]
    return max(meeting, key=lambda r: (r.goodput_rps, -r.p99_ms)) if meeting else None  # ties: the lower P99


async def get_json(client: HttpClient, path: str) -> dict:
    return json.loads((await _request(client, "GET", path)).body)


async def load(client: HttpClient, model: str, config: dict) -> None:
    """Load `config` for `model` and wait until it is ready."""
    body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
    await _request(client, "POST", f"/v2/repository/models/{model}/load", body)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (await client.request("GET", f"/v2/models/{model}/ready")).status != 200:
        if time.monotonic() > deadline:
            raise TuneError(f"{model} not ready {READY_TIMEOUT_S:.0f} s after loading a new config")
        await asyncio.sleep(0.1)


async def measure(url: str, point: Point, body: dict, rate: float, seconds: float, p99_ms: float) -> Measured:
    flow = Flow(name="tune", weight=1, model=point.model, deadline_ms=p99_ms, send_deadline=False, body=body)
    summary = (await run(Scenario(rate=rate, duration_s=seconds, flows=[flow], timeout_s=max(5.0, p99_ms / 100)),
                         [url])).summary()["all"]
    return Measured(point, summary["goodput_rps"], summary["ok_p99_ms"], summary["sent"], summary["ok"],
                    summary["errors_5xx"], summary["ok"] > 0 and summary["ok_p99_ms"] <= p99_ms
                    and summary["errors_5xx"] == 0 and summary["ok"] >= 0.99 * summary["sent"])


async def search(url: str, candidates: list[Point], body: dict, rate: float, seconds: float, p99_ms: float,
                 progress: Callable[[Measured], None] | None = None) -> tuple[list[Measured], dict[str, dict]]:
    """Measure every point; every tuned model is put back to its served config at the end.

    Returns the measurements and the served configs (by model) the points were derived from."""
    client = HttpClient.for_url(url, timeout_s=60)
    served: dict[str, dict] = {}
    results = []
    try:
        for model in dict.fromkeys(p.model for p in candidates):
            served[model] = await get_json(client, f"/v2/models/{model}/config")
        for point in candidates:
            await load(client, point.model, override(served[point.model], point))
            results.append(await measure(url, point, body, rate, seconds, p99_ms))
            if progress is not None:
                progress(results[-1])
    finally:
        for model, config in served.items():
            await load(client, model, loadable(config))
        client.close()
    return results, served


async def _request(client: HttpClient, method: str, path: str, body: bytes = b""):
    try:
        response = await client.request(method, path, body, {"Content-Type": "application/json"} if body else None)
    except (ClientError, TimeoutError) as exc:
        raise TuneError(f"{method} {path}: {exc}") from None
    if response.status != 200:
        raise TuneError(f"{method} {path}: HTTP {response.status} {response.body[:300].decode(errors='replace')}")
    return response


def as_row(measured: Measured) -> dict:
    return asdict(measured.point) | {k: v for k, v in asdict(measured).items() if k != "point"}
