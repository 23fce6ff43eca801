"""Fixed work per batch (sleep or CPU spin), echoing its input: the benchmark model."""

import json
import time

import triton_python_backend_utils as pb_utils

MAX_WORK_MS = 1000.0


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.work_ms = float(parameters.get("work_ms", {}).get("string_value", "5"))
        self.spin = parameters.get("mode", {}).get("string_value", "sleep") == "spin"

    def requested_work_ms(self, request) -> float:
        asked = json.loads(request.parameters() or "{}").get("work_ms", self.work_ms)
        try:
            return min(max(float(asked), 0.0), MAX_WORK_MS)
        except (TypeError, ValueError):
            return self.work_ms

    def execute(self, requests):
        work_s = max(self.requested_work_ms(r) for r in requests) / 1000
        if self.spin:
            end = time.perf_counter() + work_s
            while time.perf_counter() < end:
                pass
        elif work_s > 0:
            time.sleep(work_s)
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
            for r in requests
        ]
