"""Triton Python-backend model written by `cpctl convert` as model.py: serves model.pt (TorchScript).

On the instance's GPU when it has one, else on the CPU; floating inputs are cast to the variant's `precision`
(config parameter; the fp8 variant's network runs in BF16, its linear layers in FP8) and floating outputs back to
FP32, so every variant has the source's signature. Tensors cross the Triton boundary through DLPack both ways
(numpy outputs fail in this Triton build under numpy 2).
"""

import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        precision = parameters["precision"]
        self.dtype = PRECISIONS[precision]
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        on_gpu = args["model_instance_kind"] == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
        # FP32 means FP32: no TF32 tensor-core rounding (the variant is compared with the source at 1e-4).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model = torch.jit.load(str(Path(__file__).parent / "model.pt"), map_location=self.device)
        # The fp8 model is saved as it runs (BF16, FP8 weights, FP32 scales): a cast would undo its float8 weights.
        self.model = (model if precision == "fp8" else model.to(self.dtype)).eval()
        # TorchScript's CUDA fuser writes kernels that have no float8 type ("identifier float8_e4m3fn is
        # undefined", on the H200): the fp8 model runs unfused (what torch.jit.fuser("none") sets; this stub process
        # serves this one model).
        if precision == "fp8":
            torch._C._jit_set_texpr_fuser_enabled(False)
            torch._C._jit_override_can_fuse_on_gpu(False)

    @torch.inference_mode()
    def execute(self, requests):
        per_input = [[torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, name).to_dlpack()) for r in requests]
                     for name in self.inputs]
        sizes = [len(t) for t in per_input[0]]
        args = []
        for tensors in per_input:
            x = torch.cat(tensors).to(self.device, non_blocking=True)
            args.append(x.to(self.dtype) if x.is_floating_point() else x)
        result = self.model(*args)
        results = list(result) if isinstance(result, tuple | list) else [result]
        results = [r.float() if r.is_floating_point() else r for r in results]
        responses, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            start += size
            outputs = [pb_utils.Tensor.from_dlpack(name, to_dlpack(r[rows].contiguous()))
                       for name, r in zip(self.outputs, results, strict=True)]
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
