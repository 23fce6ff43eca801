"""The GPU catalog: MIG-capable GPU models, their MIG profiles and where each profile may be placed.

A GPU has 8 memory slices (numbered 0..7, the "slots" below) and 7 compute slices. A MIG profile occupies
`size` consecutive memory slots starting at one of its allowed `starts` (what `nvidia-smi mig -lgipp`
prints as `{starts}:size`) and `compute_slices` of the 7 compute slices. Layout validation
(`controlplane.gpu.layout`) searches these placements; it never just sums slices.

Sources:
- H100-80GB (SXM, "NVIDIA H100 80GB HBM3") and H200-141GB: transcribed from the real captures in
  ../shared/data/nvidia-smi/{h100-80gb-hbm3,h200}/ (`mig -lgip`, `mig -lgipp`, NVML memory in MiB);
  tests/test_gpu_catalog.py re-parses those captures and checks that this table matches them.
- A100-40GB, A100-80GB: NVIDIA Multi-Instance GPU User Guide, "Supported MIG Profiles" (A100 table and
  placement diagram) and its `nvidia-smi mig -lgip` examples for A100-SXM4-40GB/80GB.
- H100-PCIE-80GB: same profile IDs, memory and placements as the SXM card (same GH100 die and 80 GB HBM);
  SM counts scaled to the PCIe card's 114 SMs as in the MIG User Guide's H100 table (fractions 1/7..7/7).
- H100-94GB-NVL: MIG User Guide H100 table for the 94 GB product, profile names as in the GPU Operator's
  default mig-parted config (1g.12gb, 1g.24gb, 2g.24gb, 3g.47gb, 4g.47gb, 7g.94gb); 132 SMs like the SXM card.
Placements of all these models follow the same GA100/GH100 pattern the H100/H200 captures show.

This is the one list of GPU models: the spec's `node_pools[].gpu.model` accepts exactly these names.
This module uses only the standard library: `controlplane.gpu.discover` imports it on GPU hosts where the
rest of the project's dependencies may be missing.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORY_SLOTS = 8
COMPUTE_SLICES = 7


@dataclass(frozen=True)
class MigProfile:
    """One GPU instance profile, e.g. 3g.40gb (NVML profile ID 9) on an H100-80GB."""

    name: str
    profile_id: int
    compute_slices: int
    memory_slices: int
    memory_mib: int
    sms: int
    starts: tuple[int, ...]
    max_instances: int

    @property
    def size(self) -> int:
        """Memory slots one instance covers (the `:size` of `nvidia-smi mig -lgipp`)."""
        return self.memory_slices

    @property
    def has_media_extensions(self) -> bool:
        return self.name.endswith("+me")


@dataclass(frozen=True)
class GpuModel:
    """A GPU model as the spec names it (`node_pools[].gpu.model`), with its MIG profiles."""

    name: str
    product_names: tuple[str, ...]
    memory_mib: int
    sms: int
    profiles: tuple[MigProfile, ...]
    # The mig-parted `all-balanced` layout of this model (GPU Operator default config).
    balanced: tuple[str, ...]

    def profile(self, name: str) -> MigProfile:
        """The profile called `name` (e.g. '1g.10gb'; a leading 'MIG ' is accepted); KeyError if none."""
        wanted = name.removeprefix("MIG ").strip()
        for profile in self.profiles:
            if profile.name == wanted:
                return profile
        raise KeyError(
            f"{self.name} has no MIG profile '{wanted}' (its profiles: {', '.join(p.name for p in self.profiles)})"
        )

    def profile_by_id(self, profile_id: int) -> MigProfile:
        for profile in self.profiles:
            if profile.profile_id == profile_id:
                return profile
        raise KeyError(f"{self.name} has no MIG profile with ID {profile_id}")


def _profiles(
    memory_gb: tuple[int, int, int, int, int],
    memory_mib: tuple[int, int, int, int, int],
    sms: tuple[int, int, int, int, int, int],
) -> tuple[MigProfile, ...]:
    """The seven GA100/GH100 profiles from their memory sizes: (1g, 1g double, 2g, 3g, 7g) GB names and MiB,
    and SMs of (1g, 1g double, 2g, 3g, 4g, 7g). 4g shares 3g's memory: both cover 4 memory slots."""
    gb1, gb1d, gb2, gb3, gb7 = memory_gb
    mib1, mib1d, mib2, mib3, mib7 = memory_mib
    sm1, sm1d, sm2, sm3, sm4, sm7 = sms
    return (
        MigProfile(f"1g.{gb1}gb", 19, 1, 1, mib1, sm1, (0, 1, 2, 3, 4, 5, 6), 7),
        MigProfile(f"1g.{gb1}gb+me", 20, 1, 1, mib1, sm1, (0, 1, 2, 3, 4, 5, 6), 1),
        MigProfile(f"1g.{gb1d}gb", 15, 1, 2, mib1d, sm1d, (0, 2, 4, 6), 4),
        MigProfile(f"2g.{gb2}gb", 14, 2, 2, mib2, sm2, (0, 2, 4), 3),
        MigProfile(f"3g.{gb3}gb", 9, 3, 4, mib3, sm3, (0, 4), 2),
        MigProfile(f"4g.{gb3}gb", 5, 4, 4, mib3, sm4, (0,), 1),
        MigProfile(f"7g.{gb7}gb", 0, 7, 8, mib7, sm7, (0,), 1),
    )


GPU_MODELS: dict[str, GpuModel] = {
    m.name: m
    for m in (
        GpuModel(
            "A100-40GB",
            ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB", "A100-SXM4-40GB", "A100-PCIE-40GB"),
            40960,
            108,
            _profiles((5, 10, 10, 20, 40), (4864, 9856, 9856, 19968, 40192), (14, 14, 28, 42, 56, 98)),
            ("1g.5gb", "1g.5gb", "2g.10gb", "3g.20gb"),
        ),
        GpuModel(
            "A100-80GB",
            ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "A100-SXM4-80GB", "A100 80GB PCIe"),
            81920,
            108,
            _profiles((10, 20, 20, 40, 80), (9728, 19968, 19968, 40192, 81152), (14, 14, 28, 42, 56, 98)),
            ("1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"),
        ),
        GpuModel(
            "H100-80GB",
            ("NVIDIA H100 80GB HBM3", "NVIDIA H100-SXM5-80GB"),
            81559,
            132,
            _profiles((10, 20, 20, 40, 80), (9984, 20096, 20096, 40448, 81152), (16, 26, 32, 60, 64, 132)),
            ("1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"),
        ),
        GpuModel(
            "H100-PCIE-80GB",
            ("NVIDIA H100 PCIe", "NVIDIA H100-PCIE-80GB"),
            81559,
            114,
            _profiles((10, 20, 20, 40, 80), (9984, 20096, 20096, 40448, 81152), (14, 14, 28, 42, 56, 114)),
            ("1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"),
        ),
        GpuModel(
            "H100-94GB-NVL",
            ("NVIDIA H100 NVL",),
            95830,
            132,
            _profiles((12, 24, 24, 47, 94), (11008, 22144, 22144, 47488, 95360), (16, 26, 32, 60, 64, 132)),
            ("1g.12gb", "1g.12gb", "2g.24gb", "3g.47gb"),
        ),
        GpuModel(
            "H200-141GB",
            ("NVIDIA H200", "NVIDIA H200 NVL"),
            143771,
            132,
            _profiles((18, 35, 35, 71, 141), (16384, 33280, 33280, 71424, 143360), (16, 26, 32, 60, 64, 132)),
            ("1g.18gb", "1g.18gb", "2g.35gb", "3g.71gb"),
        ),
    )
}


def gpu_model(name: str) -> GpuModel:
    """The catalog entry for a spec GPU model name; KeyError naming the known models otherwise."""
    try:
        return GPU_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown GPU model '{name}' (known: {', '.join(GPU_MODELS)})") from None


def model_for_product(product_name: str) -> GpuModel | None:
    """The catalog entry for a name NVML/nvidia-smi reports (e.g. 'NVIDIA H100 80GB HBM3'), if known."""
    wanted = product_name.strip().lower()
    for model in GPU_MODELS.values():
        if any(wanted == p.lower() for p in model.product_names):
            return model
    return None
