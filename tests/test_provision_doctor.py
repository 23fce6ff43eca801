"""`cpctl doctor`: the preflight checklist on this machine, on replayed tool output, and over real SSH.

- This machine has no GPU, driver or container engine: the GPU checks fail with their fix, nothing crashes.
- A few verdicts need hardware that cannot exist here (an old driver, a Fabric Manager at the wrong version,
  an old kubelet): those checks read replayed command output (`ReplayHost`).
- Over SSH (Fabric, the inventory's own connection variables): test hosts of tests/hosts/ with their
  simulated GPUs, sysfs and HCAs. h1 is fresh, h3 is provisioned by `cpctl provision` first (the dummy
  driver, toolkit and container toolkit packages of tests/hosts/aptrepo.py), `ghost` does not answer. Then
  an InfiniBand port goes down on h1 and an NVSwitch appears on h3 (sysfs entries written over SSH).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from controlplane.provision.cli import doctor, inventory
from controlplane.provision.doctor import (
    Expected,
    Host,
    Status,
    check_cuda,
    check_driver,
    check_fabric_manager,
    check_gpu,
    check_kubernetes,
    check_rdma,
)
from controlplane.provision.runner import run_site
from tests.hosts.aptrepo import DRIVER_VERSION
from tests.hosts.lab import HostSpec, Lab, start_lab, stop_lab

SPEC = Path(__file__).parent / "hosts" / "cluster.yaml"
CHECKS = ["GPU model and MIG", "NVIDIA driver", "CUDA >= 12.0", "container runtime", "NVIDIA container runtime",
          "Kubernetes >= 1.24", "RDMA / InfiniBand", "Fabric Manager"]

app = typer.Typer()
app.command("doctor")(doctor)
app.command("inventory")(inventory)


def run_doctor(*args: str) -> tuple[int, dict[str, dict[str, dict[str, str]]]]:
    """Exit code and host -> check -> result of `cpctl doctor --json ARGS`."""
    result = CliRunner().invoke(app, ["doctor", "--json", *args])
    assert "Traceback" not in result.output
    data = json.loads(result.stdout)
    assert data["failed"] == (result.exit_code == 1)
    return result.exit_code, {h: {r["check"]: r for r in checks} for h, checks in data["hosts"].items()}


# ------------------------------------------------------------------------------------------- this machine


def test_on_this_machine_without_a_gpu_the_gpu_checks_fail_with_their_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shutil.which("nvidia-smi") is None, "this test describes a machine without an NVIDIA driver"
    code, hosts = run_doctor()
    local = hosts["localhost"]
    assert code == 1 and list(local) == CHECKS
    for check in ("GPU model and MIG", "NVIDIA driver", "CUDA >= 12.0"):
        assert local[check]["status"] == "fail"
        assert local[check]["found"].startswith("nvidia-smi not found: no NVIDIA driver installed")
        assert "role nvidia_driver" in local[check]["fix"]
    assert local["Fabric Manager"]["status"] == "pass"
    table = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "250"})
    assert table.exit_code == 1 and "cpctl doctor: this machine" in table.stdout
    assert "fail" in table.stdout and "install the NVIDIA driver" in table.stdout


def test_bad_arguments_and_inventories_are_one_line_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["doctor", "--limit", "h1"])
    assert result.exit_code == 2 and "--limit needs --inventory" in result.stderr
    result = CliRunner().invoke(app, ["doctor", "-i", str(tmp_path / "nope.yml")])
    assert result.exit_code == 2 and "no such inventory" in result.stderr and "Traceback" not in result.output
    (tmp_path / "empty.yml").write_text("all:\n  hosts: {}\n")
    result = CliRunner().invoke(app, ["doctor", "-i", str(tmp_path / "empty.yml")])
    assert result.exit_code == 2 and "empty.yml: no hosts" in result.stderr
    (tmp_path / "jump.yml").write_text(yaml.safe_dump({"all": {"hosts": {"gpu-a": {
        "ansible_host": "10.0.0.5", "ansible_ssh_common_args": "-J a.example,b.example"}}}}))
    result = CliRunner().invoke(app, ["doctor", "-i", str(tmp_path / "jump.yml")])
    assert result.exit_code == 2 and "host gpu-a: ansible_ssh_common_args: one ProxyJump host" in result.stderr
    result = CliRunner().invoke(app, ["doctor", "--help"])
    assert result.exit_code == 0 and "Example: cpctl doctor -i" in result.stdout


# ------------------------------------------------------------------------------------------ replayed output


class ReplayHost(Host):
    """Answers commands from recorded output; any other command is 'not found', as in a shell."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers

    def _execute(self, command: str) -> tuple[int, str]:
        for prefix, output in self.answers.items():
            if command.startswith(prefix):
                return 0, output
        return 127, f"sh: 1: {command.split()[0]}: not found"


def h200_host(**answers: str) -> ReplayHost:
    """An H200 host answering `nvidia-smi` with the real capture's values."""
    return ReplayHost({"nvidia-smi --query-gpu": "0, NVIDIA H200, 580.159.04, Disabled\n", **answers})


def test_driver_and_cuda_older_than_cuda_12_fail() -> None:
    old = ReplayHost({"nvidia-smi --query-gpu": "0, NVIDIA A100-SXM4-80GB, 470.239.06, Disabled\n",
                      "nvidia-smi": "| NVIDIA-SMI 470.239.06   Driver Version: 470.239.06   CUDA Version: 11.4 |\n"})
    assert check_driver(old, Expected()).status is Status.FAIL
    cuda = check_cuda(old, Expected())
    assert (cuda.status, cuda.found) == (Status.FAIL, "the driver supports CUDA 11.4")
    gpu = check_gpu(old, Expected(gpu_model="H100-80GB"))
    assert gpu.status is Status.FAIL and "the inventory expects H100-80GB" in gpu.fix


def test_the_real_h200_passes_the_gpu_checks_and_warns_without_a_toolkit() -> None:
    summary = "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0     |\n"
    host = h200_host(**{"nvidia-smi": summary})  # after the GPU list: commands match by prefix, in order
    gpu = check_gpu(host, Expected(gpu_model="H200-141GB", gpu_count=1))
    assert (gpu.status, gpu.found) == (Status.PASS, "1 x NVIDIA H200 (H200-141GB); MIG mode Disabled")
    assert check_driver(host, Expected()).found == "driver 580.159.04"
    cuda = check_cuda(host, Expected())
    assert cuda.status is Status.WARN and cuda.found == "the driver supports CUDA 13.0; no CUDA toolkit on the host"


def test_nvswitch_board_needs_fabric_manager_at_the_driver_version() -> None:
    nvswitch = "0x10de 0x068000\n0x10de 0x030200\n"
    host = h200_host(**{"for d in /sys/bus/pci": nvswitch, "nv-fabricmanager --version":
                        "Fabric Manager version is : 580.95.05\n"})
    result = check_fabric_manager(host, Expected())
    assert result.status is Status.FAIL and "must match the driver version exactly" in result.fix
    assert result.found == "1 NVSwitch(es); Fabric Manager 580.95.05, driver 580.159.04"


def test_kubernetes_below_1_24_fails_and_is_required_on_k8s_nodes() -> None:
    old = check_kubernetes(ReplayHost({"kubelet --version": "Kubernetes v1.23.17\n"}), Expected())
    assert (old.status, old.found) == (Status.FAIL, "kubelet 1.23.17")
    missing = check_kubernetes(ReplayHost({}), Expected(kubernetes_node=True))
    assert missing.status is Status.FAIL and "role k8s_node" in missing.fix
    assert check_kubernetes(ReplayHost({"kubelet --version": "Kubernetes v1.31.4\n"}), Expected()).status is Status.PASS


def test_a_bastion_in_the_inventory_is_the_connections_gateway(tmp_path: Path) -> None:
    """Cloud pools are reached through a bastion: the inventory's ProxyJump (as `cpctl inventory` and the Pulumi
    program write it) becomes Fabric's gateway connection. (The jump itself is not exercised here: the SSH
    test hosts are reached through a ProxyCommand relay.)"""
    from controlplane.provision.doctor import inventory_hosts

    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"vars": {"ansible_user": "ubuntu"}, "hosts": {
        "gpu-a": {"ansible_host": "10.0.1.5", "ansible_ssh_common_args": "-o ProxyJump=admin@203.0.113.7:2222"},
        "gpu-b": {"ansible_host": "10.0.1.6", "ansible_ssh_common_args": "-J 203.0.113.7"}}}}))
    (a, _), (b, _) = inventory_hosts(str(tmp_path / "hosts.yml"))
    jump_a, jump_b = a.connection.gateway, b.connection.gateway
    assert (a.connection.host, a.connection.user) == ("10.0.1.5", "ubuntu")
    assert (jump_a.host, jump_a.user, jump_a.port) == ("203.0.113.7", "admin", 2222)
    assert (jump_b.host, jump_b.user, jump_b.port) == ("203.0.113.7", "ubuntu", 22)


def test_rdma_is_required_when_the_inventory_names_a_fabric() -> None:
    assert check_rdma(ReplayHost({}), Expected(rdma_fabric="infiniband")).status is Status.FAIL
    assert check_rdma(ReplayHost({}), Expected(rdma_fabric="none")).status is Status.WARN


# -------------------------------------------------------------------------------------------- over SSH


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("the SSH test hosts need root (namespaces, overlay mounts, chroot): run the tests as root")
    hosts = start_lab(tmp_path_factory.mktemp("doctor-hosts"), [HostSpec("h1", gpus=2),
                                                                HostSpec("h3", gpu_model="h200")])
    try:
        yield hosts
    finally:
        problems = stop_lab(hosts)
        assert not problems, f"the harness left things behind: {problems}"


@pytest.fixture(scope="module")
def inventory_dir(lab: Lab) -> Path:
    """The spec's inventory (`cpctl inventory`), the harness's connection settings beside it, h3 provisioned."""
    folder = lab.workdir / "inventory"
    result = CliRunner().invoke(app, ["inventory", "-f", str(SPEC), "-o", str(folder / "hosts.yml")])
    assert result.exit_code == 0, result.output
    hosts: dict[str, dict] = {name: {"ansible_host": host.address} for name, host in lab.hosts.items()}
    hosts["ghost"] = {"ansible_host": "10.213.0.99"}
    harness = {"all": {"vars": lab.ansible_vars(), "children": {"gpu_nodes": {"hosts": hosts}}}}
    (folder / "harness.yml").write_text(yaml.safe_dump(harness, sort_keys=False))
    lab.run("h3", "apt-get update -qq")
    provisioned = run_site(folder, limit="h3")
    assert provisioned.succeeded, (provisioned.failures, provisioned.output_tail)
    return folder


def test_over_ssh_a_fresh_host_fails_the_driver_checks_and_a_provisioned_one_passes(inventory_dir: Path) -> None:
    code, hosts = run_doctor("-i", str(inventory_dir), "--limit", "h1,h3,ghost")
    assert code == 1 and sorted(hosts) == ["ghost", "h1", "h3"]
    assert list(hosts["ghost"]) == ["ssh"] and hosts["ghost"]["ssh"]["status"] == "fail"
    assert "cannot run commands over SSH on 10.213.0.99" in hosts["ghost"]["ssh"]["found"]

    fresh = hosts["h1"]
    assert list(fresh) == CHECKS
    assert fresh["GPU model and MIG"]["status"] == "fail"
    assert fresh["GPU model and MIG"]["found"] == ("nvidia-smi not found: no NVIDIA driver installed; "
                                                    "2 NVIDIA GPU(s) on the PCI bus")
    assert fresh["NVIDIA container runtime"]["status"] == "fail"
    assert fresh["container runtime"]["status"] == "pass" and "containerd 1." in fresh["container runtime"]["found"]
    assert fresh["RDMA / InfiniBand"] == {"check": "RDMA / InfiniBand", "status": "pass",
                                          "found": "mlx5_0/1 ACTIVE 400 Gb/sec InfiniBand", "fix": ""}
    assert fresh["Kubernetes >= 1.24"]["status"] == "warn"

    ready = hosts["h3"]
    assert {check: r["status"] for check, r in ready.items()} == {
        "GPU model and MIG": "pass", "NVIDIA driver": "pass", "CUDA >= 12.0": "pass", "container runtime": "pass",
        "NVIDIA container runtime": "pass", "Kubernetes >= 1.24": "warn", "RDMA / InfiniBand": "pass",
        "Fabric Manager": "pass"}
    assert ready["GPU model and MIG"]["found"] == "1 x NVIDIA H200 (H200-141GB); MIG mode Enabled"
    assert ready["NVIDIA driver"]["found"] == f"driver {DRIVER_VERSION}"
    assert ready["CUDA >= 12.0"]["found"] == "the driver supports CUDA 12.8; toolkit 12.6"


def test_over_ssh_a_down_port_and_an_nvswitch_without_fabric_manager_fail(lab: Lab, inventory_dir: Path) -> None:
    lab.run("h1", "echo '2: INIT' > /sys/class/infiniband/mlx5_0/ports/1/state")
    lab.run("h3", "d=/sys/bus/pci/devices/0000:c0:00.0 && mkdir -p $d && echo 0x10de > $d/vendor && "
                  "echo 0x068000 > $d/class && echo 0x22a3 > $d/device")
    code, hosts = run_doctor("-i", str(inventory_dir), "--limit", "h1,h3")
    assert code == 1
    rdma = hosts["h1"]["RDMA / InfiniBand"]
    assert rdma["status"] == "fail" and "mlx5_0/1 INIT (LinkUp)" in rdma["fix"] and "subnet manager" in rdma["fix"]
    fabric_manager = hosts["h3"]["Fabric Manager"]
    assert fabric_manager["status"] == "fail"
    assert fabric_manager["found"] == "1 NVSwitch(es); nv-fabricmanager not installed"
    table = CliRunner().invoke(app, ["doctor", "-i", str(inventory_dir), "--limit", "h3"], env={"COLUMNS": "250"})
    assert table.exit_code == 1 and "nv-fabricmanager not installed" in table.stdout
