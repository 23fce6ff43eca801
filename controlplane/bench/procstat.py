"""CPU time and memory of processes, read from /proc (Linux): what a benchmark charges to the gateway."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included, its children not)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat, counting from 1


def total_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def kernel_cpu_seconds(pids: list[int]) -> float:
    """stime of the processes: their CPU spent in the kernel (system calls, the TCP stack)."""
    return sum(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[12]) for pid in pids) / CLOCK_TICKS


def run_queue(pids: list[int]) -> tuple[float, int]:
    """Seconds the processes' threads waited on a run queue (runnable, no core free) and how many times they were
    given a core, since they started (/proc/PID/task/TID/schedstat: run ns, wait ns, timeslices)."""
    waited, slices = 0.0, 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                _, wait_ns, count = (task / "schedstat").read_text().split()
            except (OSError, ValueError):
                continue
            waited, slices = waited + int(wait_ns) / 1e9, slices + int(count)
    return waited, slices


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of one process, by thread id (threads that end meanwhile are skipped)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return found


def busiest_threads(before: dict[int, float], after: dict[int, float], seconds: float, count: int = 4
                    ) -> list[float]:
    """The `count` highest per-thread CPU uses (cores) between two `thread_cpu_seconds` readings: one thread
    near 1.0 is a single-threaded bottleneck that the process's total hides."""
    used = sorted((after[tid] - before.get(tid, 0.0) for tid in after), reverse=True)
    return [round(cpu / seconds, 2) for cpu in used[:count]]


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of one process, MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields.get("VmRSS", 0.0), "peak_rss_mb": fields.get("VmHWM", 0.0)}


def gateway_pids(state: dict) -> list[int]:
    """The processes serving the gateway, from a stack's state.json: its `workers` (a list of PIDs, or of
    objects with a `pid`); the stack's own `pid` when it lists none (it then serves itself). The supervising
    `cpctl` process, which owns the shards and serves nothing, is not counted."""
    pids = []
    for worker in state.get("workers") or []:
        pid = int(worker["pid"] if isinstance(worker, dict) else worker)
        if pid not in pids:
            pids.append(pid)
    return pids or [int(state["pid"])]
