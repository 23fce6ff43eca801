"""The fp8 variant: the network in BF16 with every nn.Linear run as an FP8 (e4m3) matrix product on tensor cores.

Weights are quantized once (per-tensor scale amax/448), inputs per call (per-tensor dynamic scale), the product
is `torch._scaled_mm` with a BF16 result, then the bias. On CUDA `_scaled_mm` wants the inner dimension and both
dimensions of the weight multiples of 16 (torch's own check: "Expected both dimensions of mat2 to be divisible by
16"), so the weight is zero-padded to them and the output sliced back (ResNet-50's fc is 2048 -> 1000).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

E4M3_MAX = 448.0  # the largest finite torch.float8_e4m3fn
ALIGN = 16  # _scaled_mm's alignment of K and N on CUDA
FP8_CAPABILITY = (8, 9)  # Ada (8.9) and Hopper (9.0) have FP8 tensor cores


def fp8_unavailable() -> str | None:
    """Why this machine cannot run FP8 matrix products, or None when it can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    capability = torch.cuda.get_device_capability()
    if capability < FP8_CAPABILITY:
        return (f"this machine has {torch.cuda.get_device_name()} (compute capability "
                f"{capability[0]}.{capability[1]})")
    return None


def padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def quantize(x: torch.Tensor, largest: float = E4M3_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` as e4m3 with one FP32 scale (x ~= x_fp8 * scale): its largest magnitude maps to 448. (`largest` is
    an argument because TorchScript takes no float globals.)"""
    scale = (x.abs().max().float() / largest).clamp(min=1e-12)  # an all-zero x keeps a finite scale
    return (x.float() / scale).clamp(-largest, largest).to(torch.float8_e4m3fn), scale


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` with its last dimension zero-padded to `size` (zeros add nothing to a dot product)."""
    return x if x.shape[-1] == size else nn.functional.pad(x, [0, size - x.shape[-1]])


class Fp8Linear(nn.Module):
    """An nn.Linear's product in FP8: y = (x_fp8 @ w_fp8.T) * scale_x * scale_w + bias, in BF16."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = nn.functional.pad(linear.weight.detach().float(), [0, padded(self.in_features) - self.in_features,
                                                                     0, padded(self.out_features) - self.out_features])
        weight_fp8, weight_scale = quantize(weight)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", bias.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = pad_last(x.reshape(-1, self.in_features), self.weight_fp8.shape[1])
        x_fp8, x_scale = quantize(rows)
        y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16)
        y = y[:, :self.out_features] + self.bias
        return y.reshape(list(x.shape[:-1]) + [self.out_features])


def fp8_module(module: nn.Module) -> nn.Module:
    """A BF16 copy of `module` with every nn.Linear replaced by a scripted Fp8Linear. Scripted, so that tracing
    the whole network (as the other variants are) keeps its per-call input scale instead of freezing it."""
    if isinstance(module, nn.Linear):
        return torch.jit.script(Fp8Linear(module))
    copied = copy.deepcopy(module).to(torch.bfloat16)  # before the swap: .to() would cast float8 buffers too
    for name, linear in module.named_modules():  # the FP32 originals' weights are quantized
        if isinstance(linear, nn.Linear):
            parent_name, _, attribute = name.rpartition(".")
            setattr(copied.get_submodule(parent_name), attribute, torch.jit.script(Fp8Linear(linear)))
    return copied.eval()


def linear_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())
