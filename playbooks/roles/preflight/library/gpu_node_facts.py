#!/usr/bin/python3
"""Ansible module `gpu_node_facts`: what a GPU node looks like before provisioning, read in one pass."""

from __future__ import annotations

DOCUMENTATION = r"""
module: gpu_node_facts
short_description: Read a GPU node's PCI GPUs, RDMA devices, Secure Boot state, kernels and memlock limits
description:
  - Read-only. Reads sysfs (PCI functions, /sys/class/infiniband), EFI variables, /boot and /lib/modules,
    /proc/modules, the process's RLIMIT_MEMLOCK and /etc/security/limits.conf(.d).
options: {}
author: controlplane
"""

RETURN = r"""
gpu_node:
  description: nvidia_gpus, other_nvidia, rdma_devices, secure_boot, kernels, running_kernel, newest_kernel,
    headers_installed, loaded_modules, memlock (soft, hard, configured).
  returned: always
  type: dict
"""

# Ansible modules keep DOCUMENTATION and RETURN above the imports (ansible-doc reads them from there).
import glob  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def read(path, default=""):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return default


def pci_functions():
    out = []
    for device in sorted(glob.glob("/sys/bus/pci/devices/*")):
        out.append({"address": os.path.basename(device), "vendor": read(device + "/vendor"),
                    "device": read(device + "/device"), "class": read(device + "/class")})
    return out


def rdma_devices():
    out = []
    for device in sorted(glob.glob("/sys/class/infiniband/*")):
        ports = []
        for port in sorted(glob.glob(device + "/ports/*")):
            ports.append({"port": int(os.path.basename(port)), "state": read(port + "/state"),
                          "link_layer": read(port + "/link_layer"), "rate": read(port + "/rate")})
        out.append({"name": os.path.basename(device), "ports": ports})
    return out


def secure_boot():
    if not os.path.isdir("/sys/firmware/efi"):
        return "not-efi"
    try:
        with open(SECURE_BOOT_VAR, "rb") as handle:
            data = handle.read()
    except OSError:
        return "unknown"
    return "enabled" if len(data) >= 5 and data[4] == 1 else "disabled"


def kernel_key(version):
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\-+~]", version)]


def memlock_limit(value):
    return "unlimited" if value == resource.RLIM_INFINITY else value


def configured_memlock():
    """memlock lines of limits.conf and limits.d: (file, domain, type, value)."""
    out = []
    for path in ["/etc/security/limits.conf"] + sorted(glob.glob("/etc/security/limits.d/*.conf")):
        for line in read(path).splitlines():
            parts = line.split("#")[0].split()
            if len(parts) == 4 and parts[2] == "memlock":
                out.append({"file": path, "domain": parts[0], "type": parts[1], "value": parts[3]})
    return out


def main():
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    functions = pci_functions()
    running = os.uname().release
    kernels = sorted({os.path.basename(p).removeprefix("vmlinuz-") for p in glob.glob("/boot/vmlinuz-*")},
                     key=kernel_key)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    facts = {
        # Class 0x0300xx (VGA) or 0x0302xx (3D controller): data-centre GPUs are 3D controllers.
        "nvidia_gpus": [f for f in functions
                        if f["vendor"] == "0x10de" and f["class"].startswith(("0x0300", "0x0302"))],
        "mellanox_functions": [f for f in functions if f["vendor"] == "0x15b3"],
        "rdma_devices": rdma_devices(),
        "secure_boot": secure_boot(),
        "running_kernel": running,
        "kernels": kernels,
        "newest_kernel": kernels[-1] if kernels else running,
        "headers_installed": os.path.exists(f"/lib/modules/{running}/build")
        or os.path.isdir(f"/usr/src/linux-headers-{running}"),
        "loaded_modules": sorted(line.split()[0] for line in read("/proc/modules").splitlines() if line),
        "memlock": {"soft": memlock_limit(soft), "hard": memlock_limit(hard), "configured": configured_memlock()},
    }
    module.exit_json(changed=False, gpu_node=facts)


if __name__ == "__main__":
    main()
