"""Opt-in diagnostics of the large-body path (issue 11), read once from the environment; nothing runs when unset.

- `CPCTL_GATEWAY_TIMELINE=DIR`: each worker appends one JSON line per inference request of 1 MiB or more to
  `DIR/timeline-<pid>.jsonl`: when it was handed over (headers and JSON inference header in), dispatched
  (slot taken), sent (upstream connection in hand, first body byte written), when its last body byte left for
  the shard, the shard's response head and end, how often and how long its client was paused by the shard's
  back-pressure, the bytes that had arrived before dispatch, the shard's in-flight count and room at dispatch,
  the socket buffer sizes. `timeline_summary` reads them back (bench/diagnose/large_body.py, bench/gpu.py).
- Knobs that the same diagnostic varies, to test a cause (each off unless set, in bytes):
  `CPCTL_UPSTREAM_WRITE_HIGH` (the write high-water mark of upstream connections: a streamed body pauses its
  client above it; asyncio's default is 64 KiB), `CPCTL_UPSTREAM_SNDBUF` (SO_SNDBUF of upstream sockets),
  `CPCTL_CLIENT_RCVBUF` (SO_RCVBUF of client sockets), `CPCTL_STREAM_BODY_BYTES` (bodies this large are
  forwarded while they arrive; a huge value turns it off: store and forward), `CPCTL_UPSTREAM_CONNECT_BURST`
  (upstream connections opened at once, default 8; 1: one at a time).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson


def _int_setting(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


UPSTREAM_WRITE_HIGH = _int_setting("CPCTL_UPSTREAM_WRITE_HIGH")
UPSTREAM_SNDBUF = _int_setting("CPCTL_UPSTREAM_SNDBUF")
CLIENT_RCVBUF = _int_setting("CPCTL_CLIENT_RCVBUF")
STREAM_BODY_BYTES = _int_setting("CPCTL_STREAM_BODY_BYTES")
# upstream connections opened at once when a pool has none idle (upstream.UpstreamPool.open_spread); 1: one
CONNECT_BURST = _int_setting("CPCTL_UPSTREAM_CONNECT_BURST") or 8
TIMELINE_DIR = os.environ.get("CPCTL_GATEWAY_TIMELINE", "")
TRACED_BYTES = 1 << 20  # only large bodies are traced


def socket_buffers(transport: Any) -> tuple[int, int]:
    """(SO_SNDBUF, SO_RCVBUF) of a transport's socket, (0, 0) without one."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0, 0
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


class Timeline:
    """One traced request's moments (seconds, monotonic) and counts; written as one line when it ends."""

    _file: Any = None

    def __init__(self, connection_id: int, client_transport: Any) -> None:
        self.record: dict[str, Any] = {"pid": os.getpid(), "conn": connection_id, "handed": time.monotonic(),
                                       "pauses": 0, "paused_s": 0.0,
                                       "client_bufs": socket_buffers(client_transport)}
        self._paused_at = 0.0

    def mark(self, moment: str, **counts: Any) -> None:
        self.record[moment] = time.monotonic()
        self.record.update(counts)

    def paused(self, writable: bool) -> None:
        """The shard's back-pressure paused (False) or resumed (True) the client's reading."""
        now = time.monotonic()
        if not writable:
            self.record["pauses"] += 1
            self._paused_at = now
        elif self._paused_at:
            self.record["paused_s"] += now - self._paused_at
            self._paused_at = 0.0

    def write(self, status: int) -> None:
        self.record["status"] = status
        if Timeline._file is None:
            directory = Path(TIMELINE_DIR)
            directory.mkdir(parents=True, exist_ok=True)
            Timeline._file = (directory / f"timeline-{os.getpid()}.jsonl").open("ab", buffering=0)
        Timeline._file.write(orjson.dumps(self.record) + b"\n")


PHASES = (("waited", "handed", "dispatched"),  # in the gateway's queue: no slot yet
          ("connect", "dispatched", "sent"),  # slot taken -> upstream connection in hand, first byte written
          ("upload", "sent", "body_out"),  # -> last body byte handed to the upstream transport
          ("shard", "body_out", "head"),  # -> the shard's response head (Triton: its queue and the model)
          ("relay", "head", "end"),
          ("total", "handed", "end"))


def timeline_summary(directory: Path, window: tuple[float, float]) -> dict:
    """The gateway's timeline records (diagnostics.Timeline) of requests handed over within `window`: per phase
    the median and P90 (ms), back-pressure pauses, bytes in before dispatch, room at dispatch, and how the
    requests and client connections spread over the workers (SO_REUSEPORT)."""
    records = []
    for path in directory.glob("timeline-*.jsonl"):
        for line in path.read_text().splitlines():
            record = orjson.loads(line)
            if window[0] <= record["handed"] <= window[1] and record.get("status") == 200:
                records.append(record)
    if not records:
        return {"records": 0}

    def spread(values: list[float], scale: float = 1e3) -> list[float]:
        values = sorted(values)
        return [round(values[len(values) // 2] * scale, 2), round(values[int(len(values) * 0.9)] * scale, 2)]

    summary: dict = {"records": len(records)}
    for name, first, last in PHASES:
        values = [r[last] - r[first] for r in records if first in r and last in r]
        if values:
            summary[f"{name}_ms"] = spread(values)
    for name in ("pauses", "paused_s", "arrived_before", "unsent", "in_flight", "room"):
        values = [r[name] for r in records if name in r]
        if values:
            summary[name] = spread(values, 1e3 if name == "paused_s" else 1)
    workers: dict[int, set] = {}
    for record in records:
        workers.setdefault(record["pid"], set()).add(record["conn"])
    summary["requests_per_worker"] = sorted((sum(r["pid"] == pid for r in records) for pid in workers), reverse=True)
    summary["connections_per_worker"] = sorted((len(c) for c in workers.values()), reverse=True)
    summary["socket_buffers"] = {"client (snd, rcv)": records[0]["client_bufs"],
                                 "upstream (snd, rcv)": records[0].get("upstream_bufs")}
    return summary
