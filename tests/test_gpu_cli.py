"""`cpctl gpu plan|list|mig diff|config|steps` as registered by controlplane/cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from controlplane.cli import app
from controlplane.gpu import cli
from controlplane.gpu.devices import HostGpus, NoGpuError
from tests.test_gpu_discover import LGI_ENABLED

ROOT = Path(__file__).resolve().parent.parent
GPU_SPEC = str(ROOT / "examples" / "gpu" / "cluster.yaml")
H200_INVENTORY = ROOT / "tests" / "data" / "nvidia-smi" / "h200" / "cpctl-gpu.json"
LGI_DISABLED = ROOT / "tests" / "data" / "nvidia-smi" / "h100-80gb-hbm3" / "mig-lgi.txt"

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_plan_prints_a_table_with_every_replica() -> None:
    code, out, _ = invoke("gpu", "plan", "-f", GPU_SPEC)
    assert code == 0
    for text in ("risk-critical-0", "textgen-2 (standby)", "3g.40gb", "pool existing: 3 of 16 H100-80GB GPUs used"):
        assert text in out


def test_plan_json_carries_labels_and_resources() -> None:
    code, out, _ = invoke("gpu", "plan", "-f", GPU_SPEC, "--json")
    data = json.loads(out)
    assert code == 0 and data["cluster"] == "gpu-demo"
    assert data["node_labels"]["burst-0"] == {"nvidia.com/mig.config": "all-balanced"}
    assert any(r["resource"] == "nvidia.com/mig-2g.35gb" for r in data["replica_resources"])


def test_bad_spec_and_infeasible_plan_are_one_line_errors_with_exit_2(tmp_path: Path) -> None:
    code, _, err = invoke("gpu", "plan", "-f", str(tmp_path / "missing.yaml"))
    assert code == 2 and err.count("\n") == 1 and "cannot read the spec" in err
    spec = yaml.safe_load(Path(GPU_SPEC).read_text())
    spec["shards"][0]["replicas"] = 200
    too_big = tmp_path / "big.yaml"
    too_big.write_text(yaml.safe_dump(spec))
    code, _, err = invoke("gpu", "plan", "-f", str(too_big))
    assert code == 2 and "add nodes or reduce replicas" in err and "Traceback" not in err


def test_gpu_reports_no_gpu_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def none() -> HostGpus:
        raise NoGpuError("no NVIDIA GPU found on this machine (nvidia-smi is not installed)")

    monkeypatch.setattr(cli, "discover", none)
    code, _, err = invoke("gpu", "list")
    assert code == 1 and "no NVIDIA GPU found" in err


def test_gpu_lists_the_real_h200_inventory(monkeypatch: pytest.MonkeyPatch) -> None:
    inventory = HostGpus.from_dict(json.loads(H200_INVENTORY.read_text()))
    monkeypatch.setattr(cli, "discover", lambda: inventory)
    code, out, _ = invoke("gpu", "list")
    assert code == 0 and "H200-141GB" in out and "{0,4}:4" in out and "Disabled" in out
    code, out, _ = invoke("gpu", "list", "--json")
    assert HostGpus.from_dict(json.loads(out)) == inventory


def test_mig_diff_from_saved_states() -> None:
    code, out, _ = invoke("gpu", "mig", "diff", "-f", GPU_SPEC, "--node", "gpu-b", "--current", str(LGI_DISABLED))
    assert code == 0 and "enable" in out and "gpu-b: 1 of 8 GPU(s) to change" in out
    code, out, _ = invoke("gpu", "mig", "diff", "-f", GPU_SPEC, "--node", "burst-0", "--current", str(H200_INVENTORY),
                          "--json")
    changes = json.loads(out)
    assert changes[0]["mig_mode"] == "enable" and changes[0]["create"] and changes[0]["commands"]
    assert changes[1]["problem"] == "GPU 1: not found on the node (it has 1 GPU(s))"
    code, out, _ = invoke("gpu", "mig", "diff", "-f", GPU_SPEC, "--node", "burst-0", "--current", str(H200_INVENTORY))
    assert code == 0 and "burst-0: cannot be reconciled (7 problem(s)); nothing would run" in out


def test_mig_diff_without_a_gpu_says_how_to_compare_a_saved_state(monkeypatch: pytest.MonkeyPatch) -> None:
    def none() -> HostGpus:
        raise NoGpuError("no NVIDIA GPU found on this machine (nvidia-smi is not installed)")

    monkeypatch.setattr(cli, "discover", none)
    code, _, err = invoke("gpu", "mig", "diff", "-f", GPU_SPEC, "--node", "gpu-b")
    assert code == 1 and "pass --current FILE to compare a saved state" in err


def test_mig_diff_bad_node_and_bad_file_exit_2(tmp_path: Path) -> None:
    code, _, err = invoke("gpu", "mig", "diff", "-f", GPU_SPEC, "--node", "nope", "--current", str(LGI_DISABLED))
    assert code == 2 and "no node 'nope' in the plan (nodes: gpu-a, gpu-b, burst-0)" in err
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    code, _, err = invoke("gpu", "mig", "diff", "-f", GPU_SPEC, "--current", str(junk))
    assert code == 2 and "expected `cpctl gpu list --json` output" in err


def test_mig_config_and_steps() -> None:
    code, out, _ = invoke("gpu", "mig", "config", "-f", GPU_SPEC)
    assert code == 0 and "#   gpu-a: nvidia.com/mig.config=existing-1" in out
    assert yaml.safe_load(out)["version"] == "v1"
    code, out, _ = invoke("gpu", "mig", "steps", "-f", GPU_SPEC, "--node", "gpu-b", "--current", str(LGI_DISABLED))
    assert code == 0 and out.splitlines()[:2] == ["nvidia-smi -i 0 -mig 1",
                                                  "nvidia-smi mig -i 0 -cgi 9:4,19:0,19:1,19:2,19:3 -C"]


def test_mig_steps_refuses_a_node_that_cannot_be_reconciled(tmp_path: Path) -> None:
    code, out, err = invoke("gpu", "mig", "steps", "-f", GPU_SPEC, "--node", "burst-0",
                            "--current", str(H200_INVENTORY))
    assert code == 2 and out == "" and "burst-0: GPU 1: not found on the node (it has 1 GPU(s))" in err
    lgi_only = tmp_path / "lgi.txt"
    lgi_only.write_text(LGI_ENABLED)
    code, _, err = invoke("gpu", "mig", "steps", "-f", GPU_SPEC, "--node", "gpu-b", "--current", str(lgi_only))
    assert code == 2 and "save `nvidia-smi mig -lci` output with `nvidia-smi mig -lgi`" in err


def test_every_command_has_help_with_an_example() -> None:
    for args in (["plan"], ["list"], ["mig", "diff"], ["mig", "config"], ["mig", "steps"]):
        code, out, _ = invoke("gpu", *args, "--help")
        assert code == 0 and "Example:" in out


def test_old_top_level_names_are_hidden_aliases() -> None:
    assert invoke("plan", "-f", GPU_SPEC, "--json")[1] == invoke("gpu", "plan", "-f", GPU_SPEC, "--json")[1]
    assert invoke("mig", "config", "-f", GPU_SPEC)[1] == invoke("gpu", "mig", "config", "-f", GPU_SPEC)[1]
    code, out, _ = invoke("--help")
    commands = {line.split()[1] for line in out.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert code == 0 and "gpu" in commands and not {"plan", "mig"} & commands
