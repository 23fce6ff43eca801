"""Local apt repositories for the test hosts: dummy NVIDIA packages signed with a throwaway key.

Four flat repositories, laid out like the real ones the roles point at, served over HTTP inside the test
network only:
- `cuda/`: NVIDIA's CUDA repository stand-in: `cuda-drivers-BRANCH` (ships the fake `nvidia-smi`, the real
  nvidia-smi captures it replays and the driver version), `cuda-toolkit-12-X` (a fake `nvcc`) and
  `nvidia-fabricmanager-BRANCH` twice: at the driver's version and at a newer one apt would prefer.
- `libnvidia-container/`: `nvidia-container-toolkit` (a fake `nvidia-ctk` that edits containerd/docker configs).
- `kubernetes/`: pkgs.k8s.io's stand-in: `kubelet`, `kubeadm`, `kubectl` (empty programs: nothing joins).
- `debian/`: the distribution mirror stand-in, with the kernel headers package for the running kernel (the
  hosts share this machine's kernel, which no Debian mirror carries headers for).

The packages are empty apart from those files and have no dependencies: they let the real apt, keyring and
repository tasks run end to end, not a driver. The key is made per test session in a throwaway GnuPG home
whose agent is stopped before returning.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FAKES = Path(__file__).resolve().parent.parent / "fakes"
CAPTURES = Path(__file__).resolve().parent.parent / "data" / "nvidia-smi"

DRIVER_BRANCH = "580"
DRIVER_VERSION = "580.95.05"
# A newer Fabric Manager of the branch than the driver: what apt would pick, and must not.
NEWER_FABRIC_MANAGER_VERSION = "580.105.08"
CUDA_RELEASE = "12.6"
CUDA_BUILD = "12.6.85"
CONTAINER_TOOLKIT_VERSION = "1.17.8"
KUBERNETES_VERSION = "1.31.4"
KEY_NAME = "cpctl-test-archive-keyring.asc"


@dataclass(frozen=True)
class Repos:
    root: Path  # served as the web root
    key_file: Path  # the armored public key (also served as /KEY_NAME)


def build_repos(root: Path, kernel: str) -> Repos:
    """Build, sign and index the three repositories under `root`."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    staging = root.parent / "pkg-staging"
    shutil.rmtree(staging, ignore_errors=True)

    driver = _package(staging, f"cuda-drivers-{DRIVER_BRANCH}", f"{DRIVER_VERSION}-1", {
        "usr/bin/nvidia-smi": (FAKES / "nvidia-smi").read_bytes(),
        "usr/share/fake-nvidia/driver-version": f"{DRIVER_VERSION}\n".encode(),
        "usr/bin/nvidia-persistenced": b"#!/bin/sh\nexit 0\n",
        "lib/systemd/system/nvidia-persistenced.service": (
            b"[Unit]\nDescription=NVIDIA Persistence Daemon\n\n[Service]\nType=forking\n"
            b"ExecStart=/usr/bin/nvidia-persistenced --user root\n\n[Install]\nWantedBy=multi-user.target\n"
        ),
        **{f"usr/share/fake-nvidia/captures/{p.parent.name}/{p.name}": p.read_bytes()
           for p in CAPTURES.glob("*/*.*") if p.suffix in (".txt", ".csv")},
    }, "NVIDIA driver metapackage, branch pinned (test dummy: fake nvidia-smi)")
    cuda_dir = f"usr/local/cuda-{CUDA_RELEASE}"
    toolkit = _package(staging, f"cuda-toolkit-{CUDA_RELEASE.replace('.', '-')}", f"{CUDA_BUILD}-1", {
        f"{cuda_dir}/bin/nvcc": (FAKES / "nvcc").read_bytes()
        .replace(b"@CUDA_RELEASE@", CUDA_RELEASE.encode()).replace(b"@CUDA_BUILD@", CUDA_BUILD.encode()),
        f"{cuda_dir}/version.json": f'{{"cuda": {{"name": "CUDA SDK", "version": "{CUDA_BUILD}"}}}}\n'.encode(),
        f"{cuda_dir}/lib64/.keep": b"",
    }, "CUDA Toolkit (test dummy: fake nvcc)")
    ctk = _package(staging, "nvidia-container-toolkit", f"{CONTAINER_TOOLKIT_VERSION}-1", {
        "usr/bin/nvidia-ctk": (FAKES / "nvidia-ctk").read_bytes(),
        "usr/bin/nvidia-container-runtime": b"#!/bin/sh\nexec runc \"$@\"\n",
    }, "NVIDIA Container Toolkit (test dummy: fake nvidia-ctk)")
    fabric_managers = [_package(staging, f"nvidia-fabricmanager-{DRIVER_BRANCH}", f"{version}-1", {
        "usr/bin/nv-fabricmanager": b"#!/bin/sh\nexit 0\n",
        "usr/share/fake-nvidia/fabricmanager-version": f"{version}\n".encode(),
    }, "NVIDIA Fabric Manager (test dummy)") for version in (DRIVER_VERSION, NEWER_FABRIC_MANAGER_VERSION)]
    kubernetes = [_package(staging, tool, f"{KUBERNETES_VERSION}-1.1", {f"usr/bin/{tool}": b"#!/bin/sh\nexit 0\n"},
                           f"Kubernetes {tool} (test dummy)") for tool in ("kubelet", "kubeadm", "kubectl")]
    headers = _package(staging, f"linux-headers-{kernel}", "1.0-1", {
        f"usr/src/linux-headers-{kernel}/Makefile": b"# test dummy\n",
    }, "Header files for the running kernel (test dummy)")

    home = Path(tempfile.mkdtemp(prefix="cpg", dir="/tmp"))  # short: gpg-agent's socket path is limited
    try:
        env = {**os.environ, "GNUPGHOME": str(home)}
        gpg = ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", ""]
        subprocess.run([*gpg, "--quick-gen-key", "cpctl test archive <test@cpctl.invalid>", "ed25519", "sign",
                        "1d"], env=env, check=True, capture_output=True)
        key = subprocess.run([*gpg, "--armor", "--export"], env=env, check=True, capture_output=True).stdout
        repositories = {"cuda": [driver, toolkit, *fabric_managers], "libnvidia-container": [ctk],
                        "kubernetes": kubernetes, "debian": [headers]}
        for name, debs in repositories.items():
            repo = root / name
            repo.mkdir()
            for deb in debs:
                shutil.copy(deb, repo / deb.name)
            _index(repo)
            release = repo / "Release"
            subprocess.run([*gpg, "--clearsign", "-o", str(repo / "InRelease"), str(release)], env=env, check=True)
            subprocess.run([*gpg, "-abs", "-o", str(repo / "Release.gpg"), str(release)], env=env, check=True)
    finally:
        # The agent that gpg started for this home; stopped by its home, not by name.
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    (root / KEY_NAME).write_bytes(key)
    return Repos(root, root / KEY_NAME)


def _package(staging: Path, name: str, version: str, files: dict[str, bytes], description: str) -> Path:
    tree = staging / f"{name}_{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: cpctl tests <test@cpctl.invalid>\n"
        f"Section: misc\nPriority: optional\nDescription: {description}\n"
    )
    for path, content in files.items():
        target = tree / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(0o755 if content.startswith(b"#!") else 0o644)
    deb = staging / f"{name}_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb


def _index(repo: Path) -> None:
    """Packages, Packages.gz and Release of a flat repository (`deb URL /`)."""
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=repo, check=True,
                              capture_output=True).stdout
    (repo / "Packages").write_bytes(packages)
    (repo / "Packages.gz").write_bytes(gzip.compress(packages, mtime=0))
    lines = ["Origin: cpctl-test", "Label: cpctl-test", "Suite: stable", "Codename: stable",
             "Architectures: amd64 all", "Date: Thu, 01 Jan 2026 00:00:00 UTC", "SHA256:"]
    for name in ("Packages", "Packages.gz"):
        data = (repo / name).read_bytes()
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}")
    (repo / "Release").write_text("\n".join(lines) + "\n")
