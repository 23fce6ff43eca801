"""GPU telemetry: NVML per GPU and MIG instance (the replayed NVML of test_gpu_discover), "no GPU" said
clearly on this CPU machine, and the CUDA allocator gauges a model reports from its own process, read from a
real tritonserver's metrics port and exported on the gateway's /metrics.

There is no CUDA here: the probe models below report a fixed allocator reading through the examples' own
allocator.py (the real vision and risk models read torch.cuda.memory_reserved/allocated on a GPU instead).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from controlplane.gateway.metrics import GatewayMetrics
from controlplane.gpu.telemetry import AllocatorReading, read_devices, read_shard, read_telemetry
from controlplane.procs import ManagedProcess
from controlplane.shards.local import LocalShards
from controlplane.spec import load_spec

from .conftest import EXAMPLE_SPEC, ROOT, RunningStack
from .test_gpu_discover import fake_nvml
from .test_stack import cpctl

ALLOCATOR = ROOT / "examples" / "models" / "vision" / "1" / "allocator.py"
PROBE_MODEL = '''
import json, sys
from pathlib import Path
import triton_python_backend_utils as pb_utils
sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocator import AllocatorGauges


class TritonPythonModel:
    """A model on a GPU, as far as its allocator gauges go: the reading comes from the config."""

    def initialize(self, args):
        p = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        reading = (int(p["reserved"]), int(p["allocated"]))
        self.allocator = AllocatorGauges(args["model_name"], "cuda:0", lambda: reading)

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x")
                                                            .as_numpy())]) for r in requests]
'''
PROBE_CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "x", data_type: TYPE_FP32, dims: [ 1 ] }} ]
output [ {{ name: "y", data_type: TYPE_FP32, dims: [ 1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters [
  {{ key: "reserved", value: {{ string_value: "{reserved}" }} }},
  {{ key: "allocated", value: {{ string_value: "{allocated}" }} }}
]
'''
PROBES = {"probe_a": (4 << 20, 1 << 20), "probe_b": (8 << 20, 8 << 20)}  # (reserved, allocated) bytes
SPEC = """
cluster: telemetry
model_repository: {repository}
node_pools:
  - {{name: local, provider: existing, instance_type: this-machine}}
models:
  - {{name: probe_a, path: probe_a, memory_mb: 16}}
  - {{name: probe_b, path: probe_b, memory_mb: 16}}
shards:
  - {{name: main, models: [probe_a, probe_b]}}
priority_classes:
  - {{name: standard, level: 200, default_deadline_ms: 1000, share: 1.0}}
tenants:
  - {{name: anonymous, default_class: standard, rate: 100, burst: 100}}
gateway: {{allow_anonymous: true, anonymous_tenant: anonymous, workers: 1}}
"""


def plain(terminal_output: str) -> str:
    """Terminal output without its colour and cursor escapes."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal_output)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_nvml_reads_each_gpu_and_each_mig_instance() -> None:
    devices, no_gpu = read_devices(fake_nvml(mig_enabled_on_gpu0=True))
    assert no_gpu is None
    by_uuid = {d.uuid: d for d in devices}
    assert set(by_uuid) == {"GPU-0", "MIG-aaaa", "MIG-bbbb", "GPU-1"}
    assert by_uuid["GPU-1"].utilization == 0.03 and by_uuid["GPU-1"].kind == "gpu"
    assert by_uuid["GPU-0"].utilization is None  # NVML gives none while MIG is on
    mig = by_uuid["MIG-aaaa"]
    assert (mig.gpu, mig.kind, mig.memory_total_bytes, mig.utilization) == (0, "mig", 40192 << 20, None)
    assert mig.memory_used_bytes == 512 << 20


def test_no_gpu_is_reported_in_one_line_not_raised() -> None:
    devices, no_gpu = read_devices(fake_nvml(init_error=True))
    assert devices == [] and no_gpu == "no GPU: NVML cannot start (Driver Not Loaded)"
    devices, no_gpu = read_devices()  # this machine's real NVML: no driver here
    assert devices == [] and no_gpu.startswith("no GPU: NVML cannot start")


def test_fragmentation_is_reserved_but_unallocated_over_reserved() -> None:
    assert AllocatorReading("m", "cuda:0", 4 << 20, 1 << 20).fragmentation == 0.75
    assert AllocatorReading("m", "cuda:0", 0, 0).fragmentation == 0.0


def test_a_shard_that_does_not_answer_is_down_with_the_reason() -> None:
    stopped = asyncio.run(read_shard("main-0", None))
    assert not stopped.up and "not running" in stopped.error
    closed = asyncio.run(read_shard("main-1", "http://127.0.0.1:9/metrics"))  # discard port: refused
    assert not closed.up and "127.0.0.1:9" in closed.error


def test_models_report_their_allocator_on_the_shard_metrics_port_and_the_gateway_exports_it(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    for name, (reserved, allocated) in PROBES.items():
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "1" / "model.py").write_text(PROBE_MODEL)
        shutil.copy(ALLOCATOR, repository / name / "1" / "allocator.py")
        (repository / name / "config.pbtxt").write_text(PROBE_CONFIG.format(name=name, reserved=reserved,
                                                                             allocated=allocated))
    (tmp_path / "spec.yaml").write_text(SPEC.format(repository=repository))

    async def scenario():
        backend = LocalShards(load_spec(tmp_path / "spec.yaml"), tmp_path / "run")
        await backend.start()
        try:
            # Triton reports ready once its HTTP service listens; its metrics service starts just after (a CI
            # run read in between and was refused): a reading of a shard not up yet is read again, bounded.
            for _ in range(50):
                telemetry = await read_telemetry([(s.name, s.metrics_url) for s in backend.status()])
                if all(shard.up for shard in telemetry.shards):
                    break
                await asyncio.sleep(0.1)
            return telemetry
        finally:
            await backend.stop()

    telemetry = asyncio.run(scenario())
    (shard,) = telemetry.shards
    assert shard.up and shard.gpus == []  # Triton on the CPU: no GPU gauges
    assert [(a.model, a.device, a.reserved_bytes, a.allocated_bytes) for a in shard.allocators] == [
        ("probe_a", "cuda:0", 4 << 20, 1 << 20), ("probe_b", "cuda:0", 8 << 20, 8 << 20)]

    exported = samples(GatewayMetrics().render([], [], 0, gpu=telemetry.to_dict()).decode())
    labels = frozenset({"shard": "main-0", "model": "probe_a", "device": "cuda:0"}.items())
    assert exported["cp_shard_cuda_fragmentation_ratio", labels] == 0.75
    assert exported["cp_shard_cuda_reserved_bytes", labels] == 4 << 20
    assert exported["cp_shard_metrics_up", frozenset({"shard": "main-0"}.items())] == 1
    assert exported["cp_gpu_available", frozenset()] == 0


def test_gateway_metrics_carry_gpu_telemetry_of_the_running_stack(stack: RunningStack) -> None:
    text = urllib.request.urlopen(f"{stack.gateway}/metrics", timeout=10).read().decode()
    exported = samples(text)
    assert exported["cp_gpu_available", frozenset()] == 0  # this machine has no GPU, and says so
    shards = {dict(labels)["shard"]: value for (name, labels), value in exported.items()
              if name == "cp_shard_metrics_up"}
    assert shards and shards == {name: 1 for name in stack.shard_pids()}  # every running shard was scraped


def test_status_shows_the_gpus_or_says_there_are_none(stack: RunningStack) -> None:
    result = cpctl("status", "-f", str(EXAMPLE_SPEC), "--json")
    assert result.returncode == 0, result.stderr
    gpu = json.loads(result.stdout)["gpu"]
    assert gpu["no_gpu"].startswith("no GPU: ") and gpu["devices"] == []
    assert {s["shard"]: s["up"] for s in gpu["shards"]} == {"main-0": True, "main-1": True}
    text = cpctl("status", "-f", str(EXAMPLE_SPEC))
    assert text.returncode == 0 and "no GPU: " in text.stdout and "no GPU in use" in text.stdout


def test_top_once_prints_one_reading(stack: RunningStack) -> None:
    result = cpctl("top", "-f", str(EXAMPLE_SPEC), "--once")
    assert result.returncode == 0, result.stderr
    assert "cluster 'local-demo'" in result.stdout and "no GPU: " in result.stdout
    assert "main-0" in result.stdout and "main-1" in result.stdout


def test_top_without_a_running_stack_says_so(tmp_path: Path) -> None:
    spec = tmp_path / "idle.yaml"
    spec.write_text(EXAMPLE_SPEC.read_text().replace("cluster: local-demo", "cluster: idle-top")
                    .replace("model_repository: ../models", f"model_repository: {ROOT / 'examples' / 'models'}"))
    result = cpctl("top", "-f", str(spec), "--once")
    assert result.returncode == 0 and "no stack of cluster 'idle-top' is running" in result.stdout


def test_top_refreshes_until_ctrl_c_then_leaves_cleanly(stack: RunningStack, tmp_path: Path) -> None:
    shown = tmp_path / "top.out"
    process = ManagedProcess([sys.executable, "-m", "controlplane.cli", "top", "-f", str(EXAMPLE_SPEC),
                              "--interval", "0.5"], cwd=ROOT, log_path=shown,
                             env={**os.environ, "FORCE_COLOR": "1", "COLUMNS": "200"})  # a terminal, for Live
    try:
        for _ in range(600):  # bounded: up to 60 s for two refreshes on a busy machine
            if plain(shown.read_text()).count("cluster 'local-demo'") >= 2:
                break
            time.sleep(0.1)
        process.signal_group(signal.SIGINT)
        assert process.popen.wait(20) == 0
    finally:
        process.stop()
    text = plain(shown.read_text())
    assert text.count("cluster 'local-demo'") >= 2 and "no GPU: " in text and "Traceback" not in text
