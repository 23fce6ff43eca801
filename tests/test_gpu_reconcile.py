"""The one MIG reconcile, and its two callers printing the same steps for the same change.

The unit tests build discovered GPUs by hand. The agreement test runs both callers for real against one
simulated host per change: the fake `nvidia-smi` of the test hosts (tests/fakes/, real captured output,
the driver's MIG rules; its honesty is tested in test_provision_fakes.py) under FAKE_NVIDIA_ROOT, as
`cpctl mig steps --current live` sees it and as the mig role's `mig_plan` action sees it through Ansible
(`site.yml --tags mig --check`, local connection, the inventory `cpctl inventory` writes for the node).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from controlplane.gpu import cli
from controlplane.gpu.catalog import gpu_model
from controlplane.gpu.devices import ComputeInstanceInfo, GpuInfo, GpuInstanceInfo
from controlplane.gpu.reconcile import reconcile_gpu, reconcile_node
from controlplane.provision.inventory import inventory_from_spec
from controlplane.provision.runner import run_site
from controlplane.spec import load_spec

TESTS = Path(__file__).parent
SPEC = TESTS / "hosts" / "cluster.yaml"  # h1: GPU 0 3g.40gb x 2, GPU 1 no MIG; h2: GPU 0 1g.10gb x 3, GPU 1 no MIG
H100 = "NVIDIA H100 80GB HBM3"


def gpu(index: int, mig: bool, instances: list[tuple[str, int]], without_compute: tuple[str, ...] = (),
        name: str = H100) -> GpuInfo:
    """A discovered H100: MIG mode and GPU instances PROFILE@START, each with its compute instance unless
    listed in `without_compute`."""
    model = gpu_model("H100-80GB")
    gis = [GpuInstanceInfo(10 + k, model.profile(p).profile_id, p, s, model.profile(p).size)
           for k, (p, s) in enumerate(instances)]
    cis = [ComputeInstanceInfo(gi.gi_id, 0, 0, gi.profile) for gi in gis
           if f"{gi.profile}@{gi.start}" not in without_compute]
    return GpuInfo(index, name, f"GPU-{index}", 81559, 0, None, mig, mig, "H100-80GB",
                   gpu_instances=gis, compute_instances=cis)


def lines(commands: Any) -> list[str]:
    return [" ".join(c) for c in commands]


def test_instances_already_in_place_are_kept_and_only_the_rest_changes() -> None:
    result = reconcile_gpu(gpu(0, True, [("3g.40gb", 0), ("2g.20gb", 4)]),
                           ["3g.40gb", "1g.10gb", "1g.10gb"], "H100-80GB")
    assert (result.mig_mode, result.keep, result.destroy, result.create) == (
        "keep", ("3g.40gb@0",), ("2g.20gb@4",), ("1g.10gb@4", "1g.10gb@5"))
    assert lines(result.commands) == ["nvidia-smi mig -i 0 -gi 11 -dci", "nvidia-smi mig -i 0 -gi 11 -dgi",
                                      "nvidia-smi mig -i 0 -cgi 19:4,19:5 -C"]


def test_enabling_mig_comes_first_and_creation_is_largest_first_with_placements() -> None:
    result = reconcile_gpu(gpu(0, False, []), "all-balanced")
    assert result.mig_mode == "enable"
    assert lines(result.commands) == ["nvidia-smi -i 0 -mig 1", "nvidia-smi mig -i 0 -cgi 9:4,14:0,19:2,19:3 -C"]


def test_a_gpu_instance_without_its_compute_instance_is_recreated() -> None:
    result = reconcile_gpu(gpu(0, True, [("3g.40gb", 0), ("3g.40gb", 4)], without_compute=("3g.40gb@4",)),
                           ["3g.40gb", "3g.40gb"])
    assert result.keep == ("3g.40gb@0",)
    assert lines(result.commands) == ["nvidia-smi mig -i 0 -gi 11 -dgi", "nvidia-smi mig -i 0 -cgi 9:4 -C"]


def test_mig_off_destroys_every_instance_then_disables_mig() -> None:
    result = reconcile_gpu(gpu(1, True, [("7g.80gb", 0)]), None)
    assert result.mig_mode == "disable"
    assert lines(result.commands) == ["nvidia-smi mig -i 1 -gi 10 -dci", "nvidia-smi mig -i 1 -gi 10 -dgi",
                                      "nvidia-smi -i 1 -mig 0"]
    assert reconcile_gpu(gpu(1, False, []), None).commands == ()


def test_a_node_with_any_problem_gets_no_command_at_all() -> None:
    current = [gpu(0, False, []), gpu(1, False, [], name="NVIDIA Mystery GPU")]
    node = reconcile_node(current, {0: ["3g.40gb"], 1: ["3g.40gb"], 2: None}, "H100-80GB")
    assert node.gpus[0].commands and node.commands == []
    assert node.problems == (
        "GPU 1: a 'NVIDIA Mystery GPU', which the GPU catalog does not know: its MIG layouts cannot be validated",
        "GPU 2: not found on the node (it has 2 GPU(s))",
    )
    wrong_model = reconcile_node(current[:1], {0: ["3g.40gb"]}, "H200-141GB")
    assert wrong_model.problems == ("GPU 0: the node has a 'NVIDIA H100 80GB HBM3' (H100-80GB), the layout was "
                                    "made for H200-141GB",)
    impossible = reconcile_node(current[:1], {0: ["4g.40gb", "4g.40gb"]})
    assert "GPU 0: invalid MIG layout: 2 x 4g.40gb on H100-80GB" in impossible.problems[0]


# ------------------------------------------------------------------- the two callers agree, for real

# Each change: a simulated host's node in the spec, and the nvidia-smi commands that make its current state.
CHANGES: dict[str, tuple[str, list[str]]] = {
    "no-change": ("h1", ["-i 0 -mig 1", "mig -i 0 -cgi 9:0,9:4 -C"]),
    "add": ("h1", ["-i 0 -mig 1", "mig -i 0 -cgi 9:4 -C"]),
    "shrink": ("h2", ["-i 0 -mig 1", "mig -i 0 -cgi 9:4,19:0,19:1,19:2 -C"]),
    "reshape": ("h1", ["-i 0 -mig 1", "mig -i 0 -cgi 14:0,14:2,19:4 -C", "-i 1 -mig 1", "mig -i 1 -cgi 0:0 -C"]),
    "from-scratch": ("h2", []),
    "interrupted": ("h1", ["-i 0 -mig 1", "mig -i 0 -cgi 9:0 -C", "mig -i 0 -cgi 9:4"]),
}
EXPECTED = {
    "no-change": [],
    "add": ["nvidia-smi mig -i 0 -cgi 9:0 -C"],
    "shrink": ["nvidia-smi mig -i 0 -gi 2 -dci", "nvidia-smi mig -i 0 -gi 2 -dgi"],
    "reshape": ["nvidia-smi mig -i 0 -gi 11 -dci", "nvidia-smi mig -i 0 -gi 11 -dgi",
                "nvidia-smi mig -i 0 -gi 3 -dci", "nvidia-smi mig -i 0 -gi 3 -dgi",
                "nvidia-smi mig -i 0 -gi 4 -dci", "nvidia-smi mig -i 0 -gi 4 -dgi",
                "nvidia-smi mig -i 0 -cgi 9:0,9:4 -C",
                "nvidia-smi mig -i 1 -gi 0 -dci", "nvidia-smi mig -i 1 -gi 0 -dgi", "nvidia-smi -i 1 -mig 0"],
    "from-scratch": ["nvidia-smi -i 0 -mig 1", "nvidia-smi mig -i 0 -cgi 19:0,19:1,19:2 -C"],
    "interrupted": ["nvidia-smi mig -i 0 -gi 2 -dgi", "nvidia-smi mig -i 0 -cgi 9:4 -C"],
}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Change name -> the root of a simulated host with 2 H100s in that change's current state."""
    roots = {}
    for change, (_, setup) in CHANGES.items():
        root = tmp_path_factory.mktemp(change)
        (root / "usr/share/fake-nvidia").mkdir(parents=True)
        (root / "usr/share/fake-nvidia/captures").symlink_to(TESTS / "data" / "nvidia-smi")
        (root / "etc/fake-nvidia").mkdir(parents=True)
        (root / "etc/fake-nvidia/hardware.json").write_text(json.dumps({"model": "h100-80gb-hbm3", "count": 2}))
        for command in setup:
            done = subprocess.run([str(TESTS / "fakes" / "nvidia-smi"), *command.split()], capture_output=True,
                                  text=True, env={**os.environ, "FAKE_NVIDIA_ROOT": str(root)})
            assert done.returncode == 0, done.stdout + done.stderr
        roots[change] = root
    return roots


def fake_path(tmp_path: Path) -> str:
    """A PATH whose first folder holds the fake nvidia-smi."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    if not (folder / "nvidia-smi").exists():
        (folder / "nvidia-smi").symlink_to(TESTS / "fakes" / "nvidia-smi")
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def cli_steps(monkeypatch: pytest.MonkeyPatch, path: str, root: Path, node: str) -> list[str]:
    """`cpctl mig steps --current live` on the simulated host (NVML finds no driver here: nvidia-smi is read)."""
    app = typer.Typer()
    app.add_typer(cli.mig_app, name="mig")
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("FAKE_NVIDIA_ROOT", str(root))
    result = CliRunner().invoke(app, ["mig", "steps", "-f", str(SPEC), "--node", node, "--current", "live"])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def role_steps(tmp_path: Path, path: str, roots: dict[str, Path]) -> dict[str, list[str]]:
    """The commands the mig role's `mig_plan` returns for every simulated host, in one check-mode run of
    site.yml (--tags mig) over a local connection; each host's shell sees its own fake GPUs."""
    planned = inventory_from_spec(load_spec(SPEC)).data["all"]["children"]["gpu_nodes"]["children"]["pool_h100"]
    hosts = {}
    for change, root in roots.items():
        shell = tmp_path / f"sh-{change}"
        shell.write_text(f'#!/bin/sh\nexport FAKE_NVIDIA_ROOT={root} PATH="{path}"\nexec /bin/sh "$@"\n')
        shell.chmod(shell.stat().st_mode | stat.S_IXUSR)
        hosts[change] = {**planned["hosts"][CHANGES[change][0]], "ansible_connection": "local",
                         "ansible_shell_executable": str(shell), "ansible_python_interpreter": sys.executable,
                         "ansible_become": False}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"gpu_nodes": {
        "hosts": hosts, "vars": planned["vars"]}}}}))
    commands: dict[str, list[str]] = {}

    def collect(event: dict[str, Any]) -> None:
        data = event.get("event_data") or {}
        if event.get("event") == "runner_on_ok" and data.get("task", "").startswith("Read the MIG state"):
            commands[data["host"]] = lines(data["res"]["commands"])

    result = run_site(inventory, check=True, tags="mig", on_event=collect)
    assert result.succeeded, (result.failures, result.output_tail)
    return commands


def test_cpctl_mig_steps_and_the_mig_role_print_the_same_steps_for_each_change(
        hosts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fake_path(tmp_path)
    from_role = role_steps(tmp_path, path, hosts)
    for change, root in hosts.items():
        from_cli = cli_steps(monkeypatch, path, root, CHANGES[change][0])
        assert from_cli == from_role[change] == EXPECTED[change], change


def test_cpctl_mig_steps_applied_on_the_fake_reach_the_plan(hosts: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Running the printed steps against the driver's rules leaves nothing to do (the reshape, the hardest)."""
    path = fake_path(tmp_path)
    root = hosts["reshape"]
    for command in cli_steps(monkeypatch, path, root, "h1"):
        done = subprocess.run(command.split(), capture_output=True, text=True,
                              env={**os.environ, "PATH": path, "FAKE_NVIDIA_ROOT": str(root)})
        assert done.returncode == 0, done.stdout
    assert cli_steps(monkeypatch, path, root, "h1") == []
