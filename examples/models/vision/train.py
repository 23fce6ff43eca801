"""Trains the `vision` network for a few seconds on a synthetic labelled image set and writes its state dict.

Why: no image data set or pretrained weights can be had on the machines this project runs on, and the seeded
network (1/resnet.py) gives near-equal logits to a handful of classes, so comparing precisions by top-1 on it
measures rounding noise between ties. Trained briefly on images whose class is visible (each class a colour
layout of its own, varied by random perturbations and noise), the network predicts many classes with clear
margins: what a precision comparison (FP16/BF16 vs FP32 top-1) is meant to be about. The weights load through
the model's `weights` parameter; `labelled_images` with a seed of its own is the fixed comparison set.

    python examples/models/vision/train.py OUT.pt [--arch resnet50] [--size 224] [--seconds 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "1"))
from resnet import preprocess, resnet  # noqa: E402

CLASSES = 16  # class k is output k of the 1000
TEMPLATE_SEED = 2026


def labelled_images(count: int, size: int, seed: int, device: str | torch.device = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` uint8 images [N, size, size, 3] on `device` and their classes: a class's fixed coarse colour
    layout (6x6, seeded once for all), perturbed per image and smoothed up to `size`, plus pixel noise."""
    templates = torch.rand(CLASSES, 3, 6, 6, generator=torch.Generator().manual_seed(TEMPLATE_SEED)).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator, device=device)
    coarse = 0.6 * templates[labels] + 0.4 * torch.rand(count, 3, 6, 6, generator=generator, device=device)
    x = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.08 * torch.randn(count, 3, size, size, generator=generator, device=device)
    images = (x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return images, labels


def train(arch: str, size: int, device: str, seconds: float, max_steps: int = 2000, batch: int = 64) -> tuple:
    """The seeded network trained for `seconds` (at most `max_steps` steps of `batch` images; Adam; BF16
    autocast on a GPU), in eval mode on the CPU, and what the training did (steps, held-out accuracy)."""
    model = resnet(arch).to(device).to(memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1  # the running statistics follow training (the seeded init averaged them)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    started, steps, loss = time.monotonic(), 0, float("nan")
    while steps < max_steps and time.monotonic() - started < seconds:
        images, labels = labelled_images(batch, size, seed=steps, device=device)
        with autocast:
            logits = model(preprocess(images, size, torch.float32))
            step_loss = nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        step_loss.backward()
        optimizer.step()
        steps += 1
        if steps % 25 == 0:
            loss = step_loss.item()
    model.eval()
    images, labels = labelled_images(256, size, seed=10**6, device=device)  # held out: seeds past any step's
    with torch.inference_mode():
        predicted = model(preprocess(images, size, torch.float32)).argmax(1)
    report = {"arch": arch, "size": size, "device": device, "steps": steps, "batch": batch,
              "seconds": round(time.monotonic() - started, 1), "last_loss": round(loss, 4),
              "held_out_accuracy": round((predicted == labels).float().mean().item(), 4),
              "held_out_classes_predicted": len(set(predicted.tolist()))}
    return model.cpu(), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, report = train(args.arch, args.size, args.device, args.seconds)
    torch.save(model.state_dict(), args.out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
