"""Risk scoring: a 16-32-16-1 MLP in numpy; weights from weights.npz (made by ../train.py)."""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        weights = np.load(Path(__file__).parent / "weights.npz")
        self.layers = [(weights[f"w{i}"], weights[f"b{i}"]) for i in range(3)]

    def score(self, features: np.ndarray) -> np.ndarray:
        h = features
        for w, b in self.layers[:-1]:
            h = np.maximum(h @ w + b, 0)
        w, b = self.layers[-1]
        return (1 / (1 + np.exp(-(h @ w + b)))).astype(np.float32)

    def execute(self, requests):
        # Dynamic batching hands over several requests: score them in one matrix product.
        batches = [pb_utils.get_input_tensor_by_name(r, "features").as_numpy() for r in requests]
        scores = self.score(np.concatenate(batches).astype(np.float32, copy=False))
        responses, start = [], 0
        for batch in batches:
            part = scores[start:start + len(batch)]
            start += len(batch)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", part)]))
        return responses
