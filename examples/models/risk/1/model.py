"""Risk scoring: a 16-32-16-1 MLP; weights from weights.npz (made by ../train.py).

On a GPU instance (and torch importable) it runs in torch on that GPU, in the config's `precision` (fp32,
fp16: the cheaper variant `risk_fp16`); otherwise in numpy on the CPU. Tensors cross Triton as tensors.py
says (numpy 1 and 2).
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tensors.py and allocator.py beside this file
from allocator import cuda_allocator_gauges  # noqa: E402
from tensors import input_array, output_tensor  # noqa: E402

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class TritonPythonModel:
    def initialize(self, args):
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        precision = parameters.get("precision", "fp32")
        if precision not in NUMPY_DTYPES:
            raise ValueError(f"precision {precision!r}: one of {', '.join(NUMPY_DTYPES)}")
        weights = np.load(Path(__file__).parent / "weights.npz")
        layers = [(weights[f"w{i}"], weights[f"b{i}"]) for i in range(3)]
        self.torch = None
        self.allocator = None  # the CUDA allocator's gauges, on a GPU (allocator.py)
        if args["model_instance_kind"] == "GPU":
            try:
                import torch
            except ImportError:
                torch = None
            if torch is not None and torch.cuda.is_available():
                self.torch = torch
                device = torch.device(f"cuda:{args['model_instance_device_id']}")
                dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
                layers = [(torch.from_numpy(w).to(device, dtype), torch.from_numpy(b).to(device, dtype))
                          for w, b in layers]
                self.device, self.dtype = device, dtype
                self.allocator = cuda_allocator_gauges(args["model_name"], torch, device)
        if self.torch is None:
            layers = [(w.astype(NUMPY_DTYPES[precision]), b.astype(NUMPY_DTYPES[precision])) for w, b in layers]
            self.dtype = NUMPY_DTYPES[precision]
        self.layers = layers
        self.alive = []  # the arrays this batch's outputs point into, kept until the next batch

    def score_numpy(self, features: np.ndarray) -> np.ndarray:
        h = features.astype(self.dtype, copy=False)
        for w, b in self.layers[:-1]:
            h = np.maximum(h @ w + b, 0)
        w, b = self.layers[-1]
        return (1 / (1 + np.exp(-(h @ w + b).astype(np.float32)))).astype(np.float32)

    def score_torch(self, features):
        torch = self.torch
        with torch.inference_mode():
            h = features.to(self.device, self.dtype, non_blocking=True)
            for w, b in self.layers[:-1]:
                h = torch.relu(h @ w + b)
            w, b = self.layers[-1]
            return torch.sigmoid((h @ w + b).float())

    def execute(self, requests):
        # Dynamic batching hands over several requests: score them in one matrix product.
        inputs = [pb_utils.get_input_tensor_by_name(r, "features") for r in requests]
        if self.torch is not None:
            batches = [self.torch.from_dlpack(t.to_dlpack()) for t in inputs]
            scores = self.score_torch(self.torch.cat(batches))
        else:
            batches = [input_array(t) for t in inputs]
            scores = self.score_numpy(np.concatenate(batches))
        self.alive = [scores]
        responses, start = [], 0
        for batch in batches:
            part = scores[start:start + len(batch)]
            start += len(batch)
            responses.append(pb_utils.InferenceResponse([output_tensor("score", part)]))
        if self.allocator is not None:
            self.allocator.update()
        return responses

