"""`cpctl doctor`: the migration checklist as a preflight of GPU nodes, on this machine or over SSH.

Each check is a small function: it reads a host through a `Host` (run a shell command, get its exit status
and output; outputs are cached, so checks may share a listing) and what the inventory expects of it, and
returns one `CheckResult`: pass, warn or fail, what it found, and the fix. Checks only read (listings,
`--version`, sysfs); nothing is changed. One runner (`run_checks`) serves both places: `LocalHost` runs
commands here, `SshHost` through Fabric with the inventory's connection variables.

The checklist:
- GPU model and MIG support (the catalog's models; the inventory's `gpu_model` and `gpu_count`);
- NVIDIA driver, and CUDA >= 12.0 (the driver's CUDA version; the host's toolkit when installed);
- container runtime: Docker Engine >= 20.10 or containerd, and the NVIDIA runtime configured in it;
- Kubernetes >= 1.24 (kubelet) on hosts of the `k8s_nodes` group;
- RDMA/InfiniBand devices and their ports' link state (required when `rdma_fabric` says so);
- NVIDIA Fabric Manager where the board needs it (NVSwitch present: HGX H100/H200), at the driver's version.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from controlplane.gpu.catalog import model_for_product

MIN_CUDA = (12, 0)
MIN_DRIVER = (525, 60, 13)  # the first Linux driver of CUDA 12.0 (CUDA 12.0 release notes, table 3)
MIN_DOCKER = (20, 10)
MIN_CONTAINERD = (1, 6)  # the oldest containerd line Kubernetes >= 1.26 supports
MIN_KUBERNETES = (1, 24)
COMMAND_TIMEOUT_S = 30

PROVISION = "cpctl provision -i INVENTORY"


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Status
    found: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {**asdict(self), "status": self.status.value}


@dataclass(frozen=True)
class Expected:
    """What the inventory says a host should have; None: not said (only what is found is judged)."""

    gpu_model: str | None = None
    gpu_count: int | None = None
    rdma_fabric: str | None = None
    kubernetes_node: bool = False


class HostError(RuntimeError):
    """A host cannot be reached or asked; the message says why."""


class Host:
    """Runs shell commands on one host; the same command is run once per host."""

    name = "localhost"

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, str]] = {}

    def run(self, command: str) -> tuple[int, str]:
        """Exit status and output (stdout, then stderr) of `command` under /bin/sh."""
        if command not in self._seen:
            self._seen[command] = self._execute(command)
        return self._seen[command]

    def close(self) -> None:
        """Release the host's connection, if it has one."""

    def _execute(self, command: str) -> tuple[int, str]:
        raise NotImplementedError


class LocalHost(Host):
    def _execute(self, command: str) -> tuple[int, str]:
        try:
            done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired:
            return 124, f"timed out after {COMMAND_TIMEOUT_S} s"
        return done.returncode, done.stdout + done.stderr


class SshHost(Host):
    """A host reached over SSH with Fabric; `connection` is a fabric.Connection (opened on first use)."""

    def __init__(self, name: str, connection: Any) -> None:
        super().__init__()
        self.name = name
        self.connection = connection

    def _execute(self, command: str) -> tuple[int, str]:
        try:
            result = self.connection.run(command, hide=True, warn=True, in_stream=False, timeout=COMMAND_TIMEOUT_S)
        except Exception as exc:  # paramiko/socket/invoke errors all mean the same here: the host cannot be asked
            raise HostError(f"cannot run commands over SSH on {self.connection.host}: {_one_line(exc)}") from None
        return result.exited, result.stdout + result.stderr

    def close(self) -> None:
        self.connection.close()


# ------------------------------------------------------------------------------------------ helpers


def _one_line(value: object, limit: int = 200) -> str:
    return " ".join(str(value).split())[:limit]


def _version(text: str) -> tuple[int, ...] | None:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


def _version_text(text: str) -> str | None:
    match = re.search(r"\d+(?:\.\d+)+", text)
    return match.group() if match else None


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _gpu_rows(host: Host) -> tuple[int, list[list[str]], str]:
    """nvidia-smi's GPU list: exit status, rows of (index, name, driver, MIG mode), raw output."""
    rc, out = host.run("nvidia-smi --query-gpu=index,name,driver_version,mig.mode.current --format=csv,noheader")
    rows = [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.count(",") == 3]
    return rc, rows if rc == 0 else [], out


def _pci_functions(host: Host) -> list[tuple[str, str]]:
    """(vendor, class) of every PCI function, from sysfs (e.g. ('0x10de', '0x030200'))."""
    _, out = host.run("for d in /sys/bus/pci/devices/*; do [ -e \"$d/vendor\" ] && "
                      "echo \"$(cat $d/vendor) $(cat $d/class)\"; done")
    return [(fields[0], fields[1]) for fields in (line.split() for line in out.splitlines()) if len(fields) == 2]


def _nvidia_functions(host: Host, *class_prefixes: str) -> int:
    """How many NVIDIA PCI functions have a class starting with one of `class_prefixes`."""
    return sum(1 for vendor, klass in _pci_functions(host) if vendor == "0x10de" and klass.startswith(class_prefixes))


def _no_driver(host: Host, check: str, rc: int, out: str) -> CheckResult:
    """The result of a GPU check when nvidia-smi does not answer (exit status `rc`, output `out`)."""
    on_pci = _nvidia_functions(host, "0x0300", "0x0302")  # VGA or 3D controller
    seen = f"; {on_pci} NVIDIA GPU(s) on the PCI bus" if on_pci else ""
    if rc == 127:  # the shell's "command not found"
        return CheckResult(check, Status.FAIL, f"nvidia-smi not found: no NVIDIA driver installed{seen}",
                           f"install the NVIDIA driver: {PROVISION} (role nvidia_driver), then reboot")
    return CheckResult(check, Status.FAIL, f"nvidia-smi fails: {_one_line(out)}{seen}",
                       "load the driver: reboot after installing it; `dmesg | grep -i nvrm` says why it did not load")


# ------------------------------------------------------------------------------------------- checks


def check_gpu(host: Host, expected: Expected) -> CheckResult:
    name = "GPU model and MIG"
    rc, rows, out = _gpu_rows(host)
    if rc != 0:
        return _no_driver(host, name, rc, out)
    if not rows:
        return CheckResult(name, Status.FAIL, "nvidia-smi lists no GPU", "check that the GPUs are seen: lspci -d 10de:")
    names = sorted({row[1] for row in rows})
    models = {n: model_for_product(n) for n in names}
    found = ", ".join(f"{sum(r[1] == n for r in rows)} x {n} ({models[n].name if models[n] else 'not in catalog'})"
                      for n in names)
    mig = sorted({row[3] for row in rows})
    found += f"; MIG mode {'/'.join(mig)}"
    catalog_names = {m.name for m in models.values() if m is not None}
    if expected.gpu_model and catalog_names != {expected.gpu_model}:
        return CheckResult(name, Status.FAIL, found, f"the inventory expects {expected.gpu_model}: fix gpu_model in "
                           "the spec's node pool (cpctl inventory) or use the right machine type")
    if expected.gpu_count is not None and len(rows) != expected.gpu_count:
        return CheckResult(name, Status.FAIL, f"{found}; {len(rows)} GPU(s), the inventory expects "
                           f"{expected.gpu_count}", "a GPU is missing: check `nvidia-smi -L`, `dmesg | grep -i xid`, "
                           "reseat or replace it; or fix gpu.per_node in the spec")
    if None in models.values():
        return CheckResult(name, Status.WARN, found, "controlplane's GPU catalog does not know this model: MIG layouts "
                           "cannot be planned; give its pool whole GPUs (no mig:) or add it to gpu/catalog.py")
    if "[N/A]" in mig:
        return CheckResult(name, Status.WARN, found, "this GPU has no MIG: shards get whole GPUs")
    return CheckResult(name, Status.PASS, found)


def check_driver(host: Host, expected: Expected) -> CheckResult:
    name = "NVIDIA driver"
    rc, rows, out = _gpu_rows(host)
    if rc != 0:
        return _no_driver(host, name, rc, out)
    versions = sorted({row[2] for row in rows})
    version = _version(versions[0]) if versions else None
    if version is None:
        return CheckResult(name, Status.FAIL, f"driver version unreadable: {_one_line(out)}",
                           "reinstall the driver (role nvidia_driver)")
    if version < MIN_DRIVER:
        return CheckResult(name, Status.FAIL, f"driver {versions[0]}: older than CUDA 12.0's {_dotted(MIN_DRIVER)}",
                           f"install a driver branch >= 525 (nvidia_driver_branch; {PROVISION}), then reboot")
    return CheckResult(name, Status.PASS, f"driver {versions[0]}")


def check_cuda(host: Host, expected: Expected) -> CheckResult:
    name = "CUDA >= 12.0"
    rc, out = host.run("nvidia-smi")
    match = re.search(r"CUDA Version:\s*(\d+\.\d+)", out)
    if rc != 0:
        return _no_driver(host, name, rc, out)
    if match is None:
        return CheckResult(name, Status.FAIL, "nvidia-smi shows no CUDA version",
                           "the driver provides CUDA: reinstall it (role nvidia_driver)")
    driver_cuda = _version(match.group(1)) or (0, 0)
    found = f"the driver supports CUDA {match.group(1)}"
    if driver_cuda < MIN_CUDA:
        return CheckResult(name, Status.FAIL, found, f"install a driver branch >= 525 for CUDA 12 ({PROVISION})")
    _, toolkits = host.run("for n in $(command -v nvcc) /usr/local/cuda*/bin/nvcc; do [ -x \"$n\" ] && "
                           "\"$n\" --version | grep -o 'release [0-9.]*'; done | sort -uV")
    releases = [_version(line) for line in toolkits.splitlines() if _version(line)]
    if not releases:
        return CheckResult(name, Status.WARN, f"{found}; no CUDA toolkit on the host", "containers bring their own "
                           "CUDA runtime; to build on the host install it (role cuda_toolkit)")
    newest = max(r for r in releases if r is not None)
    found += f"; toolkit {_dotted(newest)}"
    if newest < MIN_CUDA:
        return CheckResult(name, Status.FAIL, found,
                           f"install CUDA toolkit >= 12.0 (cuda_toolkit_version; {PROVISION})")
    return CheckResult(name, Status.PASS, found)


def check_container_runtime(host: Host, expected: Expected) -> CheckResult:
    name = "container runtime"
    rc_docker, docker = host.run("docker version --format '{{.Server.Version}}'")
    rc_ctr, containerd = host.run("containerd --version")
    docker_version = _version(docker) if rc_docker == 0 else None
    containerd_version = _version(containerd.split(" ", 2)[-1]) if rc_ctr == 0 else None
    found = []
    if docker_version:
        found.append(f"Docker Engine {_dotted(docker_version)}")
    if containerd_version:
        found.append(f"containerd {_dotted(containerd_version)}")
    if docker_version is None and host.run("docker --version")[0] == 0:
        found.append("a docker client whose engine does not answer")
    text = ", ".join(found) or "neither Docker Engine nor containerd"
    docker_ok = docker_version is not None and docker_version >= MIN_DOCKER
    if docker_ok or (containerd_version is not None and containerd_version >= MIN_CONTAINERD):
        return CheckResult(name, Status.PASS, text)
    fix = (f"install containerd >= {_dotted(MIN_CONTAINERD)} (Kubernetes' runtime) or Docker Engine >= "
           f"{_dotted(MIN_DOCKER)} (role container_toolkit configures either for GPUs)")
    return CheckResult(name, Status.FAIL, text, fix)


def check_nvidia_runtime(host: Host, expected: Expected) -> CheckResult:
    name = "NVIDIA container runtime"
    rc, out = host.run("nvidia-ctk --version")
    if rc != 0:
        return CheckResult(name, Status.FAIL, "nvidia-ctk not found: NVIDIA Container Toolkit not installed",
                           f"install it and configure the runtime: {PROVISION} (role container_toolkit)")
    version = _version(out)
    _, configs = host.run("grep -ls 'nvidia' /etc/containerd/config.toml /etc/containerd/conf.d/*.toml "
                          "/etc/docker/daemon.json")
    where = [line for line in configs.splitlines() if line.startswith("/")]
    found = f"NVIDIA Container Toolkit {_dotted(version) if version else '?'}"
    if not where:
        return CheckResult(name, Status.FAIL, f"{found}; no nvidia runtime in containerd's or docker's config",
                           "nvidia-ctk runtime configure --runtime=containerd --set-as-default "
                           "(role container_toolkit)")
    return CheckResult(name, Status.PASS, f"{found}; nvidia runtime in {', '.join(where)}")


def check_kubernetes(host: Host, expected: Expected) -> CheckResult:
    name = "Kubernetes >= 1.24"
    rc, out = host.run("kubelet --version")
    version = _version(out) if rc == 0 else None
    if version is None:
        if expected.kubernetes_node:
            return CheckResult(name, Status.FAIL, "kubelet not found on a host of group k8s_nodes",
                               f"install and join: {PROVISION} (role k8s_node)")
        return CheckResult(name, Status.WARN, "no kubelet: not a Kubernetes node",
                           "only needed to serve from Kubernetes: add the host to group k8s_nodes (role k8s_node)")
    if version < MIN_KUBERNETES:
        return CheckResult(name, Status.FAIL, f"kubelet {_dotted(version)}",
                           "upgrade the node to Kubernetes >= 1.24 (k8s_node_version), one minor version at a time")
    return CheckResult(name, Status.PASS, f"kubelet {_dotted(version)}")


def check_rdma(host: Host, expected: Expected) -> CheckResult:
    name = "RDMA / InfiniBand"
    _, out = host.run("for p in /sys/class/infiniband/*/ports/*; do [ -e \"$p/state\" ] && echo \"$p|$(cat $p/state)"
                      "|$(cat $p/phys_state)|$(cat $p/rate)|$(cat $p/link_layer)\"; done")
    ports = [line.split("|") for line in out.splitlines() if line.count("|") == 4]
    required = expected.rdma_fabric in ("infiniband", "roce", "efa")
    if not ports:
        if required:
            return CheckResult(name, Status.FAIL, f"no RDMA device, the inventory says rdma_fabric "
                               f"{expected.rdma_fabric}", "install the RDMA stack and load the HCA driver: "
                               f"{PROVISION} (role rdma); check `lspci -d 15b3:` and `ibstat`")
        return CheckResult(name, Status.WARN, "no RDMA device", "multi-node traffic goes over TCP; only single-node "
                           "serving is fast without RDMA")
    described, down = [], []
    for path, state, physical, rate, layer in ports:
        device, port = path.split("/")[-3], path.split("/")[-1]
        state_name, physical_name = state.split(": ")[-1], physical.split(": ")[-1]
        described.append(f"{device}/{port} {state_name} {rate.split(' (')[0]} {layer}")
        if state_name != "ACTIVE":
            down.append(f"{device}/{port} {state_name} ({physical_name})")
    if down:
        return CheckResult(name, Status.FAIL, "; ".join(described), f"ports not ACTIVE: {', '.join(down)}: check "
                           "the cable and switch port; an InfiniBand port stays INIT until a subnet manager "
                           "(opensm or the switch's) runs on the fabric")
    return CheckResult(name, Status.PASS, "; ".join(described))


def check_fabric_manager(host: Host, expected: Expected) -> CheckResult:
    name = "Fabric Manager"
    # NVSwitch: an NVIDIA PCI function of class 0x0680 (bridge/other), as on HGX H100/H200 boards.
    switches = _nvidia_functions(host, "0x0680")
    if not switches:
        return CheckResult(name, Status.PASS, "not needed: no NVSwitch on this board")
    found = f"{switches} NVSwitch(es)"
    rc, out = host.run("nv-fabricmanager --version")
    if rc != 0:
        return CheckResult(name, Status.FAIL, f"{found}; nv-fabricmanager not installed", "install "
                           "nvidia-fabricmanager at exactly the driver's version and enable its service; without it "
                           "CUDA on NVSwitch boards fails with 'system not yet initialized'")
    # Compared as text: the driver and Fabric Manager packages carry the same version string.
    fm_version = _version_text(out)
    _, rows, _ = _gpu_rows(host)
    driver = rows[0][2] if rows else None
    found += f"; Fabric Manager {fm_version or '?'}"
    if driver is not None and fm_version != driver:
        return CheckResult(name, Status.FAIL, f"{found}, driver {driver}",
                           "Fabric Manager must match the driver version exactly: install nvidia-fabricmanager "
                           f"{driver}")
    rc, state = host.run("systemctl is-active nvidia-fabricmanager || pgrep -x nv-fabricmanager")
    if rc != 0:
        return CheckResult(name, Status.FAIL, f"{found}; not running ({_one_line(state, 60)})",
                           "systemctl enable --now nvidia-fabricmanager")
    return CheckResult(name, Status.PASS, f"{found}; running")


Check = Callable[[Host, Expected], CheckResult]
CHECKS: tuple[Check, ...] = (check_gpu, check_driver, check_cuda, check_container_runtime, check_nvidia_runtime,
                             check_kubernetes, check_rdma, check_fabric_manager)


def run_checks(host: Host, expected: Expected, checks: tuple[Check, ...] = CHECKS) -> list[CheckResult]:
    """Every check on one host. An unreachable host gives one failed `ssh` result instead."""
    results = []
    for check in checks:
        try:
            results.append(check(host, expected))
        except HostError as exc:
            return [CheckResult("ssh", Status.FAIL, str(exc), "check the host's address, user and key in the "
                                "inventory (ansible_host, ansible_user, ansible_ssh_private_key_file)")]
    return results


# ------------------------------------------------------------------------------------ inventory hosts


def inventory_hosts(inventory: str, limit: str | None = None) -> list[tuple[SshHost, Expected]]:
    """The hosts of an Ansible inventory (file or folder, read by Ansible itself, group_vars included), each
    with a Fabric connection from its connection variables and what the inventory expects of it.

    Connection variables used: ansible_host, ansible_port, ansible_user, ansible_ssh_private_key_file, and
    a ProxyCommand or a ProxyJump (`-o ProxyJump=[USER@]HOST[:PORT]` or `-J ...`, as the inventory writes for
    pools behind a bastion; one jump host) in ansible_ssh_common_args / ansible_ssh_extra_args. Values are used
    as written, not templated.
    ValueError names a bad inventory.
    """
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    loader = DataLoader()
    try:
        manager = InventoryManager(loader=loader, sources=[inventory])
    except AnsibleError as exc:
        raise ValueError(f"{inventory}: {_one_line(exc)}") from None
    if limit:
        manager.subset(limit)
    variables = VariableManager(loader=loader, inventory=manager)
    hosts = manager.get_hosts()
    if not hosts:
        raise ValueError(f"{inventory}: no hosts" + (f" match --limit {limit}" if limit else ""))
    out = []
    for host in hosts:
        hostvars = variables.get_vars(host=host)
        groups = {g.name for g in host.get_groups()}
        count = hostvars.get("gpu_count")
        expected = Expected(hostvars.get("gpu_model") or None, int(count) if count not in (None, "") else None,
                            hostvars.get("rdma_fabric") or None, "k8s_nodes" in groups)
        out.append((SshHost(host.name, _connection(host.name, hostvars)), expected))
    return out


def _connection(name: str, hostvars: dict[str, Any]) -> Any:
    """A fabric.Connection from Ansible's connection variables."""
    from fabric import Connection

    key_file = hostvars.get("ansible_ssh_private_key_file")
    connect: dict[str, Any] = {"look_for_keys": key_file is None, "allow_agent": key_file is None}
    if key_file:
        connect["key_filename"] = str(key_file)
    user = hostvars.get("ansible_user")
    proxy: Any = None
    for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        tokens = shlex.split(str(hostvars.get(key) or ""))
        for i, token in enumerate(tokens):
            jump = tokens[i + 1] if token == "-J" and i + 1 < len(tokens) else token.removeprefix("ProxyJump=")
            if proxy is not None:  # as ssh does: the first proxy given wins
                break
            if token.startswith("ProxyCommand="):
                proxy = token.split("=", 1)[1]
            elif token == "-J" or token.startswith("ProxyJump="):
                if "," in jump or not jump:
                    raise ValueError(f"host {name}: {key}: one ProxyJump host is supported, not '{jump}'")
                jump_user, _, address = jump.rpartition("@")
                host, _, port = address.partition(":")
                # The jump host is reached as the node is (same key), as its user when the jump names none.
                proxy = Connection(host, user=jump_user or user, port=int(port or 22), connect_kwargs=connect,
                                   connect_timeout=10)
    return Connection(str(hostvars.get("ansible_host") or name), user=user,
                      port=int(hostvars.get("ansible_port") or 22), gateway=proxy, connect_kwargs=connect,
                      connect_timeout=10)
