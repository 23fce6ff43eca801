"""GPU telemetry, per GPU or MIG instance and per shard: what the gateway's /metrics, `cpctl status` and
`cpctl top` show.

Two sources, both read-only:
- NVML (nvidia-ml-py) on this machine: utilization and memory used/total of every GPU, and the memory of every
  MIG instance (NVML has no utilization per MIG instance: that needs DCGM's profiling metrics, so it is None).
  Where NVML cannot be read (no nvidia-ml-py, no driver, no GPU) the reading says why, in `no_gpu`.
- Each shard's Triton metrics port: Triton's own GPU gauges for the GPUs the shard sees (`nv_gpu_utilization`,
  `nv_gpu_memory_used_bytes`, `nv_gpu_memory_total_bytes`, by `gpu_uuid`), and the CUDA caching allocator's
  reserved and allocated bytes that the Python-backend models report from inside their own process as Triton
  custom metrics (`cp_cuda_allocator_reserved_bytes`, `cp_cuda_allocator_allocated_bytes`, by model and
  device; see examples/models/vision/1/allocator.py). Fragmentation is reserved-but-unallocated over reserved.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from controlplane.gpu.nvml import import_nvml

SCRAPE_TIMEOUT_S = 1.0
MAX_METRICS_BYTES = 4 * 2**20  # a Triton metrics page is a few tens of KiB; never read an unbounded body
TRITON_GPU_GAUGES = {"nv_gpu_utilization": "utilization", "nv_gpu_memory_used_bytes": "memory_used_bytes",
                     "nv_gpu_memory_total_bytes": "memory_total_bytes"}
ALLOCATOR_GAUGES = {"cp_cuda_allocator_reserved_bytes": "reserved_bytes",
                    "cp_cuda_allocator_allocated_bytes": "allocated_bytes"}


@dataclass
class DeviceReading:
    """One GPU or MIG instance as NVML reads it."""

    gpu: int  # the physical GPU's index
    uuid: str  # GPU-... or MIG-... (what CUDA_VISIBLE_DEVICES and a shard's `gpu:` take)
    name: str
    kind: str  # "gpu" or "mig"
    memory_used_bytes: int
    memory_total_bytes: int
    utilization: float | None  # 0..1; None for a MIG instance (or where the driver gives none)


@dataclass
class AllocatorReading:
    """The CUDA caching allocator of one model instance's process, as the model reports it."""

    model: str
    device: str
    reserved_bytes: float
    allocated_bytes: float

    @property
    def fragmentation(self) -> float:
        """Reserved but unallocated over reserved (0 when nothing is reserved)."""
        if self.reserved_bytes <= 0:
            return 0.0
        return max(self.reserved_bytes - self.allocated_bytes, 0.0) / self.reserved_bytes


@dataclass
class ShardReading:
    """One shard replica's GPU view, from its Triton metrics port."""

    shard: str
    up: bool  # the metrics port answered
    error: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)  # {uuid, utilization, memory_*_bytes}
    allocators: list[AllocatorReading] = field(default_factory=list)


@dataclass
class Telemetry:
    """Everything one look at the machine and its shards found."""

    no_gpu: str | None  # why NVML gave no GPU here; None when it did
    devices: list[DeviceReading]
    shards: list[ShardReading]

    def to_dict(self) -> dict[str, Any]:
        shards = [{**asdict(s), "allocators": [{**asdict(a), "fragmentation": a.fragmentation}
                                               for a in s.allocators]} for s in self.shards]
        return {"no_gpu": self.no_gpu, "devices": [asdict(d) for d in self.devices], "shards": shards}


# --------------------------------------------------------------------------------------------------- NVML
def read_devices(nvml: ModuleType | None = None) -> tuple[list[DeviceReading], str | None]:
    """Every GPU and MIG instance of this machine, or ([], why not) where NVML cannot read any."""
    nvml = nvml or import_nvml()
    if nvml is None:
        return [], "no GPU: nvidia-ml-py is not installed"
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return [], f"no GPU: NVML cannot start ({exc})"
    try:
        readings = [r for i in range(nvml.nvmlDeviceGetCount()) for r in _read_gpu(nvml, i)]
    except nvml.NVMLError as exc:
        return [], f"no GPU: NVML failed ({exc})"
    finally:
        nvml.nvmlShutdown()
    return readings, None if readings else "no GPU: NVML sees no device"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read_gpu(nvml: ModuleType, index: int) -> list[DeviceReading]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
    except nvml.NVMLError:  # not supported while MIG is enabled
        utilization = None
    readings = [DeviceReading(index, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)),
                              "gpu", memory.used, memory.total, utilization)]
    try:
        mig_on = bool(nvml.nvmlDeviceGetMigMode(handle)[0])
    except nvml.NVMLError:  # a GPU without MIG
        mig_on = False
    if mig_on:
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                device = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:  # a slot with no MIG device behind it
                continue
            mig_memory = nvml.nvmlDeviceGetMemoryInfo(device)
            readings.append(DeviceReading(index, _text(nvml.nvmlDeviceGetUUID(device)),
                                          _text(nvml.nvmlDeviceGetName(device)), "mig", mig_memory.used,
                                          mig_memory.total, None))
    return readings


# ------------------------------------------------------------------------------------- a shard's Triton
def parse_triton_metrics(shard: str, text: str) -> ShardReading:
    """The GPU gauges and the models' allocator gauges in a Triton metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    gpus: dict[str, dict[str, Any]] = {}
    allocators: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in TRITON_GPU_GAUGES:
                uuid = sample.labels.get("gpu_uuid", "?")
                gpus.setdefault(uuid, {"uuid": uuid})[TRITON_GPU_GAUGES[sample.name]] = sample.value
            elif sample.name in ALLOCATOR_GAUGES:
                key = (sample.labels.get("model", "?"), sample.labels.get("device", "?"))
                allocators.setdefault(key, {})[ALLOCATOR_GAUGES[sample.name]] = sample.value
    return ShardReading(shard, True, gpus=list(gpus.values()), allocators=[
        AllocatorReading(model, device, values.get("reserved_bytes", 0.0), values.get("allocated_bytes", 0.0))
        for (model, device), values in sorted(allocators.items())])


async def fetch_text(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> str:
    """GET an http:// URL on a fresh connection: the body of a 200 answer (at most MAX_METRICS_BYTES), else
    OSError naming the status."""
    parts = urlsplit(url)
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 80), timeout_s)
        writer.write(f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(MAX_METRICS_BYTES), timeout_s)
        while not reader.at_eof() and len(answer) < MAX_METRICS_BYTES:  # bounded: the size cap ends it
            answer += await asyncio.wait_for(reader.read(MAX_METRICS_BYTES - len(answer)), timeout_s)
    finally:
        if writer is not None:
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        raise OSError(f"{url} answered {b''.join(status).decode() or 'nothing'}")
    return body.decode(errors="replace")


async def read_shard(shard: str, metrics_url: str | None) -> ShardReading:
    """One shard's GPU view; a shard without a metrics port, or whose port does not answer, says so."""
    if not metrics_url:
        return ShardReading(shard, False, "no metrics port (the shard is not running)")
    try:
        return parse_triton_metrics(shard, await fetch_text(metrics_url))
    except (OSError, TimeoutError, ValueError) as exc:
        return ShardReading(shard, False, f"{metrics_url}: {exc or type(exc).__name__}")


async def read_telemetry(shards: list[tuple[str, str | None]], nvml: ModuleType | None = None) -> Telemetry:
    """NVML on this machine (in a thread: NVML calls block) and every shard's metrics port, in parallel."""
    (devices, no_gpu), *readings = await asyncio.gather(asyncio.to_thread(read_devices, nvml),
                                                        *(read_shard(name, url) for name, url in shards))
    return Telemetry(no_gpu, devices, list(readings))
