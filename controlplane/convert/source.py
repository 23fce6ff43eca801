"""What is converted: the model and its inputs and outputs (names, datatypes, dims without the batch)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Datatype names as `--input` takes them -> (numpy dtype, Triton config type).
DATATYPES = {
    "fp32": (np.float32, "TYPE_FP32"), "fp16": (np.float16, "TYPE_FP16"), "int64": (np.int64, "TYPE_INT64"),
    "int32": (np.int32, "TYPE_INT32"), "uint8": (np.uint8, "TYPE_UINT8"), "bool": (np.bool_, "TYPE_BOOL"),
}
ONNX_TYPES = {1: "fp32", 10: "fp16", 7: "int64", 6: "int32", 2: "uint8", 9: "bool"}


class ConvertError(ValueError):
    """Bad input to `cpctl convert`: the message names the problem and the fix."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # a key of DATATYPES
    dims: tuple[int, ...]  # without the batch dimension; -1 for a variable one

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """`NAME:DATATYPE:DIMS`, DIMS like 3x224x224 (without the batch dimension)."""
        parts = text.split(":")
        if len(parts) != 3 or not parts[0] or parts[1] not in DATATYPES:
            raise ConvertError(f"--input {text!r}: expected NAME:DATATYPE:DIMS, e.g. images:fp32:3x224x224, "
                               f"DATATYPE one of {', '.join(DATATYPES)}")
        try:
            dims = tuple(int(d) for d in parts[2].split("x"))
        except ValueError:
            raise ConvertError(f"--input {text!r}: DIMS must be integers joined by 'x', e.g. 3x224x224") from None
        if any(d < 1 for d in dims):
            raise ConvertError(f"--input {text!r}: give every dimension a size (the batch one is implied)")
        return cls(parts[0], parts[1], dims)


@dataclass
class Source:
    kind: str  # "torch" (an nn.Module or TorchScript) or "onnx"
    model: object  # a torch.nn.Module / ScriptModule, or the ONNX file's bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    module: object | None = None  # the nn.Module a factory returned (fp8 swaps its linear layers); None for files


def load(source: str, inputs: list[str], outputs: list[str]) -> Source:
    """The model at `source`: a .onnx file, a TorchScript file, or `module:factory` / `file.py:factory`."""
    path = Path(source)
    if path.suffix == ".onnx":
        if inputs:
            raise ConvertError("--input is read from the ONNX graph itself; leave it out for .onnx sources")
        return _load_onnx(path)
    if not inputs:
        raise ConvertError("a torch model needs its inputs: --input NAME:DATATYPE:DIMS (e.g. x:fp32:16)")
    specs = [TensorSpec.parse(text) for text in inputs]
    if path.is_file():
        module = _load_torchscript(path)
    elif ":" in source:
        module = _load_factory(source)
    else:
        raise ConvertError(f"{source}: not a file and not module:factory (e.g. mypackage.models:build)")
    return _with_outputs(module, specs, outputs)


def example_inputs(specs: list[TensorSpec], batch: int, seed: int) -> list[np.ndarray]:
    """A seeded batch per input: normal floats, small non-negative integers."""
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        dtype = DATATYPES[spec.datatype][0]
        shape = (batch, *(d if d > 0 else 8 for d in spec.dims))
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == np.bool_:
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            arrays.append(rng.integers(0, 10, shape).astype(dtype))
    return arrays


def run_reference(source: Source, arrays: list[np.ndarray], device: str, batch: int | None = None
                  ) -> list[np.ndarray]:
    """The source model's outputs in FP32 (TF32 off): what every variant is compared with. In batches of
    `batch` rows when given, as the variants are served: cuDNN picks convolution algorithms per batch size,
    and their roundings differ (a whole-set reference put ResNet-50's FP32 variant 1.6e-3 off on the H200)."""
    if batch and len(arrays[0]) > batch:
        parts = [run_reference(source, [a[start:start + batch] for a in arrays], device)
                 for start in range(0, len(arrays[0]), batch)]
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]
    if source.kind == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(source.model, providers=["CPUExecutionProvider"])
        feeds = {spec.name: array for spec, array in zip(source.inputs, arrays, strict=True)}
        return [np.asarray(o) for o in session.run([s.name for s in source.outputs], feeds)]
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = source.model.to(device).float()
    with torch.inference_mode():
        result = model(*[torch.from_numpy(a).to(device) for a in arrays])
    results = result if isinstance(result, tuple | list) else [result]
    return [r.float().cpu().numpy() if r.is_floating_point() else r.cpu().numpy() for r in results]


def _load_torchscript(path: Path):
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as exc:
        raise ConvertError(f"{path}: not a TorchScript file ({str(exc).splitlines()[0]})") from None


def _load_factory(source: str):
    import torch

    module_name, _, factory_name = source.rpartition(":")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ConvertError(f"{source}: {file} does not exist")
            sys.path.insert(0, str(file.resolve().parent))  # its own imports beside it
            spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConvertError(f"{source}: cannot import {module_name} ({exc})") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConvertError(f"{source}: {module_name} has no function {factory_name!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ConvertError(f"{source}: {factory_name}() returned {type(model).__name__}, not a torch nn.Module")
    return model.eval()


def _with_outputs(module, inputs: list[TensorSpec], names: list[str]) -> Source:
    """Run the model once on an example batch: its outputs' count, datatypes and dims."""
    import torch

    arrays = example_inputs(inputs, batch=2, seed=0)
    try:
        with torch.inference_mode():
            result = module(*[torch.from_numpy(a) for a in arrays])
    except Exception as exc:  # any error of the user's model on the inputs they described
        raise ConvertError(f"the model fails on inputs {[f'{s.name}[N,{s.dims}]' for s in inputs]}: {exc}") from None
    results = list(result) if isinstance(result, tuple | list) else [result]
    if names and len(names) != len(results):
        raise ConvertError(f"--output names {len(names)} outputs, the model returns {len(results)}")
    names = names or [f"output{i}" for i in range(len(results))]
    outputs = []
    for name, tensor in zip(names, results, strict=True):
        datatype = "fp32" if tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch.")
        if datatype not in DATATYPES:
            raise ConvertError(f"output {name}: datatype {tensor.dtype} is not supported")
        outputs.append(TensorSpec(name, datatype, tuple(tensor.shape[1:])))
    if isinstance(module, torch.jit.ScriptModule):
        return Source("torch", module, inputs, outputs)
    traced = torch.jit.trace(module, tuple(torch.from_numpy(a) for a in arrays), check_trace=False)
    return Source("torch", traced, inputs, outputs, module)


def _load_onnx(path: Path) -> Source:
    import onnx

    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises several kinds on a file that is not a model
        raise ConvertError(f"{path}: not an ONNX model ({exc})") from None
    initializers = {i.name for i in model.graph.initializer}

    def specs(values) -> list[TensorSpec]:
        found = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            datatype = ONNX_TYPES.get(tensor.elem_type)
            if datatype is None:
                raise ConvertError(f"{path}: tensor {value.name} has ONNX element type {tensor.elem_type}, "
                                   f"not one of {', '.join(ONNX_TYPES.values())}")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            if not dims or dims[0] != -1:
                raise ConvertError(f"{path}: tensor {value.name} has no dynamic batch dimension first "
                                   f"(shape {dims}); export with dynamic_axes={{'{value.name}': {{0: 'batch'}}}}")
            found.append(TensorSpec(value.name, datatype, tuple(dims[1:])))
        return found

    return Source("onnx", path.read_bytes(), specs(model.graph.input), specs(model.graph.output))
