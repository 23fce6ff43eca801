"""The Debian root filesystem every test host boots from: debootstrap'd once, cached across test runs.

The image is keyed by suite, variant and package list, built into a temporary folder and renamed into place
under a lock, so concurrent test runs on one machine share one build and never see a half-built image.
Hosts never write to it: each host mounts it as the read-only lower layer of its own overlay.

The Debian mirror is read from this machine's apt sources at run time (deb822 `*.sources` first, then
`sources.list`), so no registry host name is written into the repository.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
# What the roles expect a Debian GPU host to have from its distribution (apt installs of these are no-ops
# in the tests, as the hosts cannot reach a Debian mirror), plus what the harness itself needs (sshd,
# python3, python3-apt and python3-debian for Ansible's apt and deb822_repository modules).
PACKAGES = (
    "ca-certificates",
    "containerd",
    "dkms",
    "ibverbs-utils",
    "infiniband-diags",
    "iproute2",
    "kmod",
    "openssh-server",
    "perftest",
    "python3",
    "python3-apt",
    "python3-debian",
    "rdma-core",
)
# Bump when the post-debootstrap steps below change, so cached images are rebuilt.
RECIPE_VERSION = 1
CACHE_ROOT = Path(os.environ.get("CPCTL_TEST_HOSTS_CACHE", "/var/cache/cpctl-test-hosts"))


class ImageError(RuntimeError):
    """The image cannot be built; the message says what to install or fix."""


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian mirror URI of this machine's apt sources that serves the main suite."""
    candidates: list[tuple[str, list[str]]] = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(
                (key.strip().lower(), value.strip())
                for key, _, value in (line.partition(":") for line in stanza.splitlines())
                if not key.startswith("#") and value
            )
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
                suites = fields.get("suites", "").split()
                candidates += [(uri, suites) for uri in fields.get("uris", "").split()]
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if path.exists():
            for line in path.read_text().splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    candidates.append((parts[1], [parts[2]]))
    for uri, suites in candidates:
        if SUITE in suites:
            return uri.rstrip("/")
    raise ImageError(f"no apt source for Debian '{SUITE}' in {apt_dir}: debootstrap needs a Debian mirror")


def image_key() -> str:
    recipe = f"{SUITE}|{VARIANT}|{','.join(sorted(PACKAGES))}|{RECIPE_VERSION}"
    return f"{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def ensure_image(log: Path) -> Path:
    """The cached image's root folder, debootstrap'ing it first when missing (~40-60 s once)."""
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed (apt-get install debootstrap; see system-packages.txt)")
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    final = CACHE_ROOT / image_key()
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same image
        if (final / ".complete").exists():
            return final / "root"
        # Images of other recipes (an older package list) are not used again: free their space.
        for stale in CACHE_ROOT.iterdir():
            if stale.is_dir() and stale.name.startswith(f"{SUITE}-") and stale != final:
                shutil.rmtree(stale, ignore_errors=True)
        building = CACHE_ROOT / f"{image_key()}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        root = building / "root"
        root.mkdir(parents=True)
        started = time.monotonic()
        command = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", SUITE, str(root),
                   debian_mirror()]
        with open(log, "ab") as out:
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise ImageError(f"debootstrap failed (exit {result.returncode}); see {log}")
        _prepare(root)
        (building / ".complete").write_text(f"built in {time.monotonic() - started:.0f} s\n")
        building.rename(final)
        return final / "root"


def _prepare(root: Path) -> None:
    """Make the image a host the harness can boot: offline apt, sshd keys, no services started."""
    # The hosts reach no Debian mirror; each host gets its sources from the harness at boot.
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    for cached in (root / "var/cache/apt/archives").glob("*.deb"):
        cached.unlink()
    subprocess.run(["chroot", str(root), "ssh-keygen", "-A"], check=True, capture_output=True)
    for folder in ("run/sshd", "root/.ssh", "etc/fake-nvidia"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "root/.ssh").chmod(0o700)
