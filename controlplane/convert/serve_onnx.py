"""Triton Python-backend model written by `cpctl convert` as model.py: serves model.onnx with ONNX Runtime.

The CUDA execution provider on a GPU instance when this onnxruntime has it, else the CPU one. FP32 only:
reduced-precision variants come from torch sources. Outputs through DLPack (numpy outputs fail in this Triton
build under numpy 2); the arrays they point into are kept until the next batch.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils


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
        per_input = [[np.from_dlpack(pb_utils.get_input_tensor_by_name(r, name)) for r in requests]
                     for name in self.inputs]
        sizes = [len(a) for a in per_input[0]]
        feeds = {name: np.concatenate(arrays) for name, arrays in zip(self.inputs, per_input, strict=True)}
        results = [np.ascontiguousarray(r) for r in self.session.run(self.outputs, feeds)]
        self.alive = results
        responses, start = [], 0
        for size in sizes:
            outputs = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(r[start:start + size]))
                       for name, r in zip(self.outputs, results, strict=True)]
            start += size
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
