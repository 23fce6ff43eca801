"""The GPU catalog against the real H100/H200 captures, the named layouts of every model, and the spec's use of
its model list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from controlplane.gpu.catalog import GPU_MODELS, gpu_model, model_for_product
from controlplane.gpu.layout import named_layouts, place
from controlplane.gpu.nvidia_smi import parse_lgip, parse_lgipp
from controlplane.spec import GpuSpec

CAPTURES = Path(__file__).parent / "data" / "nvidia-smi"
CAPTURED = {"H100-80GB": "h100-80gb-hbm3", "H200-141GB": "h200"}


def _nvml_memory(folder: str) -> dict[int, int]:
    """Profile ID -> MiB from the nvml.txt capture."""
    text = (CAPTURES / folder / "nvml.txt").read_text()
    return {int(pid): int(mib) for pid, mib in re.findall(r" id (\d+) slices \d+ instances \d+ mem_MiB (\d+)", text)}


@pytest.mark.parametrize("model_name", sorted(CAPTURED))
def test_captured_models_match_nvidia_smi_lgip_and_lgipp(model_name: str) -> None:
    folder = CAPTURES / CAPTURED[model_name]
    listed = parse_lgip((folder / "mig-lgip.txt").read_text())[0]
    placements = parse_lgipp((folder / "mig-lgipp.txt").read_text())[0]
    model = gpu_model(model_name)
    assert [p.name for p in model.profiles] == [p.name for p in listed]
    for seen in listed:
        profile = model.profile(seen.name)
        assert profile.profile_id == seen.profile_id
        assert profile.max_instances == seen.total
        assert profile.sms == seen.sms
        assert abs(profile.memory_mib - seen.memory_mib) < 16  # lgip prints GiB with two decimals
        assert [(s, profile.size) for s in profile.starts] == placements[seen.profile_id]


@pytest.mark.parametrize("model_name", sorted(CAPTURED))
def test_captured_models_memory_matches_nvml_exactly(model_name: str) -> None:
    memory = _nvml_memory(CAPTURED[model_name])
    model = gpu_model(model_name)
    assert {p.profile_id: p.memory_mib for p in model.profiles} == memory


@pytest.mark.parametrize("model_name", sorted(GPU_MODELS))
def test_every_named_layout_of_every_model_validates(model_name: str) -> None:
    model = gpu_model(model_name)
    layouts = named_layouts(model)
    assert layouts["all-disabled"] is None and layouts["all-enabled"] == ()
    assert "all-balanced" in layouts
    for name, layout in layouts.items():
        if layout:
            assert len(place(model, layout)) == len(layout), name


def test_named_layouts_resolve_per_model_like_the_gpu_operator_defaults() -> None:
    h100, a100_40, h200, nvl = (gpu_model(n) for n in ("H100-80GB", "A100-40GB", "H200-141GB", "H100-94GB-NVL"))
    assert named_layouts(h100)["all-1g.10gb"] == ("1g.10gb",) * 7
    assert named_layouts(h100)["all-2g.20gb"] == ("2g.20gb",) * 3
    assert named_layouts(h100)["all-3g.40gb"] == ("3g.40gb",) * 2
    assert named_layouts(h100)["all-1g.10gb.me"] == ("1g.10gb+me",)
    assert named_layouts(a100_40)["all-1g.10gb"] == ("1g.10gb",) * 4  # the 2-slot 1g profile on A100-40GB
    assert named_layouts(a100_40)["all-balanced"] == ("1g.5gb", "1g.5gb", "2g.10gb", "3g.20gb")
    assert named_layouts(h200)["all-balanced"] == ("1g.18gb", "1g.18gb", "2g.35gb", "3g.71gb")
    assert "all-1g.10gb" not in named_layouts(h200)
    assert named_layouts(nvl)["all-3g.47gb"] == ("3g.47gb",) * 2


def test_product_names_from_the_captures_map_to_catalog_models() -> None:
    assert model_for_product("NVIDIA H100 80GB HBM3") is gpu_model("H100-80GB")
    assert model_for_product("NVIDIA H200") is gpu_model("H200-141GB")
    assert model_for_product("Tesla T4") is None


def test_unknown_model_and_profile_errors_name_what_is_known() -> None:
    with pytest.raises(KeyError, match="known: A100-40GB"):
        gpu_model("B200")
    with pytest.raises(KeyError, match="its profiles: 1g.10gb"):
        gpu_model("H100-80GB").profile("1g.5gb")
    assert gpu_model("H100-80GB").profile("MIG 3g.40gb").profile_id == 9


def test_the_spec_accepts_exactly_the_catalog_models() -> None:
    for name in ("none", *GPU_MODELS):
        assert GpuSpec(model=name).model == name
    with pytest.raises(ValidationError) as err:
        GpuSpec(model="H100")
    assert all(name in str(err.value) for name in GPU_MODELS)
