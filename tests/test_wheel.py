"""The package as a user installs it, away from any checkout: the wheel is built, installed into a fresh
venv, and one real action of every `cpctl` command runs from there, in a folder that is not the checkout.

Offline and fast: the wheel is built with this venv's setuptools (no build isolation) and installed without
its dependencies; the fresh venv sees this venv's installed packages through a .pth line (plain path lines do
not run this venv's editable-install hook, so `controlplane` itself comes only from the wheel, which the test
checks). The console scripts of the dependencies the commands start (ansible-playbook) are recreated for the
fresh interpreter, as installing them there would. The GPU is the replayed `nvidia-smi` of tests/fakes (an
H100 capture) because this machine has none.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import site
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.procs import ManagedProcess, free_port, group_members

from .conftest import ROOT, stop_cpctl

H100_LGI = ROOT / "tests" / "data" / "nvidia-smi" / "h100-80gb-hbm3" / "mig-lgi.txt"
SCENARIO = """
rate: 20
duration_s: 1
flows:
  - {name: critical, weight: 1, priority: critical, api_key: cp-demo-key, deadline_ms: 2000,
     body: {inputs: [{name: x, datatype: FP32, shape: [1, 2], data: [1, 2]}], parameters: {work_ms: 1}}}
"""


@dataclass
class Installed:
    venv: Path
    project: Path  # the project files the wheel carries (controlplane/_project)
    home: Path  # the working directory of every command: not the checkout
    env: dict[str, str]

    def cpctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "cpctl"), *args], capture_output=True, text=True,
                              cwd=self.home, env=self.env, timeout=timeout)

    def ok(self, *args: str, timeout: float = 120) -> str:
        result = self.cpctl(*args, timeout=timeout)
        assert result.returncode == 0, f"cpctl {' '.join(args)}: {result.stderr[-3000:]}"
        return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(ROOT)], check=True, timeout=300, cwd=tmp)
    [wheel] = (tmp / "dist").glob("controlplane-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300, cwd=tmp)
    fresh_site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "test-venv-packages.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    for script in ("ansible-playbook",):  # what `pip install ansible-core` would put beside the fresh python
        source = Path(sys.executable).parent / script
        lines = source.read_text().splitlines(keepends=True)
        (venv / "bin" / script).write_text(f"#!{venv / 'bin' / 'python'}\n" + "".join(lines[1:]))
        (venv / "bin" / script).chmod(0o755)
    home = tmp / "elsewhere"
    home.mkdir()
    fake_gpus = tmp / "fake-gpus"
    (fake_gpus / "etc" / "fake-nvidia").mkdir(parents=True)
    (fake_gpus / "etc" / "fake-nvidia" / "hardware.json").write_text('{"model": "h100-80gb-hbm3", "count": 2}')
    (fake_gpus / "usr" / "share" / "fake-nvidia").mkdir(parents=True)
    (fake_gpus / "usr" / "share" / "fake-nvidia" / "captures").symlink_to(ROOT / "tests" / "data" / "nvidia-smi")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{ROOT / 'tests' / 'fakes'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                    "/sbin:/bin",
               CPCTL_RUN_DIR=str(tmp / "run"), FAKE_NVIDIA_ROOT=str(fake_gpus), COLUMNS="200")
    return Installed(venv, fresh_site / "controlplane" / "_project", home, env)


def test_controlplane_comes_from_the_wheel_with_its_project_files(installed: Installed) -> None:
    where = subprocess.run([str(installed.venv / "bin" / "python"), "-c", "import controlplane.resources as r; "
                            "print(r.__file__); print(r.project_root())"], capture_output=True, text=True,
                           cwd=installed.home, env=installed.env, check=True).stdout.split()
    assert where == [str(installed.project.parent / "resources.py"), str(installed.project)]
    for relative in ("playbooks/site.yml", "infra/__main__.py", "infra/stacks/Pulumi.aws.yaml", "Pulumi.yaml",
                     "bench/overload.yaml", "examples/local/cluster.yaml", "examples/models/risk/config.pbtxt"):
        assert (installed.project / relative).is_file(), relative
    assert (installed.project.parent / "gateway" / "__init__.py").is_file()


def test_spec_gpu_provision_and_infra_commands(installed: Installed, tmp_path: Path) -> None:
    examples = installed.project / "examples"
    assert "cluster 'local-demo'" in installed.ok("validate", "-f", str(examples / "local" / "cluster.yaml"))
    assert installed.ok("hash-key", "cp-demo-key").strip() == hashlib.sha256(b"cp-demo-key").hexdigest()
    gpu_spec = str(examples / "gpu" / "cluster.yaml")
    assert json.loads(installed.ok("gpu", "plan", "-f", gpu_spec, "--json"))["cluster"] == "gpu-demo"
    assert json.loads(installed.ok("gpu", "list", "--json"))["gpus"][0]["catalog_model"] == "H100-80GB"
    assert "version: v1" in installed.ok("gpu", "mig", "config", "-f", gpu_spec)
    assert "nvidia-smi mig -i 0 -cgi" in installed.ok("gpu", "mig", "steps", "-f", gpu_spec, "--node", "gpu-b",
                                                      "--current", str(H100_LGI))
    diff = json.loads(installed.ok("gpu", "mig", "diff", "-f", gpu_spec, "--node", "gpu-b", "--current",
                                   str(H100_LGI), "--json"))
    assert diff[0]["mig_mode"] == "enable"

    inventory = tmp_path / "inventory" / "hosts.yml"
    assert "wrote" in installed.ok("inventory", "-f", gpu_spec, "-o", str(inventory))
    local = tmp_path / "local.yml"  # this machine, its replayed GPUs, a MIG layout to evaluate in check mode
    local.write_text(json.dumps({"all": {"children": {"gpu_nodes": {"hosts": {"local-gpu": {
        "ansible_connection": "local", "ansible_become": False, "ansible_python_interpreter": "/usr/bin/python3",
        "mig_gpu_model": "H100-80GB",
        "mig_gpus": [{"index": 0, "profiles": ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]}]}}}}}}))
    result = json.loads(installed.ok("provision", "-i", str(local), "--check", "--tags", "mig", "--json"))
    assert result["succeeded"] and result["hosts"]["local-gpu"]["ok"] > 0
    calls = (Path(installed.env["FAKE_NVIDIA_ROOT"]) / "var" / "log" / "fake-nvidia-smi.log").read_text()
    assert "mig -lgi" in calls  # the mig role's action plugin (which imports controlplane) read the MIG state

    preview = json.loads(installed.ok("infra", "preview", "-f", str(examples / "aws" / "cluster.yaml"),
                                      "--stack", "aws", "--json", timeout=300))
    assert preview["offline"] and "aws:ec2/instance:Instance" in {r["type"] for r in preview["resources"]}


@pytest.fixture
def local_stack(installed: Installed) -> Iterator[tuple[ManagedProcess, dict]]:
    """`cpctl up` of the example the wheel carries, run from the fresh venv; stopped with Ctrl-C."""
    spec = installed.project / "examples" / "local" / "cluster.yaml"
    state_file = Path(installed.env["CPCTL_RUN_DIR"]) / "local-demo" / "state.json"
    process = ManagedProcess([str(installed.venv / "bin" / "cpctl"), "up", "-f", str(spec), "--port", "0"],
                             env=installed.env, cwd=installed.home, log_path=installed.home / "up.log")
    try:
        deadline = time.monotonic() + 90
        while not state_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.log_tail()
            time.sleep(0.1)
        state = json.loads(state_file.read_text())
        started = [s["pid"] for s in state["shards"] + state["workers"] if s["pid"] and s["pid"] != process.pid]
        pids = {process.pid} | {pid for leader in started for pid in group_members(leader)}
        yield process, state
        assert not stop_cpctl(process, pids, signal.SIGINT)
        assert not state_file.exists()
    finally:
        process.stop(grace_s=1)


def test_serving_commands(installed: Installed, local_stack: tuple[ManagedProcess, dict], tmp_path: Path) -> None:
    _, state = local_stack
    spec = str(installed.project / "examples" / "local" / "cluster.yaml")
    status = json.loads(installed.ok("status", "-f", spec, "--json"))
    assert status["gateway"] == state["gateway"] and all(s["ready"] for s in status["shards"] if not s["standby"])
    assert "score" in installed.ok("infer", "risk", "-f", spec)
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(SCENARIO)
    report = json.loads(installed.ok("bench", "run", "-s", str(scenario), "--url", state["gateway"], "--json"))
    assert report["all"]["sent"] == 20 and report["flows"]["critical"]["statuses"] == {"200": 20}

    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps([
        {"name": s["name"], "host": "127.0.0.1", "port": int(s["url"].rsplit(":", 1)[1]), "models": s["models"]}
        for s in state["shards"] if s["url"]]))
    port = free_port()
    gateway = ManagedProcess([str(installed.venv / "bin" / "cpctl"), "gateway", "-f", spec, "--endpoints",
                              str(endpoints), "--port", str(port)], env=installed.env, cwd=installed.home,
                             log_path=tmp_path / "gateway.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/risk", timeout=1) as response:
                    assert json.loads(response.read())["name"] == "risk"
                    break
            except OSError:
                assert gateway.poll() is None and time.monotonic() < deadline, gateway.log_tail()
                time.sleep(0.1)
    finally:
        gateway.stop()


def test_bench_suite_finds_its_spec_and_models(installed: Installed, tmp_path: Path) -> None:
    """The suite's shortest group (CPU per request, quick): its stack is bench/overload.yaml with the example
    models, both from the wheel; nginx and wrk are Debian packages (system-packages.txt)."""
    results = json.loads(installed.ok("bench", "suite", "--only", "cpu", "--quick", "--results-dir",
                                      str(tmp_path), "--json", timeout=300))
    assert results["groups"] == ["cpu"] and results["cpu"]["admitted"]["requests"] > 0
    assert {p.name for p in tmp_path.iterdir()} == {f"cpu-{results['date']}.json", f"cpu-{results['date']}.md"}
