"""Image classification (ResNet, see resnet.py) on the GPU when the instance is on one, else on the CPU.

Clients send what they have: encoded JPEG bytes (`jpeg`, BYTES, one image per row) or decoded pixels
(`pixels`, UINT8 [H, W, 3] per row, any size: resized on the device). JPEG is decoded on the GPU by
torchvision.io (nvJPEG) when torchvision is importable and the instance is on a GPU, else on the CPU (torchvision
or Pillow). Tensors cross the Triton boundary through DLPack both ways: zero-copy in, and out because this
Triton build's `pb_utils.Tensor(name, numpy_array)` fails under numpy 2 (shared/design/FACTS.md).

config.pbtxt parameters: `arch` (resnet50 | resnet-tiny), `precision` (fp32 | fp16 | bf16), `image_size`,
`weights` (a state dict file, relative to this folder; empty: the seeded init), and how a batch runs on a GPU
(resnet.FixedBatches; a batch runs at the next listed size up, padded):
- `compile_batches`: sizes compiled by torch.compile at load, e.g. "64,128,256" (empty: no compiling). The
  instances of all models on the machine share one inductor cache (`inductor_cache_dir`, default
  <tmp>/cpctl-inductor) and take turns compiling under a file lock there, so only the first instance pays the
  compile and the others load its kernels from the cache. If compiling fails the instance says so in Triton's
  log and falls back to:
- `cuda_graph_batches`: sizes captured as CUDA graphs at load, e.g. "8,16,32,64,128,192,256" (empty: eager).
The FP32 variant keeps PyTorch's default for cuDNN, TF32 tensor-core math on FP32 tensors (without it ResNet-50
ran 3.3k img/s instead of 9.4k on the H200; `cpctl convert`'s FP32 variants switch it off to compare at 1e-3).
On a GPU the CUDA allocator's reserved and allocated bytes are reported on the shard's metrics port (allocator.py).
"""

import fcntl
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

sys.path.insert(0, str(Path(__file__).resolve().parent))  # resnet.py and allocator.py beside this file
from allocator import cuda_allocator_gauges  # noqa: E402
from resnet import PRECISIONS, FixedBatches, classifier, prepare, resize_uint8, resnet  # noqa: E402

try:
    from torchvision.io import decode_jpeg
except ImportError:  # the CI machines' torch comes without torchvision: decode with Pillow there
    decode_jpeg = None


class TritonPythonModel:
    def initialize(self, args):
        parameters = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.precision = parameters.get("precision", "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: one of {', '.join(PRECISIONS)}")
        self.image_size = int(parameters.get("image_size", "224"))
        on_gpu = args["model_instance_kind"] == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu")
        if on_gpu:
            torch.backends.cudnn.benchmark = True
        weights = parameters.get("weights") or None
        network = resnet(parameters.get("arch", "resnet50"), Path(__file__).parent / weights if weights else None)
        self.classify = classifier(prepare(network, self.device, self.precision), self.image_size,
                                   PRECISIONS[self.precision])
        if on_gpu:
            self.classify = self.fixed_batches(args["model_name"], parameters)
        self.allocator = cuda_allocator_gauges(args["model_name"], torch, self.device) if on_gpu else None

    def fixed_batches(self, model_name: str, parameters: dict):
        """The classifier run at fixed batch sizes: compiled, else as CUDA graphs, else eagerly."""
        compile_sizes = _sizes(parameters.get("compile_batches", ""))
        if compile_sizes:
            cache = Path(parameters.get("inductor_cache_dir") or Path(tempfile.gettempdir()) / "cpctl-inductor")
            cache.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
            started = time.monotonic()
            try:
                with open(cache / "compile.lock", "w") as lock:  # one instance compiles at a time: the rest hit
                    fcntl.flock(lock, fcntl.LOCK_EX)            # the cache it filled
                    compiled = FixedBatches(self.classify, compile_sizes, self.image_size, self.device, "compile")
                _say(f"{model_name}: batches {compile_sizes} compiled in {time.monotonic() - started:.1f} s")
                return compiled
            except Exception as problem:  # an inductor or Triton-kernel failure: the graphs still serve
                _say(f"{model_name}: torch.compile failed ({type(problem).__name__}: {str(problem)[:300]}); "
                     "falling back to CUDA graphs")
        graph_sizes = _sizes(parameters.get("cuda_graph_batches", ""))
        if graph_sizes:  # the captures also run cuDNN's tuning for those sizes, before traffic
            return FixedBatches(self.classify, graph_sizes, self.image_size, self.device, "graph")
        return self.classify

    def decode(self, encoded: list[bytes]) -> list[torch.Tensor]:
        """JPEG bytes -> uint8 [H, W, 3] tensors on the model's device."""
        if decode_jpeg is not None:
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
            device = self.device if self.device.type == "cuda" else "cpu"
            images = decode_jpeg(data, device=device)  # [3, H, W] each
            return [image.permute(1, 2, 0).to(self.device) for image in images]
        from PIL import Image

        return [torch.from_numpy(_rgb(Image.open(io.BytesIO(b)))).to(self.device) for b in encoded]

    def images_of(self, request) -> torch.Tensor:
        """One request's images at the network's size: uint8 [N, S, S, 3] on the device."""
        pixels = pb_utils.get_input_tensor_by_name(request, "pixels")
        if pixels is not None:
            images = torch.from_dlpack(pixels.to_dlpack()).to(self.device, non_blocking=True)
            return resize_uint8(images, self.image_size)
        jpeg = pb_utils.get_input_tensor_by_name(request, "jpeg")
        if jpeg is None:
            raise ValueError("send one of the inputs `pixels` (UINT8 [N, H, W, 3]) or `jpeg` (BYTES [N, 1])")
        try:
            decoded = self.decode([row[0] for row in jpeg.as_numpy()])
        except (OSError, RuntimeError) as problem:  # Pillow's and nvJPEG's "not a JPEG"
            raise ValueError(f"`jpeg` holds an image that cannot be decoded ({problem})") from None
        return torch.cat([resize_uint8(image[None], self.image_size) for image in decoded])

    @torch.inference_mode()
    def execute(self, requests):
        # Dynamic batching hands over several requests: one forward pass for all of their images.
        batches, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                batches.append((i, self.images_of(request)))
            except ValueError as problem:  # the client's: no image, an undecodable JPEG (HTTP 400)
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"vision: {problem}", pb_utils.TritonError.INVALID_ARG))
            except Exception as problem:  # ours (HTTP 500), and for this request alone
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"vision: {type(problem).__name__}: {problem}"))
        if batches:
            logits = self.classify(torch.cat([x for _, x in batches])).float()
            top1 = logits.argmax(1, keepdim=True)
            start = 0
            for i, x in batches:
                rows = slice(start, start + len(x))
                start += len(x)
                wanted = set(requests[i].requested_output_names())
                outputs = [_tensor("top1", top1[rows])]
                if "logits" in wanted:
                    outputs.append(_tensor("logits", logits[rows]))
                responses[i] = pb_utils.InferenceResponse(outputs)
        if self.allocator is not None:
            self.allocator.update()
        return responses


def _tensor(name: str, value: torch.Tensor):
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


def _sizes(text: str) -> list[int]:
    return [int(size) for size in text.split(",") if size.strip()]


def _say(message: str) -> None:
    print(f"vision: {message}", file=sys.stderr, flush=True)  # lands in tritonserver's log


def _rgb(image):
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, as torch wants
