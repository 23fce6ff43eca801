"""The Ansible content passes ansible-lint's production profile offline, and every role is documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from controlplane.provision.inventory import HOST_VARIABLES, POOL_VARIABLES

PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"
ROLES = ["preflight", "nvidia_driver", "cuda_toolkit", "container_toolkit", "rdma", "mig", "verify", "k8s_node"]


def test_ansible_lint_production_profile_passes_offline() -> None:
    lint = Path(sys.executable).parent / "ansible-lint"
    result = subprocess.run([str(lint), "--offline", "--profile", "production", "--nocolor", str(PLAYBOOKS)],
                            capture_output=True, text=True, timeout=300, cwd=PLAYBOOKS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_every_role_has_defaults_tasks_handlers_argument_specs_and_a_readme() -> None:
    for role in ROLES:
        folder = PLAYBOOKS / "roles" / role
        for part in ("defaults/main.yml", "tasks/main.yml", "handlers/main.yml", "meta/main.yml",
                     "meta/argument_specs.yml", "README.md"):
            assert (folder / part).is_file(), f"{role}: {part} is missing"
        defaults = yaml.safe_load((folder / "defaults/main.yml").read_text()) or {}
        specs = yaml.safe_load((folder / "meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
        readme = (folder / "README.md").read_text()
        assert set(defaults) <= set(specs), f"{role}: defaults without an argument spec: {set(defaults) - set(specs)}"
        for name in specs:
            # The inventory's own variables are shared by the roles that read them.
            assert name.startswith(f"{role}_") or name in POOL_VARIABLES + HOST_VARIABLES, (
                f"{role}: variable {name} lacks the role prefix")
            assert f"`{name}`" in readme, f"{role}: README does not document {name}"
        commented = (folder / "defaults/main.yml").read_text().count("\n#")
        assert commented >= len(defaults) // 2, f"{role}: defaults/main.yml needs a comment per variable"
