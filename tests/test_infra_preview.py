"""`cpctl infra preview`: the offline listing of what `pulumi up` would create, per stack."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from controlplane.infra.cli import infra_app
from tests.test_infra_support import ROOT, SPECS

app = typer.Typer()
app.add_typer(infra_app, name="infra")  # as controlplane/cli.py registers it
runner = CliRunner()

EXPECTED = {
    "aws": ["aws:ec2/launchTemplate:LaunchTemplate", "p5.48xlarge, 32 EFA interfaces", "strategy cluster",
            "2 all-traffic self rules (EFA)"],
    "azure": ["azure-native:compute:VirtualMachineScaleSet", "Standard_ND96isr_H100_v5 x 2",
              "microsoft-dsvm:ubuntu-hpc:2204", "NicClusterPolicy"],
    "existing": ["ansible_host: 192.0.2.11", "NicClusterPolicy"],
}


def preview(*args: str) -> str:
    result = runner.invoke(app, ["infra", "preview", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("stack", sorted(EXPECTED))
def test_preview_lists_the_stack_resources_labelled_offline(stack: str) -> None:
    out = preview("-f", str(SPECS[stack]), "--stack", stack)
    assert "OFFLINE preview" in out
    for text in [*EXPECTED[stack], "kubernetes:helm.sh/v3:Release", "gpu-operator v26.3.3",
                 "nvidia.com/mig.config=", "kubernetes:networking.k8s.io/v1:NetworkPolicy", "ansibleInventory"]:
        assert text in out, f"{text!r} missing from the preview"


def test_preview_json_has_every_resource_and_the_inventory() -> None:
    data = json.loads(preview("-f", str(SPECS["aws"]), "--stack", "aws", "--json"))
    assert data["offline"] is True
    types = {r["type"] for r in data["resources"]}
    assert {"aws:ec2/instance:Instance", "kubernetes:apps/v1:Deployment"} <= types
    assert "efa-0" in data["outputs"]["ansibleInventory"]


def test_preview_of_the_mixed_gpu_example_without_a_stack_file() -> None:
    out = preview("-f", str(ROOT / "examples/gpu/cluster.yaml"), "--stack", "gpu-demo")
    assert "default stack settings" in out
    assert "p5en.48xlarge, 16 EFA interfaces" in out
    assert "ansible_host: gpu-a" in out


def test_preview_of_a_bad_spec_is_one_line_with_the_problem(tmp_path) -> None:  # noqa: ANN001
    bad = tmp_path / "cluster.yaml"
    bad.write_text("cluster: x\n")
    result = runner.invoke(app, ["infra", "preview", "-f", str(bad), "--stack", "aws"])
    assert result.exit_code == 2
    assert "required field is missing" in result.output
