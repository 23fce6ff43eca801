"""Renderers of one plan: mig-parted config, node labels, extended resources (the nvidia-smi steps and the
diff against a node are the reconcile's: test_gpu_reconcile.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from controlplane.gpu.catalog import gpu_model
from controlplane.gpu.layout import place
from controlplane.gpu.plan import Plan, plan_cluster
from controlplane.gpu.render import (
    config_names,
    extended_resources,
    mig_parted_config,
    node_labels,
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


def test_media_extension_profiles_become_the_device_plugins_dot_me_resource() -> None:
    # The device plugin advertises `1g.10gb+me` as `nvidia.com/mig-1g.10gb.me` ('+' is not allowed in a
    # resource name); a pod requesting `mig-1g.10gb+me` would be refused by the API server.
    plan = small_plan()
    gpu = plan.pools[0].gpus_of(plan.pools[0].nodes[0])[0]
    assert resource_name(gpu, "1g.10gb+me") == "nvidia.com/mig-1g.10gb.me"
    assert resource_name(gpu, "3g.40gb") == "nvidia.com/mig-3g.40gb"
