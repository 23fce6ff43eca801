"""Test hosts reachable over real SSH: network namespaces, an overlay root each, its own sshd.

Layout (everything exists only inside namespaces this module creates, named after the test process):

    controller namespace PREFIX-c:  bridge br0 10.213.0.1/24, HTTP server for the apt repositories
      |-- veth --> host namespace PREFIX-h1: eth0 10.213.0.11, sshd in a private mount + UTS namespace
      |-- veth --> host namespace PREFIX-h2: eth0 10.213.0.12 ...

A host is one process: `ip netns exec NS unshare --uts --mount sh -c 'mount overlay; exec chroot ROOT sshd -D'`.
Its root is an overlay of the cached debootstrap image (read-only lower) and a per-host upper folder where
the harness first writes the host's "hardware": the fake GPUs (/etc/fake-nvidia/hardware.json), a fake sysfs
tree (NVIDIA PCI functions, an InfiniBand HCA with its port state) and fake `ibv_devices` / `ibstat`. The
mounts die with the process. ssh from this machine enters the controller namespace through a relay started
as ProxyCommand (`relay.py`), so neither Ansible nor Fabric needs a route into the namespaces.

Every process started here is tracked by PID (controlplane.procs); teardown also kills whatever is left in
the namespaces (`ip netns pids`, i.e. only processes inside namespaces this module made), ends the ssh
control masters, deletes the namespaces and checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.procs import ManagedProcess
from tests.hosts.aptrepo import CUDA_RELEASE, DRIVER_BRANCH, KEY_NAME, Repos, build_repos
from tests.hosts.image import ensure_image

FAKES = Path(__file__).resolve().parent.parent / "fakes"
RELAY = Path(__file__).resolve().parent / "relay.py"
SUBNET = "10.213.0"
CONTROLLER_IP = f"{SUBNET}.1"
REPO_PORT = 8080

# PCI IDs the fake sysfs tree reports (pci.ids: 10de:2330 H100 SXM5 80GB, 10de:2335 H200, 15b3:1021 ConnectX-7).
PCI_DEVICE = {"h100-80gb-hbm3": "0x2330", "h200": "0x2335"}
NVSWITCH_DEVICE = "0x22a3"  # the third-generation NVSwitch of HGX H100/H200 boards

SSHD_CONFIG = """\
ListenAddress 0.0.0.0:22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PidFile none
MaxStartups 50
MaxSessions 50
Subsystem sftp /usr/lib/openssh/sftp-server
"""


class HarnessError(RuntimeError):
    """The harness cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class HostSpec:
    """A test host to boot: its name, its fake GPUs (a capture folder name and count), its HCAs."""

    name: str
    gpu_model: str = "h100-80gb-hbm3"
    gpus: int = 1
    ib_devices: int = 1
    nvswitches: int = 0  # an HGX board's NVSwitches (PCI functions of class 0x068000)
    mig_needs_reboot: bool = False  # a cloud VM's GPU: MIG mode changes wait for a reboot


@dataclass
class TestHost:
    spec: HostSpec
    address: str
    netns: str
    upper: Path
    process: ManagedProcess | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Lab:
    """Booted test hosts, their controller namespace and the SSH material to reach them."""

    workdir: Path
    prefix: str
    hosts: dict[str, TestHost] = field(default_factory=dict)
    controller_ns: str = ""
    key: Path = Path()
    control_dir: Path = Path()
    repos: Repos | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def proxy_command(self) -> str:
        """ssh ProxyCommand into the controller namespace (%h and %p are ssh's host and port)."""
        return f"ip netns exec {self.controller_ns} {sys.executable} -S -I {RELAY} %h %p"

    @property
    def repo_url(self) -> str:
        return f"http://{CONTROLLER_IP}:{REPO_PORT}"

    def ssh_common_args(self) -> str:
        return (f'-o ProxyCommand="{self.proxy_command}" -o StrictHostKeyChecking=no '
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")

    def ansible_vars(self) -> dict[str, object]:
        """Inventory variables that reach the hosts (root over the relay) and point the roles at the local
        repositories; the hosts have no systemd and share this machine's kernel, so nothing may reboot,
        restart services or load modules there (`gpu_node_live_system: false`)."""
        assert self.repos is not None
        key_url = f"{self.repo_url}/{self.repos.key_file.name}"
        return {
            "ansible_user": "root",
            "ansible_become": False,
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_private_key_file": str(self.key),
            "ansible_ssh_common_args": self.ssh_common_args(),
            "ansible_control_path_dir": str(self.control_dir),
            "gpu_node_live_system": False,
            "nvidia_driver_reboot": False,
            "nvidia_driver_branch": DRIVER_BRANCH,
            "nvidia_driver_repo_url": f"{self.repo_url}/cuda/",
            "nvidia_driver_repo_key_url": key_url,
            "cuda_toolkit_version": CUDA_RELEASE,
            "container_toolkit_repo_url": f"{self.repo_url}/libnvidia-container/",
            "container_toolkit_repo_key_url": key_url,
            # k8s_node: packages from the stand-in repository; the join itself is skipped (not a live system).
            "k8s_node_repo_url": f"{self.repo_url}/kubernetes/",
            "k8s_node_repo_key_url": key_url,
            "k8s_node_join_endpoint": f"{CONTROLLER_IP}:6443",
            "k8s_node_join_token": "abcdef.0123456789abcdef",
            "k8s_node_join_ca_cert_hash": "sha256:" + "0" * 64,
        }

    def connection(self, name: str):  # noqa: ANN201 - fabric.Connection, imported lazily
        """A Fabric connection to a host (through the relay), as root with the lab's key."""
        from fabric import Connection

        return Connection(self.hosts[name].address, user="root", gateway=self.proxy_command,
                          connect_kwargs={"key_filename": str(self.key), "look_for_keys": False,
                                          "allow_agent": False}, connect_timeout=10)

    def run(self, name: str, command: str, check: bool = True) -> str:
        """stdout of a shell command on a host, over SSH (Fabric)."""
        with self.connection(name) as conn:
            result = conn.run(command, hide=True, warn=not check, in_stream=False)
        return result.stdout


def start_lab(workdir: Path, hosts: list[HostSpec]) -> Lab:
    """Boot `hosts`; on any failure, tear down what was made and raise."""
    if os.geteuid() != 0:
        raise HarnessError("the SSH test hosts need root (network and mount namespaces, overlay mounts, chroot); "
                           "run the tests as root, as CI does")
    for tool in ("ip", "unshare", "ssh", "ssh-keygen", "gpg", "dpkg-deb", "dpkg-scanpackages"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            raise HarnessError(f"'{tool}' is missing: install system-packages.txt (make system-deps)")
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(workdir, f"cpt{os.getpid()}")
    try:
        _boot(lab, hosts)
    except BaseException:
        stop_lab(lab)
        raise
    return lab


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _boot(lab: Lab, specs: list[HostSpec]) -> None:
    image = ensure_image(lab.workdir / "debootstrap.log")
    lab.key = lab.workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(lab.key)], check=True)
    # ssh's control sockets: a short path (a socket path is limited to 108 bytes).
    lab.control_dir = Path(tempfile.mkdtemp(prefix="cpcp", dir="/tmp"))
    lab.repos = build_repos(lab.workdir / "repo", os.uname().release)

    lab.controller_ns = f"{lab.prefix}-c"
    _ip("netns", "add", lab.controller_ns)
    lab.namespaces.append(lab.controller_ns)
    ns = ["-n", lab.controller_ns]
    _ip(*ns, "link", "set", "lo", "up")
    _ip(*ns, "link", "add", "br0", "type", "bridge")
    _ip(*ns, "addr", "add", f"{CONTROLLER_IP}/24", "dev", "br0")
    _ip(*ns, "link", "set", "br0", "up")
    server = ManagedProcess(
        ["ip", "netns", "exec", lab.controller_ns, sys.executable, "-m", "http.server", "--bind", CONTROLLER_IP,
         "--directory", str(lab.repos.root), str(REPO_PORT)],
        log_path=lab.workdir / "repo-http.log",
    )
    lab.processes.append(server)

    for i, spec in enumerate(specs, start=11):
        host = TestHost(spec, f"{SUBNET}.{i}", f"{lab.prefix}-{spec.name}", lab.workdir / "hosts" / spec.name)
        lab.hosts[spec.name] = host
        _ip("netns", "add", host.netns)
        lab.namespaces.append(host.netns)
        _ip(*ns, "link", "add", f"v{spec.name}", "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip(*ns, "link", "set", f"v{spec.name}", "master", "br0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _write_host_files(lab, host)
        host.process = _start_sshd(lab, host, image)
        lab.processes.append(host.process)

    deadline = time.monotonic() + 20
    for host in lab.hosts.values():
        assert host.process is not None
        while b"Server listening on" not in (host.upper.parent / "sshd.log").read_bytes():
            if host.process.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"sshd of {host.name} did not start: {host.process.log_tail()}")
            time.sleep(0.02)


def _write_host_files(lab: Lab, host: TestHost) -> None:
    """The host's identity, SSH access, apt sources and simulated hardware, in its overlay's upper layer."""
    upper, spec = host.upper / "upper", host.spec
    files: dict[str, str | bytes] = {
        "etc/hostname": f"{spec.name}\n",
        "etc/hosts": f"127.0.0.1 localhost\n{host.address} {spec.name}\n",
        "etc/ssh/sshd_config_cpctl": SSHD_CONFIG,
        "root/.ssh/authorized_keys": lab.key.with_suffix(".pub").read_text(),
        # The distribution mirror stand-in; the NVIDIA repositories are the roles' to add.
        f"etc/apt/keyrings/{KEY_NAME}": lab.repos.key_file.read_bytes() if lab.repos else b"",
        "etc/apt/sources.list.d/debian.sources": (
            f"Types: deb\nURIs: {lab.repo_url}/debian/\nSuites: /\nSigned-By: /etc/apt/keyrings/{KEY_NAME}\n"
        ),
        "etc/fake-nvidia/hardware.json": json.dumps({"model": spec.gpu_model, "count": spec.gpus,
                                                     "mig_needs_reboot": spec.mig_needs_reboot}),
        "usr/local/bin/ibstat": (FAKES / "ibstat").read_bytes(),
        "usr/local/bin/ibv_devices": (FAKES / "ibv_devices").read_bytes(),
    }
    for i in range(spec.gpus):
        device = f"sys/bus/pci/devices/0000:{0x18 + 0x10 * i:02x}:00.0"
        files |= {f"{device}/vendor": "0x10de\n", f"{device}/device": f"{PCI_DEVICE[spec.gpu_model]}\n",
                  f"{device}/class": "0x030200\n"}
    for i in range(spec.nvswitches):
        device = f"sys/bus/pci/devices/0000:{0x05 + i:02x}:00.0"
        files |= {f"{device}/vendor": "0x10de\n", f"{device}/device": f"{NVSWITCH_DEVICE}\n",
                  f"{device}/class": "0x068000\n"}
    for i in range(spec.ib_devices):
        device = f"sys/bus/pci/devices/0000:{0x1a + 0x10 * i:02x}:00.0"
        files |= {f"{device}/vendor": "0x15b3\n", f"{device}/device": "0x1021\n", f"{device}/class": "0x020700\n"}
        hca = f"sys/class/infiniband/mlx5_{i}"
        guid = f"b8ce:f603:00{host.address.rsplit('.', 1)[1]:0>2}:{i:04x}"
        files |= {f"{hca}/node_guid": guid, f"{hca}/fw_ver": "28.39.1002", f"{hca}/hca_type": "MT4129",
                  f"{hca}/hw_rev": "0x0", f"{hca}/ports/1/state": "4: ACTIVE", f"{hca}/ports/1/phys_state": "5: LinkUp",
                  f"{hca}/ports/1/rate": "400 Gb/sec (4X NDR)", f"{hca}/ports/1/lid": f"0x{i + 2:x}",
                  f"{hca}/ports/1/sm_lid": "0x1", f"{hca}/ports/1/link_layer": "InfiniBand",
                  f"{hca}/ports/1/cap_mask": "0xa751e84a"}
    for path, content in files.items():
        target = upper / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        target.write_bytes(content)
        target.chmod(0o755 if content.startswith(b"#!") else 0o644)
    (upper / "root/.ansible/tmp").mkdir(parents=True, exist_ok=True)  # Ansible warns when it must create it
    (upper / "root/.ssh").chmod(0o700)
    (upper / "root/.ssh/authorized_keys").chmod(0o600)
    for folder in ("work", "merged"):
        (host.upper / folder).mkdir(parents=True, exist_ok=True)


def _start_sshd(lab: Lab, host: TestHost, image: Path) -> ManagedProcess:
    merged = host.upper / "merged"
    script = "; ".join([
        "set -e",
        f"hostname {shlex.quote(host.name)}",
        f"mount -t overlay overlay -o lowerdir={image},upperdir={host.upper / 'upper'},workdir={host.upper / 'work'}"
        f" {merged}",
        f"mount -t proc proc {merged}/proc",
        f"mount --rbind /dev {merged}/dev",
        f"exec chroot {merged} /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config_cpctl",
    ])
    return ManagedProcess(
        ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--mount", "--propagation", "private", "--",
         "sh", "-c", script],
        log_path=host.upper.parent / "sshd.log",
    )


def stop_lab(lab: Lab) -> list[str]:
    """Tear everything down; return what could not be removed (empty when clean)."""
    problems: list[str] = []
    # ssh control masters (Ansible's ControlPersist): ask each to exit through its socket.
    if lab.control_dir and lab.control_dir.is_dir():
        for sock in lab.control_dir.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "cpctl-test-host"],
                           capture_output=True, timeout=10, check=False)
    for process in reversed(lab.processes):
        process.stop(grace_s=2)
    for ns in lab.namespaces:
        # Processes left inside our namespaces (ssh sessions, relays, anything a test started on a host).
        for pid in _netns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _netns_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _netns_pids(ns):
            problems.append(f"processes left in namespace {ns}: {_netns_pids(ns)}")
        result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if result.returncode != 0:
            problems.append(f"ip netns del {ns}: {result.stderr.strip()}")
    if lab.control_dir and lab.control_dir.is_dir():
        # A master removes its socket when it exits; one still there is a master still running.
        deadline = time.monotonic() + 5
        while any(lab.control_dir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        problems += [f"ssh control master still running: {sock}" for sock in lab.control_dir.iterdir()]
        subprocess.run(["rm", "-rf", str(lab.control_dir)], check=False)
    for host in lab.hosts.values():
        merged = host.upper / "merged"
        if merged.is_dir() and any(merged.iterdir()):
            problems.append(f"{merged} is still mounted")
    return problems


def _netns_pids(ns: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []
