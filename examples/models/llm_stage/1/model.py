"""Triton Python-backend face of one pipeline stage (stage.py): tensors in, one batched step, tensors out.

The stage runs on the GPU when the server sees one (the shard's CUDA_VISIBLE_DEVICES), else on the CPU.
Activations leave as FP32 (`hidden_out`), the last stage's answer as the greedy next token. Tensors cross
through DLPack, not numpy: this Triton build's `pb_utils.Tensor(name, numpy_array)` fails under numpy 2 (the GPU
machine's), shared/design/FACTS.md.
"""

import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from stage import PipelineStage, StageError, StepInput, parse_stage_name
from torch.utils.dlpack import to_dlpack

START, END = 1, 2


class TritonPythonModel:
    def initialize(self, args):
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        checkpoint = Path(parameters.get("checkpoint", "checkpoint"))
        if not checkpoint.is_absolute():
            checkpoint = Path(args["model_repository"]) / checkpoint
        stage, stages = parse_stage_name(args["model_name"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = parameters.get("dtype", "auto")
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.stage = PipelineStage(checkpoint.resolve(), stage, stages, device=device, dtype=getattr(torch, dtype),
                                   max_sequences=int(parameters.get("max_sequences", "64")),
                                   idle_timeout_s=float(parameters.get("idle_timeout_s", "300")),
                                   max_positions=int(parameters.get("max_positions", "0")))

    def execute(self, requests):
        batch = [self._step_input(request) for request in requests]
        valid = [item for item in batch if not isinstance(item, StageError)]
        stepped = iter(self._on_host(self.stage.step(valid)))
        responses = []
        for item in batch:
            result = item if isinstance(item, StageError) else next(stepped)
            responses.append(self._response(result))
        return responses

    def _step_input(self, request):
        def read(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else torch.from_dlpack(tensor.to_dlpack())

        flags = int(read("flags").reshape(-1)[0])
        tokens = read("input_ids") if self.stage.first else read("hidden")
        if tokens is None:
            return StageError("this stage needs " + ("`input_ids`" if self.stage.first else "`hidden`"))
        tokens = tokens[0]
        width = self.stage.config.hidden_size
        if not self.stage.first and len(tokens) and (tokens.ndim != 2 or tokens.shape[1] != width):
            return StageError(f"`hidden` must be [1, T, {self.stage.config.hidden_size}]")
        return StepInput(int(read("sequence_id").reshape(-1)[0]), bool(flags & START), bool(flags & END), tokens)

    def _on_host(self, results):
        """The batch's outputs in host memory through ONE copy (one wait for the device, not one a sequence:
        with several stage processes on one GPU, each wait also waits out the others' time slices)."""
        dtype = torch.int64 if self.stage.last else torch.float32
        on_device = [r for r in results if isinstance(r, torch.Tensor) and r.device.type != "cpu"]
        if not on_device:
            return results
        flat = torch.cat([r.reshape(-1).to(dtype) for r in on_device]).cpu()
        pieces = iter(flat.split([r.numel() for r in on_device]))
        return [next(pieces).view(r.shape) if isinstance(r, torch.Tensor) and r.device.type != "cpu" else r
                for r in results]

    def _response(self, result):
        if isinstance(result, StageError):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result)))
        name = "next_token" if self.stage.last else "hidden_out"
        tensor = result.detach().to("cpu", torch.int64 if self.stage.last else torch.float32)[None].contiguous()
        return pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor))])
