"""Triton Python-backend model written by `cpctl convert` as model.py: serves model.onnx with ONNX Runtime.

The CUDA execution provider on a GPU instance when this onnxruntime has it, else the CPU one. FP32 only:
reduced-precision variants come from torch sources. Under numpy 2 outputs go through DLPack (numpy-made ones
fail in this Triton build there), under numpy 1 numpy-made (DLPack of an array fails there); the arrays
they point into are kept until the next batch.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        providers = ["CPUExecutionProvider"]
        if args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        self.session = onnxruntime.InferenceSession(str(Path(__file__).parent / "model.onnx"), providers=providers)
        self.alive = []

    def execute(self, requests):
        per_input = [[_array(pb_utils.get_input_tensor_by_name(r, name)) for r in requests] for name in self.inputs]
        sizes = [len(a) for a in per_input[0]]
        feeds = {name: np.concatenate(arrays) for name, arrays in zip(self.inputs, per_input, strict=True)}
        results = [np.ascontiguousarray(r) for r in self.session.run(self.outputs, feeds)]
        self.alive = results
        responses, start = [], 0
        for size in sizes:
            outputs = [_tensor(name, r[start:start + size]) for name, r in zip(self.outputs, results, strict=True)]
            start += size
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses


def _array(tensor) -> np.ndarray:
    return np.from_dlpack(tensor) if NUMPY_2 else tensor.as_numpy()


def _tensor(name: str, array: np.ndarray):
    """Under numpy 2 `pb_utils.Tensor(name, array)` fails in this Triton build and DLPack works; under numpy 1
    it is the other way round."""
    array = np.ascontiguousarray(array)
    return pb_utils.Tensor.from_dlpack(name, array) if NUMPY_2 else pb_utils.Tensor(name, array)
