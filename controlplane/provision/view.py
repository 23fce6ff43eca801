"""The live Rich view of a provisioning run (one row per host: its current task and counts) and the summary.

It is fed ansible-runner events. On a terminal it redraws in place; elsewhere (CI logs) it prints a line
per failure as it happens and the summary at the end.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from controlplane.provision.runner import RunResult

STATUS_STYLE = {"ok": "green", "changed": "yellow", "failed": "red", "unreachable": "red", "running": "cyan"}


@dataclass
class HostRow:
    task: str = ""
    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0
    unreachable: bool = False


class LiveView:
    """Per host: the task it is on and what happened so far. Thread-safe: events arrive on runner threads."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.rows: dict[str, HostRow] = {}
        self.play = ""
        self.lock = threading.Lock()
        self.live = Live(self.render(), console=console, refresh_per_second=4, transient=True,
                         auto_refresh=console.is_terminal)

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.console.is_terminal:
            self.live.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        with self.lock:
            if kind == "playbook_on_play_start":
                self.play = data.get("play", "")
            host = data.get("host")
            if not host:
                return
            row = self.rows.setdefault(host, HostRow())
            if kind == "runner_on_start":
                row.task = data.get("task", "")
            elif kind == "runner_on_ok":
                row.ok += 1
                row.changed += bool((data.get("res") or {}).get("changed"))
            elif kind == "runner_on_skipped":
                row.skipped += 1
            elif kind == "runner_on_failed" and not data.get("ignore_errors"):
                row.failed += 1
                self._say(f"[red]failed[/red] {host}: {data.get('task', '')}")
            elif kind == "runner_on_unreachable":
                row.unreachable = True
                self._say(f"[red]unreachable[/red] {host}: {(data.get('res') or {}).get('msg', '')}")
        if self.console.is_terminal:
            self.live.update(self.render())

    def _say(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def render(self) -> Group:
        table = Table(title=f"{self.title}  [dim]{self.play}[/dim]", expand=False)
        for column in ("host", "task", "ok", "changed", "failed", "skipped"):
            table.add_column(column, justify="right" if column in ("ok", "changed", "failed", "skipped") else "left")
        for host, row in sorted(self.rows.items()):
            state = "unreachable" if row.unreachable else "failed" if row.failed else "running"
            table.add_row(Text(host, style=STATUS_STYLE[state]), row.task, str(row.ok), str(row.changed),
                          str(row.failed), str(row.skipped))
        return Group(table)


def summary_table(result: RunResult, title: str) -> Table:
    """The play recap as a table: ok / changed / failed / unreachable / skipped per host."""
    table = Table(title=title)
    for column in ("host", "status", "ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(column, justify="left" if column in ("host", "status") else "right")
    for host, stats in sorted(result.hosts.items()):
        style = STATUS_STYLE[stats.status]
        table.add_row(host, f"[{style}]{stats.status}[/{style}]", str(stats.ok), str(stats.changed),
                      str(stats.failed), str(stats.unreachable), str(stats.skipped))
    return table
