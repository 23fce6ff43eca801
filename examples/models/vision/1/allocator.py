"""The CUDA caching allocator of this model instance's process, on the shard's Triton metrics port.

Shared by the GPU examples (linked into each model's version folder). Only the model's own process can read
its allocator (torch.cuda.memory_reserved/allocated), so the model reports it as Triton custom metrics
(`pb_utils.MetricFamily`): `cp_cuda_allocator_reserved_bytes` and `cp_cuda_allocator_allocated_bytes`, by
model and device, refreshed after each batch. The gateway reads them with Triton's own GPU gauges when it is
scraped (controlplane/gpu/telemetry.py) and exports the fragmentation, reserved-but-unallocated over reserved.
"""

import triton_python_backend_utils as pb_utils

FAMILIES = {
    "reserved": ("cp_cuda_allocator_reserved_bytes", "Bytes the CUDA caching allocator holds in this process."),
    "allocated": ("cp_cuda_allocator_allocated_bytes", "Bytes of live tensors in this process's CUDA allocator."),
}


class AllocatorGauges:
    """Two gauges of one model instance; `read()` gives (reserved, allocated) bytes."""

    def __init__(self, model: str, device: str, read):
        self.read = read
        labels = {"model": model, "device": device}
        # The families are kept: Triton drops a custom metric family once its Python object is gone.
        self.families = {key: pb_utils.MetricFamily(name=name, description=description,
                                                    kind=pb_utils.MetricFamily.GAUGE)
                         for key, (name, description) in FAMILIES.items()}
        self.gauges = {key: family.Metric(labels=labels) for key, family in self.families.items()}
        self.update()

    def update(self):
        reserved, allocated = self.read()
        self.gauges["reserved"].set(float(reserved))
        self.gauges["allocated"].set(float(allocated))


def cuda_allocator_gauges(model: str, torch, device) -> AllocatorGauges:
    """The gauges of the torch CUDA allocator on `device`."""
    return AllocatorGauges(model, str(device), lambda: (torch.cuda.memory_reserved(device),
                                                        torch.cuda.memory_allocated(device)))
