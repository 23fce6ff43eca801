"""Each variant loaded into a real tritonserver and its outputs compared with the source model's.

The comparison set is seeded (`example_inputs`), so a run is repeatable. Per output: the largest absolute
difference relative to the largest reference magnitude (within the precision's tolerance, or the variant
fails), and, for outputs shaped [N, classes], how often the variant's top-1 equals the source's.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controlplane.bench.client import HttpClient
from controlplane.bench.tensors import infer_body, read_outputs
from controlplane.convert.entry import Variant
from controlplane.convert.source import Source, example_inputs, run_reference
from controlplane.procs import ManagedProcess, free_port
from controlplane.shards.base import probe_ready
from controlplane.shards.local import has_gpu
from controlplane.shards.triton import GpuMemory, TritonInstall

# Largest |variant - source| / max |source| accepted, per precision (FP16 has 11 significant bits, BF16 8).
# FP32 is not bit-exact either: cuDNN picks convolution algorithms per batch size (Winograd, FFT, GEMM), whose
# roundings differ; ResNet-50 in FP32 on the H200 differed by 5e-4 between batch 512 and batches of 64 (the
# reference therefore runs in the variants' batches). TF32 is off on both sides.
# FP8 (e4m3, 3 mantissa bits: each value rounded by up to 2^-4 = 6.25%) on both operands of the linear layers,
# BF16 elsewhere: the BF16 allowance plus about one e4m3 rounding of the result.
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 8e-2, "fp8": 0.15}
READY_TIMEOUT_S = 180.0  # a torch model on a GPU: torch import, CUDA start, cuDNN


@dataclass(frozen=True)
class Check:
    variant: str
    precision: str
    output: str
    max_abs_error: float
    relative_error: float
    tolerance: float
    top1_agreement: float | None  # None for outputs that are not [N, classes]
    classes_seen: int | None  # distinct top-1 classes of the source: agreement on one class means little
    samples: int

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance


def verify(source: Source, repository: Path, variants: list[Variant], samples: int, batch: int,
           seed: int = 0, inputs: list[np.ndarray] | None = None) -> list[Check]:
    """Serve `variants` from `repository` in one tritonserver and compare each with the source, on `inputs`
    (one array per model input) or a seeded set of `samples`."""
    inputs = inputs if inputs is not None else example_inputs(source.inputs, samples, seed)
    device = "cuda" if has_gpu() and _cuda_available() else "cpu"
    reference = run_reference(source, inputs, device, batch)
    served = asyncio.run(_serve_and_infer(repository, variants, source, inputs, batch))
    checks = []
    for variant in variants:
        for spec, expected, got in zip(source.outputs, reference, served[variant.name], strict=True):
            checks.append(_compare(variant, spec.name, expected, got))
    return checks


def _compare(variant: Variant, output: str, expected: np.ndarray, got: np.ndarray) -> Check:
    expected64, got64 = expected.astype(np.float64), got.astype(np.float64)
    max_abs = float(np.max(np.abs(expected64 - got64))) if expected.size else 0.0
    scale = float(np.max(np.abs(expected64))) if expected.size else 0.0
    agreement = classes = None
    if expected.ndim == 2 and expected.shape[1] > 1 and np.issubdtype(expected.dtype, np.floating):
        agreement = float(np.mean(expected.argmax(1) == got.argmax(1)))
        classes = len(np.unique(expected.argmax(1)))
    return Check(variant.name, variant.precision, output, max_abs, max_abs / scale if scale else max_abs,
                 TOLERANCES[variant.precision], agreement, classes, len(expected))


async def _serve_and_infer(repository: Path, variants: list[Variant], source: Source, inputs: list[np.ndarray],
                           batch: int) -> dict[str, list[np.ndarray]]:
    triton = TritonInstall.find()
    http_port, metrics_port = free_port(), free_port()
    gpu = GpuMemory(256, 256) if has_gpu() else None
    argv = triton.argv(repository, [v.name for v in variants], http_port, metrics_port, gpu)
    with tempfile.TemporaryDirectory(prefix="cpctl-convert-") as logs:
        log = Path(logs) / "tritonserver.log"
        server = ManagedProcess(argv, env=triton.env(None), log_path=log)
        try:
            await _wait_ready(server, http_port)
            client = HttpClient("127.0.0.1", http_port, timeout_s=120)
            try:
                return {v.name: await _infer_all(client, v.name, source, inputs, batch) for v in variants}
            finally:
                client.close()
        finally:
            await asyncio.to_thread(server.stop)


async def _wait_ready(server: ManagedProcess, port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not await probe_ready("127.0.0.1", port, timeout_s=1.0):
        if server.poll() is not None or time.monotonic() > deadline:
            state = "exited" if server.poll() is not None else f"not ready after {READY_TIMEOUT_S:.0f} s"
            raise RuntimeError(f"tritonserver {state} while loading the variants:\n{server.log_tail(3000)}")
        await asyncio.sleep(0.1)


async def _infer_all(client: HttpClient, model: str, source: Source, inputs: list[np.ndarray], batch: int
                     ) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in source.outputs]
    names = [o.name for o in source.outputs]
    for start in range(0, len(inputs[0]), batch):
        request = infer_body({s.name: a[start:start + batch] for s, a in zip(source.inputs, inputs, strict=True)},
                             names)
        response = await client.request("POST", f"/v2/models/{model}/infer", request.body, request.headers)
        if response.status != 200:
            raise RuntimeError(f"{model}: HTTP {response.status}: {response.body[:500].decode(errors='replace')}")
        header_length = response.headers.get(b"inference-header-content-length")
        outputs = read_outputs(response.body, int(header_length) if header_length else None)
        for i, name in enumerate(names):
            parts[i].append(outputs[name])
    return [np.concatenate(p) for p in parts]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
