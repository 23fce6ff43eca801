"""`cpctl inventory`: the spec's GPU pools as Ansible groups, with the planner's MIG layouts per host."""

from __future__ import annotations

import re
from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from controlplane.gpu.catalog import gpu_model
from controlplane.gpu.layout import place
from controlplane.gpu.plan import plan_cluster
from controlplane.provision.cli import _extra_vars, inventory
from controlplane.provision.inventory import HOST_VARIABLES, POOL_VARIABLES, group_name, inventory_from_spec
from controlplane.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
GPU_SPEC = ROOT / "examples" / "gpu" / "cluster.yaml"

app = typer.Typer()
app.command("inventory")(inventory)
app.command("noop")(lambda: None)  # two commands keep Typer from collapsing the app into one


def test_groups_per_gpu_pool_with_model_count_fabric_and_layout() -> None:
    data = inventory_from_spec(load_spec(GPU_SPEC)).data
    pools = data["all"]["children"]["gpu_nodes"]["children"]
    assert set(pools) == {"pool_existing", "pool_burst"}
    assert pools["pool_existing"]["vars"] == {"gpu_model": "H100-80GB", "gpu_count": 8, "rdma_fabric": "infiniband"}
    assert pools["pool_burst"]["vars"]["mig_layout"] == "all-balanced"
    assert "hosts" not in pools["pool_burst"]  # a cloud pool: addresses come later
    assert set(pools["pool_existing"]["hosts"]) == {"gpu-a", "gpu-b"}


def test_auto_layouts_are_the_plans_and_every_one_fits() -> None:
    spec = load_spec(GPU_SPEC)
    plan = plan_cluster(spec)
    hosts = inventory_from_spec(spec, plan).data["all"]["children"]["gpu_nodes"]["children"]["pool_existing"]["hosts"]
    model = gpu_model("H100-80GB")
    for node in ("gpu-a", "gpu-b"):
        planned = {g.index: g.layout for g in plan.pool("existing").gpus_of(node)}
        written = {g["index"]: g["profiles"] for g in hosts[node]["mig_gpus"]}
        assert written == {i: None if layout is None else list(layout) for i, layout in planned.items()}
        for profiles in written.values():
            if profiles is not None:
                place(model, profiles)  # raises if the layout could not be created


def test_pool_without_mig_disables_it_and_cpu_pools_are_left_out() -> None:
    spec = parse_spec("""
cluster: c
model_repository: /models
node_pools:
  - {name: gpu.pool-1, provider: existing, instance_type: x, hosts: [n1], gpu: {model: A100-80GB, per_node: 4}}
  - {name: cpu, provider: existing, instance_type: y, count: 1, hosts: [c1]}
models: [{name: m, path: m, memory_mb: 100}]
shards: [{name: s, models: [m], pool: cpu}]
priority_classes: [{name: std, level: 1, default_deadline_ms: 100, share: 1}]
""")
    result = inventory_from_spec(spec)
    pools = result.data["all"]["children"]["gpu_nodes"]["children"]
    assert group_name("gpu.pool-1") == "pool_gpu_pool_1"
    assert pools == {"pool_gpu_pool_1": {
        "hosts": {"n1": {"k8s_node_labels": {"controlplane.io/pool": "gpu-pool-1",
                                             "nvidia.com/mig.config": "all-disabled"}}},
        "vars": {"gpu_model": "A100-80GB", "gpu_count": 4, "rdma_fabric": "none", "mig_layout": "all-disabled"}}}
    assert "k8s_nodes" not in result.data["all"]["children"]  # joining Kubernetes is asked for, not assumed
    assert any("'cpu' has no GPUs" in note for note in result.notes)


def test_cli_writes_a_file_ansible_reads(tmp_path: Path) -> None:
    output = tmp_path / "inv" / "hosts.yml"
    result = CliRunner().invoke(app, ["inventory", "-f", str(GPU_SPEC), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "2 host(s)" in result.output and "pool 'burst' (aws)" in result.output
    text = output.read_text()
    assert text.startswith("# Written by `cpctl inventory")
    assert yaml.safe_load(text) == inventory_from_spec(load_spec(GPU_SPEC)).data


def test_cli_reports_a_plan_that_does_not_fit_in_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(GPU_SPEC.read_text().replace("replicas: 3", "replicas: 200"))
    result = CliRunner().invoke(app, ["inventory", "-f", str(spec)])
    assert result.exit_code == 2
    assert "error:" in result.output and "GPUs" in result.output


def test_extra_vars_accept_key_value_mappings_and_files(tmp_path: Path) -> None:
    (tmp_path / "vars.yml").write_text("mig_layout: all-1g.10gb\n")
    merged = _extra_vars(["a=1", '{"mig_gpus": [{"index": 0, "profiles": null}]}', f"@{tmp_path / 'vars.yml'}"])
    assert merged == {"a": 1, "mig_gpus": [{"index": 0, "profiles": None}], "mig_layout": "all-1g.10gb"}


SPECS = sorted(ROOT.glob("examples/*/cluster.yaml")) + [ROOT / "tests" / "hosts" / "cluster.yaml"]
ROLES = ROOT / "playbooks" / "roles"
YAML_TYPES = {"str": str, "int": int, "list": list, "dict": dict, "bool": bool}


def role_options() -> dict[str, dict[str, dict]]:
    """variable -> role -> its argument spec, over every role."""
    options: dict[str, dict[str, dict]] = {}
    for specs in ROLES.glob("*/meta/argument_specs.yml"):
        for name, option in yaml.safe_load(specs.read_text())["argument_specs"]["main"]["options"].items():
            options.setdefault(name, {})[specs.parent.parent.name] = option
    return options


def test_every_inventory_variable_is_declared_by_the_roles_that_read_it_with_its_type() -> None:
    options = role_options()
    seen: set[str] = set()
    for spec_file in SPECS:
        inventory = inventory_from_spec(load_spec(spec_file), join_kubernetes=True)
        for group in inventory.pool_groups().values():
            host_vars = [v for v in (group.get("hosts") or {}).values()]
            for variables in [group["vars"], *host_vars]:
                for name, value in variables.items():
                    if name.startswith("ansible_"):
                        continue  # Ansible's own connection variables
                    seen.add(name)
                    assert name in options, f"{spec_file.name}: inventory variable {name} is read by no role"
                    for role, option in options[name].items():
                        assert isinstance(value, YAML_TYPES[option["type"]]), (
                            f"{name}={value!r} is not the {option['type']} role {role} declares")
                        assert value in option.get("choices", [value]), f"{name}={value!r} not in {role}'s choices"
    assert seen == set(POOL_VARIABLES + HOST_VARIABLES) - {"mig_profiles"}  # no example lists explicit profiles


def test_every_inventory_variable_the_roles_read_is_written() -> None:
    # What the roles' defaults take from the inventory: `{{ name | default(...) }}` of a name that is no
    # role's own variable. gpu_node_live_system is the operator's statement about the host, not the plan's.
    read = set()
    for defaults in ROLES.glob("*/defaults/main.yml"):
        read |= set(re.findall(r"\{\{\s*([a-z_]+)\s*\|\s*default", defaults.read_text()))
    own = set(role_options())
    external = {name for name in read if name not in own or name in POOL_VARIABLES + HOST_VARIABLES} - {
        "gpu_node_live_system"}
    written = set()
    for spec_file in SPECS:
        for group in inventory_from_spec(load_spec(spec_file)).pool_groups().values():
            written |= set(group["vars"])
    assert external, "no role reads the inventory: the pattern above broke"
    assert external <= written, f"roles read {external - written}, which no inventory carries"


def test_cli_join_kubernetes_puts_every_pool_in_k8s_nodes(tmp_path: Path) -> None:
    output = tmp_path / "hosts.yml"
    result = CliRunner().invoke(app, ["inventory", "-f", str(GPU_SPEC), "-o", str(output), "--join-kubernetes"])
    assert result.exit_code == 0, result.output
    groups = yaml.safe_load(output.read_text())["all"]["children"]
    assert groups["k8s_nodes"] == {"children": {"pool_existing": {}, "pool_burst": {}}}
    # Each host carries the labels kubelet registers it with at join.
    labels = groups["gpu_nodes"]["children"]["pool_existing"]["hosts"]["gpu-a"]["k8s_node_labels"]
    assert labels["controlplane.io/pool"] == "existing" and labels["nvidia.com/mig.config"].startswith("existing-")
