"""Writing a Triton repository entry: one model directory per precision, each with its config.pbtxt."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from controlplane.convert.source import DATATYPES, ConvertError, Source, TensorSpec

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
HERE = Path(__file__).parent


@dataclass(frozen=True)
class Variant:
    name: str  # the Triton model name: NAME for fp32, NAME_fp16, NAME_bf16, NAME_fp8
    precision: str
    path: Path


@dataclass(frozen=True)
class Serving:
    """How each variant is served (config.pbtxt)."""

    max_batch: int = 64
    instances: int = 1
    queue_delay_us: int = 1000


def variant_name(name: str, precision: str) -> str:
    return name if precision == "fp32" else f"{name}_{precision}"


def write_entry(source: Source, repository: Path, name: str, precisions: list[str], serving: Serving
                ) -> list[Variant]:
    """One model directory per precision under `repository` (existing ones of these names are replaced)."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ConvertError(f"--precision {','.join(precisions)}: each one of {', '.join(PRECISIONS)}")
    if "fp8" in precisions:
        _check_fp8(source)
    if source.kind == "onnx" and precisions != ["fp32"]:
        raise ConvertError("an ONNX source is served in fp32 only (ONNX Runtime); convert from a torch source "
                           "(TorchScript or module:factory) for fp16/bf16 variants")
    repository.mkdir(parents=True, exist_ok=True)
    variants = []
    for precision in precisions:
        variant = Variant(variant_name(name, precision), precision, repository / variant_name(name, precision))
        shutil.rmtree(variant.path, ignore_errors=True)
        (variant.path / "1").mkdir(parents=True)
        if precision == "fp8":
            _write_fp8_model(source, variant.path / "1")
        else:
            shared = next((v.path / "1" for v in variants if v.precision != "fp8"), None)
            _write_model_files(source, variant.path / "1", shared)
        (variant.path / "config.pbtxt").write_text(config_pbtxt(source, variant, serving))
        variants.append(variant)
    return variants


def _check_fp8(source: Source) -> None:
    """Before anything is written: fp8 needs the nn.Module (its linear layers are swapped) and an FP8 GPU."""
    from controlplane.convert.fp8 import fp8_unavailable, linear_count

    if source.module is None:
        raise ConvertError("fp8 swaps the model's nn.Linear layers, so it needs the Python nn.Module: convert from "
                           "module:factory or file.py:factory, not from a TorchScript or ONNX file")
    if not linear_count(source.module):
        raise ConvertError("fp8 quantizes nn.Linear layers and this model has none: use bf16")
    reason = fp8_unavailable()
    if reason:
        raise ConvertError(f"fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                           f"{reason}: leave fp8 out of --precision here")


def _write_fp8_model(source: Source, version_dir: Path) -> None:
    """Its own model.pt (FP8 weights): the module with FP8 linear layers, traced on the GPU in BF16."""
    import torch

    from controlplane.convert.fp8 import fp8_module
    from controlplane.convert.source import example_inputs

    module = fp8_module(source.module).cuda()
    arrays = [torch.from_numpy(a).cuda() for a in example_inputs(source.inputs, batch=2, seed=0)]
    examples = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in arrays)
    try:
        traced = torch.jit.trace(module, examples, check_trace=False)
    except RuntimeError as exc:  # the user's model around its linear layers, in BF16 on the GPU
        raise ConvertError(f"fp8: the model fails with FP8 linear layers: {str(exc).splitlines()[0]}") from None
    traced.save(str(version_dir / "model.pt"))
    shutil.copy2(HERE / "serve_torch.py", version_dir / "model.py")


def _write_model_files(source: Source, version_dir: Path, first: Path | None) -> None:
    """The model file (hard-linked to the first variant's: the weights are the same) and model.py."""
    model_file = "model.onnx" if source.kind == "onnx" else "model.pt"
    if first is not None:
        try:
            (version_dir / model_file).hardlink_to(first / model_file)
        except OSError:
            shutil.copy2(first / model_file, version_dir / model_file)
    elif source.kind == "onnx":
        (version_dir / model_file).write_bytes(source.model)
    else:
        source.model.save(str(version_dir / model_file))
    shutil.copy2(HERE / ("serve_onnx.py" if source.kind == "onnx" else "serve_torch.py"), version_dir / "model.py")


def config_pbtxt(source: Source, variant: Variant, serving: Serving) -> str:
    def tensors(specs: list[TensorSpec]) -> str:
        rows = [f'  {{ name: "{s.name}", data_type: {DATATYPES[s.datatype][1]}, '
                f'dims: [ {", ".join(map(str, s.dims))} ] }}' for s in specs]
        return "[\n" + ",\n".join(rows) + "\n]"

    batching = (f"dynamic_batching {{\n  max_queue_delay_microseconds: {serving.queue_delay_us}\n}}\n"
                if serving.max_batch > 0 else "")
    return (f"# Written by `cpctl convert` ({source.kind} source, {variant.precision}).\n"
            f'name: "{variant.name}"\nbackend: "python"\nmax_batch_size: {serving.max_batch}\n'
            f"input {tensors(source.inputs)}\noutput {tensors(source.outputs)}\n"
            f"instance_group [ {{ count: {serving.instances} }} ]  # no kind: the GPU when there is one\n"
            f"{batching}"
            f'parameters [ {{ key: "precision", value: {{ string_value: "{variant.precision}" }} }} ]\n')
