"""Streams a reply token by token: the prompt's words, reversed and cycled, up to max_tokens (default 8)."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

MAX_TOKENS = 256


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.delay_s = float(parameters.get("token_delay_ms", {}).get("string_value", "20")) / 1000

    def execute(self, requests):
        # Decoupled: answer from a thread so one slow stream does not hold the model instance.
        for request in requests:
            threading.Thread(target=self.stream, args=(request,), daemon=True).start()
        return None

    def stream(self, request):
        sender = request.get_response_sender()
        prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
        prompt = prompt.decode(errors="replace") if isinstance(prompt, bytes) else str(prompt)
        max_tokens_tensor = pb_utils.get_input_tensor_by_name(request, "max_tokens")
        max_tokens = int(max_tokens_tensor.as_numpy().reshape(-1)[0]) if max_tokens_tensor is not None else 8
        words = prompt.split()[::-1] or ["..."]
        for i in range(min(max(max_tokens, 0), MAX_TOKENS)):
            if self.delay_s:
                time.sleep(self.delay_s)
            token = np.array([(words[i % len(words)] + " ").encode()], dtype=np.object_)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", token)]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
