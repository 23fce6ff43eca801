"""The project's files that are not Python modules, found explicitly: the Ansible playbooks, the Pulumi
program (with Pulumi.yaml and its stack files), the bench suite's spec and the example specs and models.

A wheel carries them inside the package, in controlplane/_project/ (setup.py copies them there when it
builds); a checkout (an editable install, `python -m controlplane.cli` from the repository) has them at its
top. Either way the layout is the checkout's, so relative paths between them (bench/overload.yaml ->
../examples/models) hold. Anything else is an error that names what is missing and where it was looked for.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
BUNDLED = PACKAGE / "_project"
CHECKOUT = PACKAGE.parent
# What a wheel carries (setup.py reads this list): folders and files, relative to the checkout's top.
PROJECT_FILES = ("playbooks", "infra", "Pulumi.yaml", "bench/overload.yaml", "examples")


class ResourceMissing(RuntimeError):
    """A project file this installation does not have; the message says which and where it looked."""


def project_root() -> Path:
    """The folder holding the project's files: the wheel's bundled copy, else the checkout."""
    if BUNDLED.is_dir():
        return BUNDLED
    if (CHECKOUT / "pyproject.toml").is_file():
        return CHECKOUT
    raise ResourceMissing(f"the project's files are missing: neither {BUNDLED} (a wheel built from the project) "
                          f"nor a checkout at {CHECKOUT}; reinstall controlplane from its wheel or a checkout")


def project_file(relative: str) -> Path:
    """A project file or folder (e.g. "playbooks/site.yml"), or ResourceMissing naming it."""
    root = project_root()
    path = root / relative
    if not path.exists():
        raise ResourceMissing(f"{relative} is missing from {root}: this installation of controlplane lacks it "
                              "(reinstall from the project's wheel or a checkout)")
    return path
