"""Fixed work per batch (sleep or CPU spin), echoing its input: the benchmark model.

A batch takes max(work_ms) + sum(per_item_ms x rows) over its requests: `work_ms` is the fixed cost of a
launch, `per_item_ms` the cost of each row, so with per_item_ms > 0 the model has a bounded capacity like a
GPU does, instead of absorbing any batch for free. Tensors cross Triton as tensors.py says (numpy 1 and 2).
"""

import json
import sys
import time
from pathlib import Path

import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tensors.py beside this file
from tensors import input_array, output_tensor  # noqa: E402

MAX_WORK_MS = 1000.0


def bounded(value, default: float) -> float:
    try:
        return min(max(float(value), 0.0), MAX_WORK_MS)
    except (TypeError, ValueError):
        return default


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.work_ms = float(parameters.get("work_ms", {}).get("string_value", "5"))
        self.per_item_ms = float(parameters.get("per_item_ms", {}).get("string_value", "0"))
        self.spin = parameters.get("mode", {}).get("string_value", "sleep") == "spin"

    def execute(self, requests):
        inputs = [input_array(pb_utils.get_input_tensor_by_name(r, "x")) for r in requests]
        asked = [json.loads(r.parameters() or "{}") for r in requests]
        work_ms = max(bounded(a.get("work_ms", self.work_ms), self.work_ms) for a in asked)
        work_ms += sum(bounded(a.get("per_item_ms", self.per_item_ms), self.per_item_ms) * len(x)
                       for a, x in zip(asked, inputs, strict=True))
        work_s = min(work_ms, MAX_WORK_MS) / 1000
        if self.spin:
            end = time.perf_counter() + work_s
            while time.perf_counter() < end:
                pass
        elif work_s > 0:
            time.sleep(work_s)
        self.alive = inputs  # the echoed outputs point into these (DLPack), kept until the next batch
        return [pb_utils.InferenceResponse([output_tensor("y", x)]) for x in inputs]
