"""Risk scoring, cheaper: logistic regression in numpy; weights from weights.npz (made by ../risk/train.py).
Tensors cross Triton as tensors.py says (numpy 1 and 2)."""

import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tensors.py beside this file
from tensors import input_array, output_tensor  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        weights = np.load(Path(__file__).parent / "weights.npz")
        self.w, self.b = weights["w"], weights["b"]
        self.alive = []  # the array this batch's outputs point into (DLPack), kept until the next batch

    def execute(self, requests):
        batches = [input_array(pb_utils.get_input_tensor_by_name(r, "features")) for r in requests]
        scores = (1 / (1 + np.exp(-(np.concatenate(batches) @ self.w + self.b)))).astype(np.float32)
        self.alive = [scores]
        responses, start = [], 0
        for batch in batches:
            responses.append(pb_utils.InferenceResponse([output_tensor("score", scores[start:start + len(batch)])]))
            start += len(batch)
        return responses
