"""The Dockerfiles of images/: everything they copy exists, and they agree with the Pulumi program."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from controlplane.shards import manifests
from controlplane.spec import load_spec
from infra import workloads

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    args: dict[str, str] = {}
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), rest)
        if word.upper() == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        out.append((word.upper(), rest.strip()))
    return out


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for word, rest in instructions(dockerfile):
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            if "--from=" not in rest:
                sources += parts[:-1]
    return sources


@pytest.mark.parametrize("name", ["Dockerfile.shard", "Dockerfile.controlplane"])
def test_everything_copied_exists_in_the_build_context(name: str) -> None:
    sources = copy_sources(IMAGES / name)
    assert sources, f"{name} copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the project root"


@pytest.mark.parametrize("name", ["Dockerfile.shard", "Dockerfile.controlplane"])
def test_base_images_are_pinned(name: str) -> None:
    bases = [rest.split()[0] for word, rest in instructions(IMAGES / name) if word == "FROM"]
    assert bases
    for base in bases:
        assert ":" in base and not base.endswith(":latest"), f"{name}: unpinned base image {base}"


def test_shard_image_holds_every_model_the_example_specs_serve() -> None:
    (source,) = copy_sources(IMAGES / "Dockerfile.shard")
    copies = [rest for word, rest in instructions(IMAGES / "Dockerfile.shard") if word == "COPY"]
    assert copies[0].endswith(manifests.IMAGE_MODELS_DIR)  # where the pods' init container links from
    for spec_file in sorted((ROOT / "examples").glob("*/cluster.yaml")):
        spec = load_spec(spec_file)
        for model in spec.models:
            assert (ROOT / source / model.path / "config.pbtxt").is_file(), f"{spec_file}: {model.path}"


def test_shard_image_exposes_tritons_ports_and_runs_as_the_pods_uid() -> None:
    steps = instructions(IMAGES / "Dockerfile.shard")
    exposed = {int(p) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    assert exposed == {manifests.TRITON_HTTP_PORT, manifests.TRITON_GRPC_PORT, manifests.TRITON_METRICS_PORT}
    assert [rest for word, rest in steps if word == "USER"] == [str(manifests.TRITON_UID)]
    assert "tritonserver" in next(rest for word, rest in steps if word == "FROM")


def test_shard_image_pins_numpy_as_the_project_does() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    numpy = next(d.split("#")[0].strip() for d in project["dependencies"] if d.startswith("numpy"))
    assert numpy in (IMAGES / "Dockerfile.shard").read_text()


def test_controlplane_image_runs_cpctl_as_the_gateway_pods_uid() -> None:
    steps = instructions(IMAGES / "Dockerfile.controlplane")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "cpctl" in project["scripts"]
    assert [rest for word, rest in steps if word == "ENTRYPOINT"] == ['["cpctl"]']
    assert [rest for word, rest in steps if word == "USER"] == [str(workloads.CONTROLPLANE_UID)]
    assert f"--uid {workloads.CONTROLPLANE_UID}" in next(rest for word, rest in steps if "useradd" in rest)
    # The image's Python is the one the project supports.
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert bases and all(base.startswith("python:3.11") for base in bases)
