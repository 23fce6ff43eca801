"""Image classification (ResNet, see resnet.py) on the GPU when the instance is on one, else on the CPU.

Clients send what they have: encoded JPEG bytes (`jpeg`, BYTES, one image per row) or decoded pixels
(`pixels`, UINT8 [H, W, 3] per row, any size: resized on the device). JPEG is decoded on the GPU by
torchvision.io (nvJPEG) when torchvision is importable and the instance is on a GPU, else on the CPU (torchvision
or Pillow). Tensors cross the Triton boundary through DLPack both ways: zero-copy in, and out because this
Triton build's `pb_utils.Tensor(name, numpy_array)` fails under numpy 2 (shared/design/FACTS.md).

config.pbtxt parameters: `arch` (resnet50 | resnet-tiny), `precision` (fp32 | fp16 | bf16), `image_size`,
`weights` (a state dict file, relative to this folder; empty: the seeded init), `cuda_graph_batches` (batch sizes
captured as CUDA graphs at load on a GPU, e.g. "8,16,32,64,128,192,256": a batch runs as the graph of the next
size up, padded; empty: eager). On a GPU the CUDA allocator's reserved and allocated bytes are reported on the
shard's metrics port (allocator.py).
"""

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

sys.path.insert(0, str(Path(__file__).resolve().parent))  # resnet.py and allocator.py beside this file
from allocator import cuda_allocator_gauges  # noqa: E402
from resnet import PRECISIONS, GraphedBatches, prepare, preprocess, resnet  # noqa: E402

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
        self.model = prepare(network, self.device, self.precision)
        graph_batches = [int(b) for b in parameters.get("cuda_graph_batches", "").split(",") if b.strip()]
        if on_gpu and graph_batches:  # the captures also run cuDNN's tuning for those sizes, before traffic
            self.model = GraphedBatches(self.model, graph_batches, self.image_size, PRECISIONS[self.precision],
                                        self.device)
        self.allocator = cuda_allocator_gauges(args["model_name"], torch, self.device) if on_gpu else None

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
        """One request's images, preprocessed: [N, 3, S, S] on the device."""
        pixels = pb_utils.get_input_tensor_by_name(request, "pixels")
        if pixels is not None:
            images = torch.from_dlpack(pixels.to_dlpack()).to(self.device, non_blocking=True)
            return preprocess(images, self.image_size, PRECISIONS[self.precision])
        jpeg = pb_utils.get_input_tensor_by_name(request, "jpeg")
        if jpeg is None:
            raise ValueError("send one of the inputs `pixels` (UINT8 [N, H, W, 3]) or `jpeg` (BYTES [N, 1])")
        try:
            decoded = self.decode([row[0] for row in jpeg.as_numpy()])
        except (OSError, RuntimeError) as problem:  # Pillow's and nvJPEG's "not a JPEG"
            raise ValueError(f"`jpeg` holds an image that cannot be decoded ({problem})") from None
        return torch.cat([preprocess(image[None], self.image_size, PRECISIONS[self.precision]) for image in decoded])

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
            logits = self.model(torch.cat([x for _, x in batches])).float()
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


def _rgb(image):
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, as torch wants
