"""Build step that pyproject.toml cannot say: a wheel carries the project's non-Python files (playbooks, the
Pulumi program, the bench suite's spec, the examples) inside the package, in controlplane/_project/, so an
installed `cpctl` finds them (controlplane/resources.py). Editable installs use the checkout's own files."""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")


def project_files() -> tuple[str, ...]:
    """controlplane.resources.PROJECT_FILES, loaded alone: the package's dependencies may be missing while
    it builds (resources.py needs only pathlib)."""
    spec = importlib.util.spec_from_file_location("resources", HERE / "controlplane" / "resources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PROJECT_FILES


class BuildPyWithProjectFiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "controlplane" / "_project"
        shutil.rmtree(target, ignore_errors=True)
        for relative in project_files():
            source, destination = HERE / relative, target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, destination, ignore=SKIPPED)
            else:
                shutil.copy2(source, destination)


setup(cmdclass={"build_py": BuildPyWithProjectFiles})
