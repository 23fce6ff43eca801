"""The local run state of `cpctl up`: its run directory (shard and gateway-worker logs, the model repository
link), `state.json` (where everything runs, for `cpctl status` and `cpctl infer`) and the pids in it.

Only `cpctl up` writes here and only `up`, `status` and `infer` read it. The runtime that serves
(controlplane/stack.py and controlplane/gateway/) writes nothing, so the in-cluster gateway needs no disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from controlplane.spec import ClusterSpec


class StackAlreadyRunning(RuntimeError):
    pass


def run_dir_for(spec: ClusterSpec) -> Path:
    """Where a cluster's logs and state live: $CPCTL_RUN_DIR/<cluster>, by default under the temp dir."""
    base = os.environ.get("CPCTL_RUN_DIR") or Path(tempfile.gettempdir()) / f"cpctl-{os.getuid()}"
    return Path(base) / spec.cluster


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def read_state(run_dir: Path) -> dict | None:
    """The state a running `cpctl up` wrote, or None when none runs for this run dir."""
    try:
        state = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and pid_alive(state.get("pid")) else None


class RunState:
    """The run directory of one `cpctl up`: claimed at start, `state.json` rewritten as things change, removed
    at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.path = run_dir / "state.json"

    def claim(self, cluster: str) -> None:
        if read_state(self.run_dir) is not None:
            raise StackAlreadyRunning(
                f"a stack for cluster '{cluster}' already runs (state in {self.run_dir}); stop it first")
        self.logs.mkdir(parents=True, exist_ok=True)

    def write(self, snapshot: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot, indent=1))
        tmp.replace(self.path)  # readers never see a half-written file

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
