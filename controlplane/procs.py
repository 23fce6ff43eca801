"""The one way this project starts external processes (tritonserver, nginx, sshd): tracked by PID.

Each process starts in a new session, so it leads its own process group; everything it forks (Triton's
Python-backend stubs, nginx workers) stays in that group. Stopping sends SIGTERM to the group, waits,
then SIGKILLs the group: nothing is left behind, and nothing is ever killed by name. A process also gets
SIGTERM from the kernel if the thread that started it dies (PR_SET_PDEATHSIG), so a crashed `cpctl`
does not leave servers running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """A started process and its process group."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 cwd: Path | None = None, pass_fds: Sequence[int] = (), inherit_output: bool = False) -> None:
        """Output goes to `log_path`, else to this process's own stdout/stderr with `inherit_output` (a
        container's log), else nowhere. `pass_fds` stay open in the child under the same numbers."""
        self.argv = list(argv)
        quiet = None if inherit_output else subprocess.DEVNULL
        log = open(log_path, "ab") if log_path else quiet  # noqa: SIM115 - closed below
        try:
            self.popen = subprocess.Popen(
                self.argv, env=dict(env) if env is not None else None, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT if log is not None else None, start_new_session=True,
                preexec_fn=_die_with_parent, pass_fds=tuple(pass_fds),
            )
        finally:
            if log_path:
                log.close()
        self.pid = self.popen.pid
        self.pgid = self.pid  # a session leader's group id is its own PID
        self.log_path = log_path

    def poll(self) -> int | None:
        """The exit code, or None while the leader runs."""
        return self.popen.poll()

    def group_alive(self) -> bool:
        """Whether any process of the group (the leader or what it forked) still exists."""
        self.popen.poll()  # reap the leader if it exited
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        # Zombies still answer signals; orphans reparented to a PID 1 that does not reap stay zombies.
        return bool(group_members(self.pgid))

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the group, wait up to grace_s for all of it to exit, then SIGKILL what is left."""
        if self.group_alive():
            self.signal_group(signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
            self.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group and reap the leader."""
        self.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=1.0)

    def log_tail(self, max_bytes: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-max_bytes:]
        return data.decode(errors="replace")


def group_members(pgid: int) -> list[int]:
    """PIDs of the live processes in a process group (read from /proc)."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


def children(pid: int) -> list[int]:
    """PIDs of the live processes whose parent is `pid` (read from /proc)."""
    return [child for child, fields in _live_processes() if int(fields[1]) == pid]


def _live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, its /proc stat fields after the command: state, ppid, pgrp, ...) of each process that has not exited
    (a zombie, state 'Z', has)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry.name), fields


def free_port() -> int:
    """A loopback port free now, for a process about to be started to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
