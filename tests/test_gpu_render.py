"""Renderers of one plan: mig-parted config, node labels, extended resources, nvidia-smi steps, diff."""

from __future__ import annotations

from pathlib import Path

import yaml

from controlplane.gpu.catalog import gpu_model
from controlplane.gpu.discover import GpuInfo, GpuInstanceInfo, Inventory
from controlplane.gpu.layout import place
from controlplane.gpu.plan import Plan, plan_cluster
from controlplane.gpu.render import (
    config_names,
    diff_node,
    extended_resources,
    mig_parted_config,
    node_labels,
    nvidia_smi_steps,
    replica_resources,
    resource_name,
)
from controlplane.spec import load_spec
from tests.test_gpu_plan import AUTO, SMALL, make_spec

ROOT = Path(__file__).resolve().parent.parent


def small_plan() -> Plan:
    """One node of 2 H100s: a dedicated 3g.40gb and two dedicated 1g.10gb on GPU 0, GPU 1 left free."""
    spec = make_spec(
        [
            {"name": "big", "models": ["llm"], "priority_class": "critical"},
            {"name": "c", "models": ["a"], "priority_class": "critical", "replicas": 2},
        ],
        {"llm": 38000, "a": SMALL},
        per_node=2,
        mig=AUTO,
    )
    return plan_cluster(spec)


def test_mig_parted_config_has_one_config_per_node_layout_and_every_layout_fits() -> None:
    plan = plan_cluster(load_spec(ROOT / "examples" / "gpu" / "cluster.yaml"))
    config = yaml.safe_load(mig_parted_config(plan))
    assert config["version"] == "v1"
    configs = config["mig-configs"]
    assert configs["all-disabled"] == [{"devices": "all", "mig-enabled": False}]
    assert set(config_names(plan).values()) <= set(configs)
    for name, entries in configs.items():
        model = gpu_model("H200-141GB" if name == "all-balanced" else "H100-80GB")
        for entry in entries:
            if entry["mig-enabled"]:
                layout = [p for p, n in entry["mig-devices"].items() for _ in range(n)]
                assert place(model, layout)


def test_small_plan_renders_exact_config_labels_and_resources() -> None:
    plan = small_plan()
    assert yaml.safe_load(mig_parted_config(plan))["mig-configs"]["p-1"] == [
        {"devices": [0], "mig-enabled": True, "mig-devices": {"3g.40gb": 1, "1g.10gb": 2}},
        {"devices": [1], "mig-enabled": False},
    ]
    assert node_labels(plan) == {"p-0": {"nvidia.com/mig.config": "p-1"}}
    assert extended_resources(plan) == {"p-0": {"nvidia.com/gpu": 1, "nvidia.com/mig-1g.10gb": 2,
                                                "nvidia.com/mig-3g.40gb": 1}}
    resources = {r.replica.name: r.resource for r in replica_resources(plan)}
    assert resources == {"big-0": "nvidia.com/mig-3g.40gb", "c-0": "nvidia.com/mig-1g.10gb",
                         "c-1": "nvidia.com/mig-1g.10gb"}


def test_named_pool_layout_keeps_its_mig_parted_name() -> None:
    plan = plan_cluster(load_spec(ROOT / "examples" / "gpu" / "cluster.yaml"))
    assert node_labels(plan)["burst-0"] == {"nvidia.com/mig.config": "all-balanced"}


def test_shared_instances_are_reported_for_time_slicing() -> None:
    plan = plan_cluster(make_spec(
        [{"name": "s", "models": ["a"]}, {"name": "t", "models": ["a"]}], {"a": SMALL}, per_node=1, mig=AUTO
    ))
    shared = {r.replica.name: r.shared_with for r in replica_resources(plan)}
    assert shared == {"s-0": ("t-0",), "t-0": ("s-0",)}


def test_nvidia_smi_steps_pin_placements_and_disable_mig_on_free_gpus() -> None:
    assert nvidia_smi_steps(small_plan(), "p-0") == [
        "nvidia-smi -i 0 -mig 1",
        "nvidia-smi mig -i 0 -dci",
        "nvidia-smi mig -i 0 -dgi",
        "nvidia-smi mig -i 0 -cgi 9:0,19:4,19:5 -C",
        "nvidia-smi -i 1 -mig 0",
    ]


def _gpu(index: int, mig: bool, instances: list[tuple[str, int]]) -> GpuInfo:
    model = gpu_model("H100-80GB")
    gis = [GpuInstanceInfo(k, model.profile(p).profile_id, p, s, model.profile(p).size)
           for k, (p, s) in enumerate(instances)]
    return GpuInfo(index, "NVIDIA H100 80GB HBM3", f"GPU-{index}", 81559, 0, 0, mig, mig, "H100-80GB",
                   gpu_instances=gis)


def test_diff_keeps_matching_instances_and_lists_the_rest() -> None:
    _, desired = small_plan().node("p-0")
    current = [_gpu(0, True, [("3g.40gb", 0), ("2g.20gb", 4)]), _gpu(1, True, [])]
    gpu0, gpu1 = diff_node(desired, current)
    assert (gpu0.mig_mode, gpu0.keep, gpu0.destroy, gpu0.create) == (
        "keep", ("3g.40gb@0",), ("2g.20gb@4",), ("1g.10gb@4", "1g.10gb@5")
    )
    assert gpu1.mig_mode == "disable" and gpu1.changes


def test_diff_against_the_real_h200_inventory_flags_model_and_missing_gpus() -> None:
    inventory = Inventory.from_dict(yaml.safe_load(
        (ROOT / "tests" / "data" / "nvidia-smi" / "h200" / "cpctl-gpu.json").read_text()
    ))
    _, desired = small_plan().node("p-0")
    gpu0, gpu1 = diff_node(desired, inventory.gpus)
    assert gpu0.mig_mode == "enable" and "node has NVIDIA H200, the plan expects H100-80GB" in gpu0.note
    assert (gpu1.mig_mode, gpu1.note) == ("-", "GPU not found on the node")


def test_an_up_to_date_node_has_no_changes() -> None:
    _, desired = small_plan().node("p-0")
    current = [_gpu(0, True, [("3g.40gb", 0), ("1g.10gb", 4), ("1g.10gb", 5)]), _gpu(1, False, [])]
    assert not any(c.changes for c in diff_node(desired, current))


def test_media_extension_profiles_become_the_device_plugins_dot_me_resource() -> None:
    # The device plugin advertises `1g.10gb+me` as `nvidia.com/mig-1g.10gb.me` ('+' is not allowed in a
    # resource name); a pod requesting `mig-1g.10gb+me` would be refused by the API server.
    plan = small_plan()
    gpu = plan.pools[0].gpus_of(plan.pools[0].nodes[0])[0]
    assert resource_name(gpu, "1g.10gb+me") == "nvidia.com/mig-1g.10gb.me"
    assert resource_name(gpu, "3g.40gb") == "nvidia.com/mig-3g.40gb"
