"""`cpctl provision` end to end over real SSH: site.yml on test hosts in network namespaces (tests/hosts/).

The inventory is the one the Pulumi program exports (`ansibleInventory`, run under its offline mocks as an
`existing` stack whose inventory names the hosts' addresses): the generated contract, groups gpu_nodes and
k8s_nodes, drives the real site.yml. Five hosts of tests/hosts/cluster.yaml: h1 and h2 (2 x H100 each, MIG
layouts chosen by the planner; h1 an HGX board with NVSwitches), h3 and h4 (1 x H200, `all-balanced`), h4
kept fresh for the check-mode test, and `ghost`, an address where nothing listens; plus h5, a cloud VM's
H100 whose MIG mode changes wait for a reboot (outside the spec, for the mig role's tests). h1 and h5 are
Kubernetes nodes whose drain and uncordon hooks append to the fake nvidia-smi's log on the host, so their
order relative to the MIG commands can be checked.

The tests share one set of hosts and run in file order: the first run provisions h1-h3, the next ones
build on that state. What the hosts hold is read over SSH with Fabric.
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from controlplane.gpu.nvidia_smi import parse_lgi
from controlplane.infra.offline import ProgramRun
from controlplane.provision.cli import inventory, provision
from controlplane.provision.inventory import group_name
from controlplane.spec import load_spec
from tests.hosts.aptrepo import CUDA_RELEASE, DRIVER_BRANCH, DRIVER_VERSION
from tests.hosts.lab import HostSpec, Lab, start_lab, stop_lab
from tests.test_infra_support import k8s, required, run_with

SPEC = Path(__file__).parent / "hosts" / "cluster.yaml"
PROVISIONED = ["h1", "h2", "h3"]
SMI_LOG = "/var/log/fake-nvidia-smi.log"

app = typer.Typer()
app.command("inventory")(inventory)  # two commands keep Typer from collapsing the app into one
app.command("provision")(provision)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("the SSH test hosts need root (namespaces, overlay mounts, chroot): run the tests as root")
    started = time.monotonic()
    hosts = start_lab(tmp_path_factory.mktemp("hosts"), [
        HostSpec("h1", gpus=2, nvswitches=4), HostSpec("h2", gpus=2), HostSpec("h3", gpu_model="h200"),
        HostSpec("h4", gpu_model="h200"), HostSpec("h5", mig_needs_reboot=True),
    ])
    try:
        # Package lists of the distribution mirror stand-in, as a maintained host has them.
        with ThreadPoolExecutor(len(hosts.hosts)) as pool:
            list(pool.map(lambda name: hosts.run(name, "apt-get update -qq"), hosts.hosts))
        print(f"\ntest hosts up in {time.monotonic() - started:.1f} s")
        yield hosts
    finally:
        problems = stop_lab(hosts)
        assert not problems, f"the harness left things behind: {problems}"


@pytest.fixture(scope="module")
def exported(lab: Lab) -> ProgramRun:
    """The Pulumi program run on the test spec as an `existing` stack (under its offline mocks), its pools'
    hosts named in an inventory of the lab's addresses: what `pulumi stack output ansibleInventory` gives."""
    addresses = lab.workdir / "addresses.yml"
    pools = {group_name(pool.name): pool.hosts for pool in load_spec(SPEC).node_pools}
    addresses.write_text(yaml.safe_dump({"all": {"children": {"gpu_nodes": {"children": {
        group: {"hosts": {host: {"ansible_host": lab.hosts[host].address} for host in hosts}}
        for group, hosts in pools.items()}}}}}))
    return run_with("existing", spec=str(SPEC), inventory=str(addresses))


@pytest.fixture(scope="module")
def inventory_dir(lab: Lab, exported: ProgramRun) -> Path:
    """The Pulumi program's inventory, plus the harness's connection settings and hosts beside it."""
    folder = lab.workdir / "inventory"
    folder.mkdir()
    (folder / "hosts.yml").write_text(required(exported.outputs, "ansibleInventory"))
    hosts: dict[str, dict] = {"ghost": {"ansible_host": "10.213.0.99"}, "h5": {"ansible_host": lab.hosts["h5"].address}}
    hosts["h1"] = {
        "mig_kubernetes_node_name": "h1",
        "mig_drain_delegate_to": "h1",
        "mig_drain_command": ["sh", "-c", f"echo drain h1 >> {SMI_LOG}"],
        "mig_uncordon_command": ["sh", "-c", f"echo uncordon h1 >> {SMI_LOG}"],
        "rdma_ipoib_interfaces": [{"name": "ib0", "address": "192.168.100.11/24"}],
    }
    hosts["h5"] |= {
        "mig_kubernetes_node_name": "h5", "mig_drain_delegate_to": "h5",
        "mig_drain_command": ["sh", "-c", f"echo drain h5 >> {SMI_LOG}"],
        "mig_uncordon_command": ["sh", "-c", f"echo uncordon h5 >> {SMI_LOG}"],
        # The host's "reboot": the fake applies pending MIG modes, drops the instances, changes the boot id.
        "mig_reboot_command": "nvidia-smi --fake-host-reboot",
        "mig_boot_time_command": "cat /var/lib/fake-nvidia/boot_id 2>/dev/null || echo first-boot",
        "gpu_model": "H100-80GB", "mig_gpus": [{"index": 0, "profiles": ["3g.40gb", "3g.40gb"]}],
    }
    harness = {"all": {"vars": lab.ansible_vars(), "children": {"gpu_nodes": {"hosts": hosts}}}}
    (folder / "harness.yml").write_text(yaml.safe_dump(harness, sort_keys=False))
    return folder


def run_json(inventory_dir: Path, *args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["provision", "-i", str(inventory_dir), "--json", *args])
    start = result.output.find("{")
    assert start >= 0, result.output
    return result.exit_code, json.loads(result.output[start:])


def summary_rows(output: str) -> dict[str, list[str]]:
    """host -> cells of the summary table (status, ok, changed, failed, unreachable, skipped)."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) == 7 and cells[1] in ("ok", "changed", "failed", "unreachable"):
            rows[cells[0]] = cells[1:]
    return rows


def instances(lab: Lab, host: str) -> dict[int, list[str]]:
    """GPU index -> 'PROFILE@START' of the host's fake GPUs, read with nvidia-smi over SSH."""
    found = parse_lgi(lab.run(host, "nvidia-smi mig -lgi", check=False))
    return {gpu: sorted(f"{gi.profile}@{gi.start}" for gi in gis) for gpu, gis in found.items()}


@pytest.fixture(scope="module")
def first_run(lab: Lab, inventory_dir: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    result = CliRunner().invoke(app, ["provision", "-i", str(inventory_dir), "--limit", "all:!h4:!h5"])
    return result.exit_code, result.output, time.monotonic() - started


def test_site_yml_provisions_every_host_and_reports_the_unreachable_one(first_run: tuple[int, str, float]) -> None:
    exit_code, output, elapsed = first_run
    print(f"first run: {elapsed:.1f} s")
    rows = summary_rows(output)
    assert exit_code == 1, output  # a host was unreachable
    assert rows["ghost"][0] == "unreachable" and rows["ghost"][4] == "1", output
    assert "unreachable ghost" in output
    for host in PROVISIONED:
        status, ok, changed, failed, unreachable, _ = rows[host]
        assert (status, failed, unreachable) == ("changed", "0", "0"), output
        assert int(changed) >= 15 and int(ok) > int(changed)
    assert "h4" not in rows and "h5" not in rows  # --limit kept the fresh hosts out


def test_hosts_hold_driver_toolkit_runtime_rdma_and_planned_mig_layouts(lab: Lab, exported: ProgramRun,
                                                                           first_run: tuple) -> None:
    for host in PROVISIONED:
        packages = lab.run(host, f"dpkg-query -W -f '${{Package}} ${{Status}}\\n' cuda-drivers-{DRIVER_BRANCH} "
                                 "cuda-toolkit-12-6 nvidia-container-toolkit dkms linux-headers-$(uname -r)")
        assert packages.count("install ok installed") == 5, packages
        assert f", {DRIVER_VERSION}" in lab.run(host, "nvidia-smi --query-gpu=index,driver_version --format=csv")
        assert f"release {CUDA_RELEASE}," in lab.run(host, ". /etc/profile.d/cuda.sh && nvcc --version")
        # containerd parses its configuration with the drop-in: nvidia is the default runtime, and both
        # runtimes use the systemd cgroup driver, as kubelet does.
        cri = tomllib.loads(lab.run(host, "containerd --config /etc/containerd/config.toml config dump"))[
            "plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
        assert cri["default_runtime_name"] == "nvidia"
        assert cri["runtimes"]["nvidia"]["options"]["BinaryName"] == "/usr/bin/nvidia-container-runtime"
        assert cri["runtimes"]["nvidia"]["options"]["SystemdCgroup"] is True
        assert cri["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
        assert "runtimes.nvidia" in lab.run(host, "cat /etc/containerd/conf.d/99-nvidia.toml")
        assert "memlock    unlimited" in lab.run(host, "cat /etc/security/limits.d/90-rdma-memlock.conf")
        assert "blacklist nouveau" in lab.run(host, "cat /etc/modprobe.d/blacklist-nouveau.conf")
        assert f"Pin: version {DRIVER_BRANCH}.*" in lab.run(host, "cat /etc/apt/preferences.d/nvidia-driver-branch")
    # Fabric Manager on the NVSwitch board only, at the driver's version (the repository has a newer one).
    fabric_manager = f"dpkg-query -W -f '${{Version}}' nvidia-fabricmanager-{DRIVER_BRANCH} 2>/dev/null || echo absent"
    assert lab.run("h1", fabric_manager) == f"{DRIVER_VERSION}-1"
    assert lab.run("h2", fabric_manager).strip() == "absent"
    assert "Address=192.168.100.11/24" in lab.run("h1", "cat /etc/systemd/network/60-ib0.network")
    # Joined under their inventory names with the labels the serving layer patches onto those nodes,
    # written before the join so kubelet registers with them (the join itself needs a live system).
    for host in PROVISIONED:
        labels = required(k8s(exported, "Node", host), "metadata", "labels")
        line = lab.run(host, "cat /etc/default/kubelet")
        assert line.startswith("KUBELET_EXTRA_ARGS=--node-labels=") and line.endswith("\n"), line
        registered = dict(pair.split("=", 1) for pair in line.strip().split("=", 2)[2].split(","))
        assert registered == labels
        assert lab.run(host, "dpkg --get-selections kubelet kubeadm kubectl").count("hold") == 3
    # The layouts `cpctl gpu plan` chose for the H100 pool, and all-balanced on the H200.
    assert instances(lab, "h1") == {0: ["3g.40gb@0", "3g.40gb@4"]}
    assert instances(lab, "h2") == {0: ["1g.10gb@0", "1g.10gb@1", "1g.10gb@2"]}
    assert instances(lab, "h3") == {0: ["1g.18gb@2", "1g.18gb@3", "2g.35gb@0", "3g.71gb@4"]}
    assert "Disabled" in lab.run("h1", "nvidia-smi -i 1 --query-gpu=mig.mode.current --format=csv,noheader")


def test_second_run_changes_nothing(inventory_dir: Path, first_run: tuple) -> None:
    started = time.monotonic()
    exit_code, result = run_json(inventory_dir, "--limit", ",".join(PROVISIONED))
    print(f"second run: {time.monotonic() - started:.1f} s")
    assert exit_code == 0, result
    assert {h: (s["changed"], s["failed"], s["unreachable"]) for h, s in result["hosts"].items()} == {
        h: (0, 0, 0) for h in PROVISIONED
    }


def test_the_drop_in_wins_over_containerds_full_default_configuration(lab: Lab, first_run: tuple) -> None:
    # A host without config.toml gets containerd's full default from the role (runc on cgroupfs, runc the
    # default runtime); imported as the role imports it, the drop-in must still decide both.
    lab.run("h2", "containerd config default | grep -v '^imports' > /tmp/full.toml && "
                  "sed -i '1i imports = [\"/etc/containerd/conf.d/*.toml\"]' /tmp/full.toml")
    assert "SystemdCgroup = false" in lab.run("h2", "cat /tmp/full.toml")
    cri = tomllib.loads(lab.run("h2", "containerd --config /tmp/full.toml config dump"))[
        "plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["default_runtime_name"] == "nvidia"
    assert cri["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
    assert cri["runtimes"]["nvidia"]["options"]["SystemdCgroup"] is True


def test_check_diff_on_a_fresh_host_succeeds_and_changes_nothing(lab: Lab, inventory_dir: Path) -> None:
    snapshot = ("find /etc /usr /opt /var/lib/dpkg /var/lib/apt /var/lib/fake-nvidia -xdev "
                "-printf '%p %s %T@\\n' 2>/dev/null | sort | md5sum")
    before = lab.run("h4", snapshot)
    started = time.monotonic()
    exit_code, result = run_json(inventory_dir, "--check", "--diff", "--limit", "h4")
    print(f"check run: {time.monotonic() - started:.1f} s")
    assert exit_code == 0, result
    assert result["hosts"]["h4"]["failed"] == 0 and result["hosts"]["h4"]["changed"] > 0  # would change
    assert lab.run("h4", snapshot) == before
    assert lab.run("h4", "test -e /usr/bin/nvidia-smi || echo absent").strip() == "absent"


def test_impossible_mig_layout_fails_before_any_instance_is_destroyed(lab: Lab, inventory_dir: Path) -> None:
    before = instances(lab, "h1")
    logged = len(lab.run("h1", f"cat {SMI_LOG}").splitlines())
    impossible = json.dumps({"mig_gpus": [{"index": 0, "profiles": ["4g.40gb", "4g.40gb"]}]})
    exit_code, result = run_json(inventory_dir, "--limit", "h1", "--tags", "mig", "-e", impossible)
    assert exit_code == 1
    assert result["hosts"]["h1"]["failed"] == 1
    message = result["failures"][0]["message"]
    assert "invalid MIG layout" in message and "4g.40gb" in message and "nothing was changed" in message
    after_log = lab.run("h1", f"cat {SMI_LOG}").splitlines()[logged:]
    assert not [line for line in after_log if re.search(r"-dgi|-dci|-cgi|-mig |drain", line)], after_log
    assert instances(lab, "h1") == before


BALANCED = json.dumps({"mig_gpus": [{"index": 0, "profiles": ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]},
                                    {"index": 1, "profiles": None}]})


def test_mig_change_in_check_mode_is_reported_and_not_made(lab: Lab, inventory_dir: Path) -> None:
    before = instances(lab, "h1")
    logged = len(lab.run("h1", f"cat {SMI_LOG}").splitlines())
    exit_code, result = run_json(inventory_dir, "--check", "--diff", "--limit", "h1", "--tags", "mig", "-e", BALANCED)
    assert exit_code == 0, result
    assert result["hosts"]["h1"]["changed"] == 1  # the plan step: "would change"
    after_log = lab.run("h1", f"cat {SMI_LOG}").splitlines()[logged:]
    assert not [line for line in after_log if re.search(r"-dgi|-dci|-cgi|-mig |drain", line)], after_log
    assert instances(lab, "h1") == before


def test_mig_change_drains_then_destroys_only_what_the_new_layout_drops(lab: Lab, inventory_dir: Path) -> None:
    logged = len(lab.run("h1", f"cat {SMI_LOG}").splitlines())
    exit_code, result = run_json(inventory_dir, "--limit", "h1", "--tags", "mig", "-e", BALANCED)
    assert exit_code == 0, result
    assert result["hosts"]["h1"]["changed"] > 0
    log = [line for line in lab.run("h1", f"cat {SMI_LOG}").splitlines()[logged:]
           if re.search(r"drain|uncordon|-dgi|-dci|-cgi", line)]
    # Drain first; only the 3g.40gb at slot 0 (GPU instance 1) goes; the one at slot 4 stays; uncordon last.
    assert log == ["drain h1", "nvidia-smi mig -i 0 -gi 1 -dci", "nvidia-smi mig -i 0 -gi 1 -dgi",
                   "nvidia-smi mig -i 0 -cgi 14:0,19:2,19:3 -C", "uncordon h1"], log
    assert instances(lab, "h1") == {0: ["1g.10gb@2", "1g.10gb@3", "2g.20gb@0", "3g.40gb@4"]}


def mig_log(lab: Lab, host: str, since: int) -> list[str]:
    """The drain/uncordon hooks, MIG mode and instance commands and reboots logged on `host` after line `since`."""
    return [line for line in lab.run(host, f"cat {SMI_LOG}").splitlines()[since:]
            if re.search(r"drain|uncordon|-mig |-dgi|-dci|-cgi|reboot", line)]


def test_mig_mode_change_on_a_cloud_vm_reboots_then_creates_the_layout(lab: Lab, inventory_dir: Path) -> None:
    exit_code, result = run_json(inventory_dir, "--limit", "h5", "--tags", "nvidia_driver,mig")
    assert exit_code == 0, result
    # MIG on, pending until the reboot; the instances are planned after it (none survive a reboot).
    assert mig_log(lab, "h5", 0) == ["drain h5", "nvidia-smi -i 0 -mig 1", "nvidia-smi --fake-host-reboot",
                                     "nvidia-smi mig -i 0 -cgi 9:0,9:4 -C", "uncordon h5"]
    assert instances(lab, "h5") == {0: ["3g.40gb@0", "3g.40gb@4"]}


def test_a_failed_mig_change_says_reboot_and_leaves_the_node_uncordoned(lab: Lab, inventory_dir: Path) -> None:
    logged = len(lab.run("h5", f"cat {SMI_LOG}").splitlines())
    disable = json.dumps({"mig_reboot": False, "mig_gpus": [{"index": 0, "profiles": None}]})
    exit_code, result = run_json(inventory_dir, "--limit", "h5", "--tags", "mig", "-e", disable)
    assert exit_code == 1, result
    messages = " ".join(failure["message"] for failure in result["failures"])
    assert "MIG mode change pending on GPU(s) [0]" in messages and "reboot it and run the role again" in messages
    log = mig_log(lab, "h5", logged)
    assert log[0] == "drain h5" and log[-1] == "uncordon h5", log
    assert "nvidia-smi -i 0 -mig 0" in log
