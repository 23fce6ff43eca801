"""Risk scoring: a 16-32-16-1 MLP; weights from weights.npz (made by ../train.py).

On a GPU instance (and torch importable) it runs in torch on that GPU, in the config's `precision` (fp32,
fp16: the cheaper variant `risk_fp16`); otherwise in numpy on the CPU. Outputs are made through DLPack:
this Triton build's `pb_utils.Tensor(name, numpy_array)` fails under numpy 2 (shared/design/FACTS.md).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


class TritonPythonModel:
    def initialize(self, args):
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        precision = parameters.get("precision", "fp32")
        if precision not in NUMPY_DTYPES:
            raise ValueError(f"precision {precision!r}: one of {', '.join(NUMPY_DTYPES)}")
        weights = np.load(Path(__file__).parent / "weights.npz")
        layers = [(weights[f"w{i}"], weights[f"b{i}"]) for i in range(3)]
        self.torch = None
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
            batches = [np.from_dlpack(t) if NUMPY_2 else t.as_numpy() for t in inputs]
            scores = self.score_numpy(np.concatenate(batches))
        self.alive = [scores]
        responses, start = [], 0
        for batch in batches:
            part = scores[start:start + len(batch)]
            start += len(batch)
            responses.append(pb_utils.InferenceResponse([_tensor("score", part)]))
        return responses


def _tensor(name: str, value):
    """An output tensor: torch through its DLPack capsule; numpy through DLPack under numpy 2 (where
    `pb_utils.Tensor(name, array)` fails) and directly under numpy 1 (where from_dlpack of an array fails)."""
    if not isinstance(value, np.ndarray):
        from torch.utils.dlpack import to_dlpack

        return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
    if NUMPY_2:
        return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(value))
    return pb_utils.Tensor(name, np.ascontiguousarray(value))
