"""The `vision` model's network and preprocessing, in plain torch (no torchvision needed).

`resnet(arch)` builds torchvision's ResNet architecture (bottleneck blocks, stride on the 3x3 conv, the same
parameter names), so a torchvision `resnet50` state dict loads into it unchanged. `resnet-tiny` is the same
shape of network with one block per stage and 8 base channels: what the CPU tests serve.

Weights: a state dict file when given, else a seeded init (torch.manual_seed(0), torchvision's init rules):
no weights can be downloaded on the machines this project runs on, so a seeded network is what is measured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# Stages (blocks per stage) and base width of each architecture.
ARCHITECTURES = {"resnet50": ([3, 4, 6, 3], 64), "resnet-tiny": ([1, 1, 1, 1], 8)}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], base: int, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = base
        for stage, count in enumerate(blocks):
            width = base * 2**stage
            layers = []
            for i in range(count):
                layers.append(Bottleneck(channels, width, stride=2 if stage > 0 and i == 0 else 1))
                channels = width * Bottleneck.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # torchvision's init rules
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(arch: str = "resnet50", weights: str | Path | None = None, num_classes: int = 1000) -> ResNet:
    """The network in eval mode: `weights` (a state dict file) when given, else seeded (seed 0).

    A seeded network's BatchNorm statistics are then taken from seeded images (sample_images): with the
    init's statistics (mean 0, variance 1) activations grow block after block and every input gets the same
    class, which would make top-1 comparisons between precisions meaningless.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(ARCHITECTURES)}")
    blocks, base = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = ResNet(blocks, base, num_classes)
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(preprocess(sample_images(16, 64, seed=1000 + seed), 64, torch.float32))
    return model.eval()


def resnet50() -> ResNet:
    """The `vision` example's network (for `cpctl convert examples/models/vision/1/resnet.py:resnet50`)."""
    return resnet("resnet50")


def resnet_tiny() -> ResNet:
    return resnet("resnet-tiny")


def sample_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """`count` seeded uint8 images [N, size, size, 3]: smooth random colour fields with noise, image-like enough
    for a fixed comparison set (no image data set can be downloaded here)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 6, 6, generator=generator)
    x = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.1 * torch.randn(count, 3, size, size, generator=generator)
    return (x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def prepare(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """The model moved to `device` in `precision`, channels-last (the tensor-core friendly layout)."""
    return model.to(device=device, dtype=PRECISIONS[precision]).to(memory_format=torch.channels_last)


def preprocess(images: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> normalized [N, 3, size, size] in `dtype`, channels-last, on their device."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-2:] != (size, size):
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = _normalization(x.device)
    return ((x - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)


def capture(step: Callable[[], torch.Tensor], pool=None) -> Callable[[], torch.Tensor]:
    """`step` captured as a CUDA graph (after a warm-up on a side stream, which also lets cuDNN's benchmark mode
    pick its algorithms outside the capture); returns a replay that gives the graph's output tensor."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


class FixedBatches:
    """`step` (uint8 images [N, S, S, 3] on the device -> logits) run at a few fixed batch sizes: a batch is copied
    into the static input of the next size up (padded; larger batches run `step` eagerly). Two ways to run a size:
    - "graph": captured as a CUDA graph; the launch overhead of ~160 kernels per batch is gone. The graphs share
      one memory pool, captured largest first so the smaller ones fit in what it already holds.
    - "compile": `step` compiled by torch.compile (inductor; static shapes, one compiled graph per size), which
      fuses preprocessing, BatchNorm and ReLU into fewer, faster kernels: 1.6x the graph's speed in process on
      the H200 (bench/results/gpu-2026-11-30-run2.md). Each size is compiled and warmed up here, at load.
    An output may be a view of a buffer the next call overwrites: use it before then."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], sizes: list[int], image_size: int,
                 device: torch.device, mode: str) -> None:
        if mode not in ("graph", "compile"):
            raise ValueError(f"mode {mode!r}: graph or compile")
        self.step, self.sizes, self.mode = step, sorted(sizes), mode
        self.runs: dict[int, tuple[torch.Tensor, Callable[[], torch.Tensor]]] = {}
        compiled = torch.compile(step, dynamic=False) if mode == "compile" else None
        pool = torch.cuda.graph_pool_handle() if mode == "graph" else None
        with torch.inference_mode():
            for size in reversed(self.sizes):
                x = torch.zeros(size, image_size, image_size, 3, dtype=torch.uint8, device=device)
                if compiled is None:
                    self.runs[size] = (x, capture(lambda x=x: step(x), pool))
                else:
                    for _ in range(2):  # the first call compiles, the second runs what cuDNN's tuning picked
                        compiled(x)
                    self.runs[size] = (x, lambda x=x: compiled(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = next((s for s in self.sizes if s >= len(x)), None)
        if size is None:
            return self.step(x)
        static_input, run = self.runs[size]
        static_input[:len(x)].copy_(x)
        return run()[:len(x)]


def classifier(model: nn.Module, size: int, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The served work on uint8 images [N, size, size, 3] on the model's device: preprocess, then the model."""
    _normalization(next(model.parameters()).device)  # made now: not inside a compiler's trace or a graph capture

    def step(images: torch.Tensor) -> torch.Tensor:
        return model(preprocess(images, size, dtype))

    return step


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> uint8 [N, size, size, 3] (antialiased bilinear, as preprocess resizes):
    every batch then has the one shape that the fixed-size graphs and compiled kernels take."""
    if images.shape[1:3] == (size, size):
        return images
    x = nn.functional.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear",
                                  antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


_NORMALIZATION: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalization(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std on `device`, made once: no host-to-device copy per batch (nor in a CUDA graph)."""
    if device not in _NORMALIZATION:
        _NORMALIZATION[device] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                                  torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
    return _NORMALIZATION[device]
