"""Writing a Triton repository entry: one model directory per precision, each with its config.pbtxt."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from controlplane.convert.source import DATATYPES, ConvertError, Source, TensorSpec

PRECISIONS = ("fp32", "fp16", "bf16")
HERE = Path(__file__).parent


@dataclass(frozen=True)
class Variant:
    name: str  # the Triton model name: NAME for fp32, NAME_fp16, NAME_bf16
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
    if source.kind == "onnx" and precisions != ["fp32"]:
        raise ConvertError("an ONNX source is served in fp32 only (ONNX Runtime); convert from a torch source "
                           "(TorchScript or module:factory) for fp16/bf16 variants")
    repository.mkdir(parents=True, exist_ok=True)
    variants = []
    for precision in precisions:
        variant = Variant(variant_name(name, precision), precision, repository / variant_name(name, precision))
        shutil.rmtree(variant.path, ignore_errors=True)
        (variant.path / "1").mkdir(parents=True)
        _write_model_files(source, variant.path / "1", variants[0].path / "1" if variants else None)
        (variant.path / "config.pbtxt").write_text(config_pbtxt(source, variant, serving))
        variants.append(variant)
    return variants


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
