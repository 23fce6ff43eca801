"""wrk as a closed-loop load source: peak throughput, floods that ignore Retry-After, statuses per code.

wrk runs one Lua state per thread; the script below counts responses per status in each thread
(`response()`), and `done()` sums the threads' counts and prints them, so a flood's 200/429/5xx are known.
Every run is bounded in time (`-d`) and waited for with a timeout.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

MAX_SECONDS = 600

COUNTING_LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("counts")) do total[code] = (total[code] or 0) + n end
  end
  for code, n in pairs(total) do io.write(string.format("STATUS %d %d\\n", code, n)) end
  local e = summary.errors
  io.write(string.format("SOCKET_ERRORS %d %d %d %d\\n", e.connect, e.read, e.write, e.timeout))
end
"""


def script(path: Path, body: bytes | str, headers: dict[str, str], count_statuses: bool) -> Path:
    """A wrk Lua script POSTing `body` with `headers` (and counting statuses when asked)."""
    text = body.decode() if isinstance(body, bytes) else body
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(text)}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n" + (COUNTING_LUA if count_statuses else ""))
    return path


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    non_2xx: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    socket_errors: dict[str, int] = field(default_factory=dict)

    def add(self, other: WrkResult) -> None:
        self.requests += other.requests
        self.seconds = max(self.seconds, other.seconds)
        self.rps += other.rps
        self.non_2xx += other.non_2xx
        for code, n in other.statuses.items():
            self.statuses[code] = self.statuses.get(code, 0) + n
        for kind, n in other.socket_errors.items():
            self.socket_errors[kind] = self.socket_errors.get(kind, 0) + n

    def as_dict(self) -> dict:
        return {"requests": self.requests, "seconds": round(self.seconds, 3), "rps": round(self.rps, 1),
                "non_2xx": self.non_2xx, "statuses": dict(sorted(self.statuses.items())),
                "socket_errors": self.socket_errors}


def parse(output: str) -> WrkResult:
    result = WrkResult()
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", output):
        result.requests = int(m.group(1))
        result.seconds = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    if m := re.search(r"Requests/sec:\s+([\d.]+)", output):
        result.rps = float(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        result.non_2xx = int(m.group(1))
    result.statuses = {code: int(n) for code, n in re.findall(r"^STATUS (\d+) (\d+)$", output, re.M)}
    m = re.search(r"^SOCKET_ERRORS (\d+) (\d+) (\d+) (\d+)$", output, re.M)  # the counting script's
    m = m or re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)  # wrk's
    if m:
        result.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    return result


class WrkRun:
    """wrk against every URL at once (Triton direct: one wrk per shard), connections split between them."""

    def __init__(self, urls: list[str], path: str, lua: Path, seconds: float, connections: int,
                 threads: int = 1, timeout_s: float = 2.0) -> None:
        if shutil.which("wrk") is None:
            raise RuntimeError("wrk is needed: apt-get install wrk (make test installs it as root)")
        seconds = max(1, min(MAX_SECONDS, round(seconds)))
        per_url = max(1, connections // len(urls))
        per_threads = max(1, min(per_url, threads // len(urls) or 1))
        self.seconds = seconds
        self.procs = [subprocess.Popen(
            ["wrk", f"-t{per_threads}", f"-c{per_url}", f"-d{seconds}s", f"--timeout={timeout_s:g}s", "-s", str(lua),
             f"{url}{path}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for url in urls]

    def wait(self) -> WrkResult:
        total = WrkResult()
        for proc in self.procs:
            try:
                output = proc.communicate(timeout=self.seconds + 30)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                output = proc.communicate()[0]
            if proc.returncode != 0 and "requests in" not in output:
                raise RuntimeError(f"wrk failed: {output[-500:]}")
            total.add(parse(output))
        return total

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
