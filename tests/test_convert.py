"""`cpctl convert`: small torch and ONNX models to Triton entries, verified in a real tritonserver (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from controlplane.convert.entry import Serving, write_entry
from controlplane.convert.fp8 import E4M3_MAX, Fp8Linear, fp8_module, fp8_unavailable, quantize
from controlplane.convert.source import ConvertError, load, run_reference
from controlplane.convert.verify import TOLERANCES

from .conftest import ROOT

FACTORY = f"{ROOT}/examples/models/vision/1/resnet.py:resnet_tiny"


class TwoHeads(torch.nn.Module):
    """A small model with two outputs: class scores and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU())
        self.classes = torch.nn.Linear(32, 5)
        self.embedding = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return self.classes(h), self.embedding(h)


def cpctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", "gpu", "convert", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_factory_to_three_verified_variants(tmp_path: Path) -> None:
    done = cpctl(FACTORY, "--input", "images:fp32:3x32x32", "--output-name", "logits", "--name", "tiny",
                 "--precision", "fp32,fp16,bf16", "--max-batch", "16", "--instances", "2", "-o", str(tmp_path),
                 "--samples", "32", "--json")
    assert done.returncode == 0, done.stderr
    checks = json.loads(done.stdout[done.stdout.index("["):])
    assert [(c["variant"], c["precision"], c["passed"]) for c in checks] == [
        ("tiny", "fp32", True), ("tiny_fp16", "fp16", True), ("tiny_bf16", "bf16", True)]
    assert all(c["samples"] == 32 and c["top1_agreement"] >= 0.9 for c in checks)
    config = (tmp_path / "tiny_fp16" / "config.pbtxt").read_text()
    for line in ('name: "tiny_fp16"', "max_batch_size: 16",
                 '{ name: "images", data_type: TYPE_FP32, dims: [ 3, 32, 32 ] }',
                 '{ name: "logits", data_type: TYPE_FP32, dims: [ 1000 ] }', "count: 2", "dynamic_batching",
                 'string_value: "fp16"'):
        assert line in config
    assert (tmp_path / "tiny_bf16" / "1" / "model.pt").stat().st_size > 10_000


def test_torchscript_file_with_two_outputs_prints_a_table(tmp_path: Path) -> None:
    scripted = torch.jit.script(TwoHeads().eval())
    scripted.save(str(tmp_path / "heads.pt"))
    done = cpctl(str(tmp_path / "heads.pt"), "--input", "x:fp32:8", "--name", "heads", "--precision", "fp32,fp16",
                 "-o", str(tmp_path / "repo"), "--samples", "40")
    assert done.returncode == 0, done.stderr
    for text in ("heads_fp16", "output0", "output1", "variants vs the source model"):
        assert text in done.stdout
    assert "dims: [ 3 ]" in (tmp_path / "repo" / "heads" / "config.pbtxt").read_text()


def test_onnx_file_signature_comes_from_the_graph(tmp_path: Path) -> None:
    onnx_file = tmp_path / "heads.onnx"
    torch.onnx.export(TwoHeads().eval(), (torch.zeros(2, 8),), str(onnx_file), input_names=["x"],
                      output_names=["scores", "embedding"], dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"},
                                                                            "embedding": {0: "batch"}}, dynamo=False)
    done = cpctl(str(onnx_file), "--name", "heads", "-o", str(tmp_path / "repo"), "--samples", "24", "--json")
    assert done.returncode == 0, done.stderr
    checks = json.loads(done.stdout[done.stdout.index("["):])
    assert [(c["output"], c["passed"]) for c in checks] == [("scores", True), ("embedding", True)]
    config = (tmp_path / "repo" / "heads" / "config.pbtxt").read_text()
    assert '{ name: "x", data_type: TYPE_FP32, dims: [ 8 ] }' in config
    assert (tmp_path / "repo" / "heads" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--tensorrt"], "TensorRT is not installed here"),
    ([], "needs its inputs: --input NAME:DATATYPE:DIMS"),
    (["--input", "images:float:3x32x32"], "expected NAME:DATATYPE:DIMS"),
    (["--input", "images:fp32:3xAx32"], "DIMS must be integers"),
    (["--input", "images:fp32:3x32x32", "--precision", "fp32,int8"], "each one of fp32, fp16, bf16, fp8"),
])
def test_bad_requests_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = cpctl(FACTORY, "--name", "tiny", "-o", str(tmp_path), *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_unknown_sources_are_clear_errors(tmp_path: Path) -> None:
    not_torchscript = tmp_path / "model.pt"
    not_torchscript.write_bytes(b"not a model")
    for source, message in ((str(not_torchscript), "not a TorchScript file"),
                            ("no_such_module_here:build", "cannot import no_such_module_here"),
                            (f"{ROOT}/examples/models/vision/1/resnet.py:missing", "has no function 'missing'"),
                            ("nothing-here", "not a file and not module:factory")):
        with pytest.raises(ConvertError, match=message):
            load(source, ["x:fp32:8"], [])


def test_a_model_that_fails_on_the_described_inputs_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="the model fails on inputs"):
        load(FACTORY, ["images:fp32:5"], [])


def test_onnx_variants_other_than_fp32_are_refused(tmp_path: Path) -> None:
    onnx_file = tmp_path / "heads.onnx"
    torch.onnx.export(TwoHeads().eval(), (torch.zeros(2, 8),), str(onnx_file), input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    with pytest.raises(ConvertError, match="fp32 only"):
        write_entry(load(str(onnx_file), [], []), tmp_path / "repo", "heads", ["fp32", "fp16"], Serving())


@pytest.mark.skipif(fp8_unavailable() is None, reason="this machine has an FP8 GPU: fp8 converts here")
def test_fp8_without_an_fp8_gpu_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    done = cpctl(FACTORY, "--name", "tiny", "-o", str(tmp_path), "--input", "images:fp32:3x32x32",
                 "--precision", "fp32,fp8")
    assert done.returncode == 2
    assert "fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+" in done.stderr
    assert f"{fp8_unavailable()}: leave fp8 out" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_fp8_needs_a_module_factory_source(tmp_path: Path) -> None:
    torch.jit.script(TwoHeads().eval()).save(str(tmp_path / "heads.pt"))
    onnx_file = tmp_path / "heads.onnx"
    torch.onnx.export(TwoHeads().eval(), (torch.zeros(2, 8),), str(onnx_file), input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    for source in (load(str(tmp_path / "heads.pt"), ["x:fp32:8"], []), load(str(onnx_file), [], [])):
        with pytest.raises(ConvertError, match="needs the Python nn.Module: convert from module:factory"):
            write_entry(source, tmp_path / "repo", "heads", ["fp32", "fp8"], Serving())
    assert not (tmp_path / "repo").exists()


def test_fp8_quantization_stays_within_the_e4m3_rounding() -> None:
    """e4m3 keeps 3 mantissa bits: a value is off by at most 2^-4 of itself, or half the smallest subnormal
    step (2^-10 of the scale) near zero; the largest magnitude maps to 448 exactly."""
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(0)) * 3
    x_fp8, scale = quantize(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert x_fp8.float().abs().max().item() == E4M3_MAX
    error = (x_fp8.float() * scale - x).abs()
    assert torch.all(error <= x.abs() * 2**-4 + scale * 2**-10)
    zeros_fp8, zeros_scale = quantize(torch.zeros(3, 16))
    assert torch.isfinite(zeros_scale) and zeros_fp8.float().abs().max().item() == 0


def test_fp8_linear_pads_to_16_and_slices_back() -> None:
    linear = torch.nn.Linear(20, 30)  # neither a multiple of 16, as ResNet-50's fc (2048 -> 1000) is not
    layer = Fp8Linear(linear)
    assert layer.weight_fp8.shape == (32, 32) and layer.bias.dtype == torch.bfloat16
    assert torch.all(layer.weight_fp8.float()[30:] == 0) and torch.all(layer.weight_fp8.float()[:, 20:] == 0)
    dequantized = layer.weight_fp8.float()[:30, :20] * layer.weight_scale
    assert torch.all((dequantized - linear.weight).abs() <= linear.weight.abs() * 2**-4 + layer.weight_scale * 2**-10)


def test_fp8_module_swaps_every_linear_and_keeps_the_rest_in_bf16() -> None:
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), TwoHeads())
    swapped = fp8_module(model)
    layers = [m for m in swapped.modules() if isinstance(m, torch.jit.ScriptModule)]
    assert [m.original_name for m in layers] == ["Fp8Linear"] * 3
    assert not any(isinstance(m, torch.nn.Linear) for m in swapped.modules())
    assert swapped[0].weight.dtype == torch.bfloat16
    assert isinstance(model[1].classes, torch.nn.Linear) and model[0].weight.dtype == torch.float32  # a copy


def test_a_traced_fp8_module_scales_each_call_on_its_own() -> None:
    """Traced at batch 2 as entry.py does (on the GPU there; torch's CPU _scaled_mm here), then fed a batch of
    another size and 100x the magnitude: a scale frozen at trace time would clip it at 448."""
    model = TwoHeads().eval()
    traced = torch.jit.trace(fp8_module(model), (torch.randn(2, 8).to(torch.bfloat16),), check_trace=False)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)) * 100
    for got, expected in zip(traced(x.to(torch.bfloat16)), model(x), strict=True):
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        relative = ((got.float() - expected).abs().max() / expected.abs().max()).item()
        assert relative <= TOLERANCES["fp8"]


class BatchSizes(torch.nn.Module):
    """Doubles its input and remembers the batch sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(len(x))
        return x * 2


def test_the_reference_runs_in_the_variants_batches() -> None:
    """cuDNN's algorithms (and roundings) depend on the batch size: the reference is computed as served."""
    source = load(f"{ROOT}/examples/models/vision/1/resnet.py:resnet_tiny", ["images:fp32:3x8x8"], ["logits"])
    source.model = model = BatchSizes()
    arrays = [np.arange(10 * 3 * 8 * 8, dtype=np.float32).reshape(10, 3, 8, 8)]
    (batched,) = run_reference(source, arrays, "cpu", batch=4)
    assert model.seen == [4, 4, 2]
    np.testing.assert_array_equal(batched, arrays[0] * 2)
    run_reference(source, arrays, "cpu")
    assert model.seen[-1] == 10
