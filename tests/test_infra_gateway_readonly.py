"""The gateway container runs with the read-only root filesystem its Deployment declares.

No container runtime here, so the container is emulated with the kernel's own tools, all of it taken
from the rendered manifests (the `aws` stack under the Pulumi mocks): in a private mount namespace, an
overlay of this machine's root stands in for the image, mounted READ-ONLY; the ConfigMap volume is a
read-only tmpfs holding the ConfigMap's files; every emptyDir is a tmpfs at its mountPath; then the
container's own command line (the image's entrypoint `cpctl` + the manifest's args) runs chrooted there,
as the manifest's user, with only the manifest's environment. A write anywhere but the declared volumes
fails with EROFS, as in the pod. Root is needed (mount namespaces, chroot). The gateway's `kubernetes` shard
backend talks to the wire-level fake API server (tests/fakes/kube_api.py) under the Role the program renders;
its credentials, which a pod gets from its ServiceAccount, come from a kubeconfig in the ConfigMap's volume
(`KUBECONFIG`, the one variable added to the manifest's environment).
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from controlplane.gpu.plan import plan_cluster
from controlplane.procs import ManagedProcess
from controlplane.shards.manifests import gateway_access, shard_groups
from controlplane.spec import load_spec
from tests.fakes.kube_api import FakeKubeApi
from tests.test_infra_support import k8s, required, run_stack

ENTRYPOINT = Path(sys.executable).parent / "cpctl"  # the image's ENTRYPOINT ["cpctl"] (images/Dockerfile.controlplane)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def container_script(pod: dict, config: dict, staging: Path, scratch: Path, extra_env: list[str]) -> str:
    """The shell script that builds the container's filesystem from the pod spec and execs its command."""
    container = required(pod, "containers", 0)
    volumes = {v["name"]: v for v in required(pod, "volumes")}
    root = scratch / "root"
    lines = ["set -eu", f"mount -t tmpfs tmpfs {scratch}", f"mkdir {scratch}/upper {scratch}/work {root}",
             f"mount -t overlay overlay -o lowerdir=/,upperdir={scratch}/upper,workdir={scratch}/work {root}",
             f"mount --rbind /dev {root}/dev", f"mount -t proc proc {root}/proc"]
    for mount in required(container, "volumeMounts"):
        # The image's files stand in for the image: a volume mounted over them would hide them.
        hidden = [p for p in (ENTRYPOINT, Path(sys.prefix)) if str(p).startswith(mount["mountPath"].rstrip("/") + "/")]
        if hidden:
            pytest.fail(f"{hidden[0]} lies under {mount['mountPath']}, where the gateway container mounts its "
                        f"'{mount['name']}' volume: run the tests from a checkout elsewhere (CI's is under /check)")
        # Resolved inside the image, as the runtime does (/var/run is a link to /run): never on this host.
        volume, path = volumes[mount["name"]], root / os.path.realpath(mount["mountPath"]).lstrip("/")
        lines += [f"mkdir -p {path}", f"mount -t tmpfs -o mode=1777 tmpfs {path}"]
        if "configMap" in volume:
            assert volume["configMap"]["name"] == config["metadata"]["name"]
            lines += [f"cp {staging}/* {path}/", f"mount -o remount,ro {path}"]
        else:
            assert set(volume) == {"name", "emptyDir"}, f"volume {volume} is neither the ConfigMap nor an emptyDir"
    # In the image, its user can reach the interpreter; here it may sit under root's home: open the way in
    # the overlay's copy only (the host's folders are untouched).
    interpreter = Path(os.path.realpath(sys.executable))
    lines += [f"chmod o+x {root / folder.relative_to('/')}" for folder in interpreter.parents if folder != Path("/")]
    lines.append(f"mount -o remount,ro {root}")  # the image: nothing else is writable
    uid = required(pod, "securityContext", "runAsUser")
    env = [f"{e['name']}={e['value']}" for e in container.get("env", [])] + ["PATH=/usr/bin:/bin", *extra_env]
    command = [str(ENTRYPOINT), *required(container, "args")]
    lines.append(f"exec chroot --userspec={uid}:{uid} {root} env -i {shlex.join(env)} {shlex.join(command)}")
    return "\n".join(lines) + "\n"


def test_gateway_command_runs_with_a_read_only_root_and_only_its_declared_volumes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the read-only root emulation needs root (mount namespace, chroot): run the tests as root")
    run = run_stack("aws")
    deployment, config = k8s(run, "Deployment", "gateway"), k8s(run, "ConfigMap", "gateway-config")
    pod = required(deployment, "spec", "template", "spec")
    assert required(pod, "containers", 0, "securityContext", "readOnlyRootFilesystem") is True

    # The ConfigMap's files; only where it listens changes (loopback and a free port on this shared machine).
    staging = tmp_path / "config"
    staging.mkdir()
    port = free_port()
    spec = yaml.safe_load(required(config, "data", "cluster.yaml"))
    spec["gateway"].update(listen="127.0.0.1", port=port)
    (staging / "cluster.yaml").write_text(yaml.safe_dump(spec))
    served = load_spec(staging / "cluster.yaml")
    namespace = served.shards_backend.namespace
    role = next(o for o in gateway_access(served, shard_groups(served, plan_cluster(served)), namespace)
                if o["kind"] == "Role")  # what the program binds to the gateway's account, from the same function
    api = FakeKubeApi(role=role).__enter__()
    (staging / "kubeconfig").write_text(yaml.safe_dump(api.kubeconfig(namespace)))
    mount = next(m["mountPath"] for m in required(pod, "containers", 0, "volumeMounts") if m["name"] == "config")
    scratch = tmp_path / "container"
    scratch.mkdir()
    script = tmp_path / "container.sh"
    script.write_text(container_script(pod, config, staging, scratch, [f"KUBECONFIG={mount}/kubeconfig"]))

    log = tmp_path / "gateway.log"
    gateway = ManagedProcess(["unshare", "--mount", "--propagation", "private", "sh", str(script)], log_path=log)
    try:
        status, live = None, False
        for _ in range(150):  # bounded: 30 s
            if gateway.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=2) as response:
                    status = response.status
                    live = True
                    break
            except OSError:
                time.sleep(0.2)
        time.sleep(1)  # a crash right after start-up (a write at the first tick) shows as an exit here
        still_running = gateway.poll() is None
    finally:
        gateway.stop()
        api.__exit__()
    output = log.read_text()
    assert live and status == 200, f"the gateway did not come up read-only:\n{output}"
    assert still_running, f"the gateway exited after start-up:\n{output}"
    assert "Read-only file system" not in output, output
    assert any(path.startswith("/apis/discovery.k8s.io/v1/namespaces/") and "endpointslices" in path
               for _, path, _ in api.requests)  # it followed the shards through the API, within its Role
    shutil.rmtree(scratch, ignore_errors=True)
