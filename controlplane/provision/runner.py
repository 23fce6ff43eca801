"""Run playbooks/site.yml through ansible-runner and turn its event stream into per-host results.

Each run gets a fresh private data directory: ansible-runner stores the command line (`--check`) and
extra variables there and silently reuses them on the next run that shares the directory.

The playbook runs with this Python environment's `ansible-playbook` (first on PATH) and playbooks/ansible.cfg:
the mig role's action plugin imports controlplane on the controller to validate layouts.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.resources import project_file

EventHandler = Callable[[dict[str, Any]], None]


@dataclass
class HostStats:
    """What happened on one host, as Ansible's play recap counts it."""

    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0

    @property
    def status(self) -> str:
        if self.unreachable:
            return "unreachable"
        if self.failed:
            return "failed"
        return "changed" if self.changed else "ok"


@dataclass
class Failure:
    host: str
    task: str
    message: str
    unreachable: bool = False


@dataclass
class RunResult:
    """The outcome of one playbook run."""

    status: str  # ansible-runner's: successful, failed, timeout, canceled
    rc: int
    hosts: dict[str, HostStats] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    # The end of ansible-playbook's own output when the run failed without a task failing (a syntax error,
    # a bad inventory): the only place that says why.
    output_tail: str = ""

    @property
    def succeeded(self) -> bool:
        return self.rc == 0 and all(not s.failed and not s.unreachable for s in self.hosts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "rc": self.rc, "succeeded": self.succeeded,
            "hosts": {h: {**vars(s), "status": s.status} for h, s in sorted(self.hosts.items())},
            "failures": [vars(f) for f in self.failures],
            "output_tail": self.output_tail,
        }


def failure_message(result: dict[str, Any]) -> str:
    """The most useful line of a failed task's result: its msg, else stderr, else stdout."""
    message = str(result.get("msg") or "").strip()
    for stream in ("stderr", "stdout"):
        text = str(result.get(stream) or "").strip()
        if text and text not in message:
            message = f"{message}: {text}" if message else text
    if not message and result.get("results"):  # a loop: the first failed item's message
        failed = [r for r in result["results"] if isinstance(r, dict) and r.get("failed")]
        if failed:
            message = failure_message(failed[0])
    return " ".join(message.split())[:1000] or "failed (no message)"


class EventCollector:
    """Turns ansible-runner events into HostStats and Failures, and forwards them to a view."""

    def __init__(self, forward: EventHandler | None = None) -> None:
        self.forward = forward
        self.hosts: dict[str, HostStats] = {}
        self.failures: list[Failure] = []
        self.recap: dict[str, Any] | None = None

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host")
        if host and kind.startswith("runner_on_"):
            stats = self.hosts.setdefault(host, HostStats())
            result = data.get("res") or {}
            if kind == "runner_on_failed" and not data.get("ignore_errors"):
                self.failures.append(Failure(host, data.get("task", ""), failure_message(result)))
            elif kind == "runner_on_unreachable":
                stats.unreachable += 1
                self.failures.append(Failure(host, data.get("task", ""), failure_message(result), True))
        if kind == "playbook_on_stats":
            self.recap = data
        if self.forward is not None:
            self.forward(event)
        return True  # keep the event in the artifacts

    def final_stats(self) -> dict[str, HostStats]:
        """Per-host counts from the play recap (authoritative), for every host that took part."""
        if self.recap is None:
            return self.hosts
        keys = {"ok": "ok", "changed": "changed", "failed": "failures", "unreachable": "dark",
                "skipped": "skipped", "rescued": "rescued", "ignored": "ignored"}
        names = set(self.hosts)
        for source in keys.values():
            names |= set(self.recap.get(source) or {})
        return {name: HostStats(**{k: int((self.recap.get(src) or {}).get(name, 0)) for k, src in keys.items()})
                for name in sorted(names)}


def run_site(
    inventory: Path,
    *,
    check: bool = False,
    diff: bool = False,
    limit: str | None = None,
    tags: str | None = None,
    extravars: dict[str, Any] | None = None,
    on_event: EventHandler | None = None,
    playbook: Path | None = None,
) -> RunResult:
    """Run `playbook` (default: the project's playbooks/site.yml) on `inventory` (a file or a folder) in a
    fresh private data directory. ResourceMissing when this installation has no playbooks."""
    import ansible_runner

    playbook = playbook or project_file("playbooks/site.yml")

    cmdline = " ".join(flag for flag, wanted in (("--check", check), ("--diff", diff)) if wanted)
    venv_bin = str(Path(sys.executable).parent)
    envvars = {
        "ANSIBLE_CONFIG": str(playbook.parent / "ansible.cfg"),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
    }
    collector = EventCollector(on_event)
    with tempfile.TemporaryDirectory(prefix="cpctl-provision-") as private_dir:
        runner = ansible_runner.run(
            private_data_dir=private_dir,
            project_dir=str(playbook.parent),
            playbook=str(playbook),
            inventory=str(inventory.resolve()),
            limit=limit,
            tags=tags,
            cmdline=cmdline or None,
            extravars=extravars or None,
            envvars=envvars,
            event_handler=collector,
            quiet=True,
        )
        status, rc = runner.status, int(runner.rc if runner.rc is not None else 1)
        tail = ""
        if rc != 0 and not collector.failures:
            tail = "\n".join(runner.stdout.read().strip().splitlines()[-15:])
    return RunResult(status, rc, collector.final_stats(), collector.failures, tail)
