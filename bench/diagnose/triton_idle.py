"""How long a Triton shard takes to answer the first request after it was idle (issue 10's stall suspect).

Starts the bench stack, sends one 0 ms `work` request on a keep-alive connection to a shard, then one more
after 5, 12 and 20 s of idleness, and prints each latency. Seen on 2026-11-30: 57-202 ms each (the connection
stays open), where the suite's critical traffic sees 1-3 ms P50 on a busy shard.

    .venv/bin/python bench/diagnose/triton_idle.py
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

from controlplane.bench.suite import Setups, work_body


def main() -> None:
    setups = Setups(Path(tempfile.mkdtemp(prefix="triton-idle-")))
    try:
        setups.wait_all_ready()
        host, port = setups.urls["direct"][0].removeprefix("http://").split(":")
        body = json.dumps(work_body({"work_ms": 0})).encode()
        request = (f"POST /v2/models/work/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            for idle_s in (0, 5, 12, 20):
                time.sleep(idle_s)
                started = time.monotonic()
                conn.sendall(request)
                status_line = conn.recv(4096).split(b"\r\n", 1)[0].decode()
                print(f"after {idle_s:2d} s idle: {status_line!r} in {1000 * (time.monotonic() - started):.1f} ms",
                      flush=True)
    finally:
        setups.close()


if __name__ == "__main__":
    main()
