"""Python CPU of one proxied inference request, in process: the gateway's real request path (server, screen,
exchange, scheduler, router, upstream parser, relay, metrics) driven through in-memory transports, so no
syscall and no other process is measured. Repeatable where socket benchmarks are noisy; use it to compare
changes of the request path (run it before and after, alternating). `--refused`: a request refused at
admission instead (its tenant is over its rate: 429 right after the headers). The driver sends one request a turn
of the loop, so the writes held to the end of a turn (`gateway.concurrency.coalesce_writes`, upstream.Outbox) cost
a scheduled callback each here, which real traffic shares among the requests of a turn: in process 15-19 -> 17 us
proxied and 2.9-3.6 -> 6.9 us refused (2026-12-01), while on sockets both fell (gateway-limits-2026-12-01-run2.md).

    .venv/bin/python bench/request_cost.py [REQUESTS] [--refused]
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.gateway.app import GatewayApp  # noqa: E402
from controlplane.gateway.inference import ModelSignature, TensorSpec  # noqa: E402
from controlplane.gateway.routing import Router  # noqa: E402
from controlplane.gateway.server import ClientConnection, GatewayServer  # noqa: E402
from controlplane.gateway.upstream import UpstreamConnection  # noqa: E402
from controlplane.shards.base import Endpoint  # noqa: E402
from controlplane.spec import load_spec  # noqa: E402

SPEC = Path(__file__).resolve().parent / "overload.yaml"
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
                   "parameters": {"work_ms": 0}}).encode()
REQUEST = (b"POST /v2/models/work/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s")
API_KEYS = {False: b"cp-bench-key", True: b"cp-bench-refused-key"}  # the `refused` tenant: 1 request/s
ANSWER = b'{"model_name":"work","outputs":[{"name":"y","datatype":"FP32","shape":[1,4],"data":[1.0,2.0,3.0,4.0]}]}'
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)


class MemoryTransport:
    """What a protocol writes goes to `on_write`; nothing touches a socket."""

    def __init__(self, on_write) -> None:  # noqa: ANN001
        self.on_write = on_write

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.on_write(b"".join(parts))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def measure(requests: int, refused: bool = False) -> float:
    loop = asyncio.get_running_loop()
    spec = load_spec(SPEC)
    router = Router(spec.gateway.concurrency, spec.gateway.ejection)
    router.update([Endpoint("shard-0", "127.0.0.1", 1, frozenset({"work"}))])
    app = GatewayApp(spec, router)
    app.signatures["work"] = ModelSignature({"x": TensorSpec("x", "FP32", (-1, -1))}, frozenset({"y"}),
                                            batching=True, priority_levels=3, timeout_override=True)
    server = GatewayServer(app, spec.gateway.limits)
    server.loop = loop
    app.serve_on(server)
    target = next(iter(router.targets.values()))
    for _ in range(4):  # the "shard" answers every request on the next turn of the loop
        upstream = UpstreamConnection(target.pool)
        upstream.connection_made(MemoryTransport(lambda data, up=upstream: loop.call_soon(up.data_received,
                                                                                           RESPONSE)))
        target.pool.idle.append(upstream)
    answered: list[asyncio.Future[bytes]] = []
    client = ClientConnection(server)
    client.connection_made(MemoryTransport(lambda data: answered[-1].done() or answered[-1].set_result(data)))

    request = REQUEST % (API_KEYS[refused], len(BODY), BODY)

    async def one() -> bytes:
        answer = loop.create_future()
        answered.append(answer)
        client.data_received(request)
        await answer
        answered.pop()
        return answer.result()

    if refused:
        await one()  # the tenant's one token
    status = b"HTTP/1.1 429" if refused else b"HTTP/1.1 200"
    assert (await one()).startswith(status), f"the request path did not answer {status.decode()}"
    for _ in range(2000):
        await one()
    gc.collect()
    gc.freeze()
    started = time.process_time()
    for _ in range(requests):
        await one()
    return (time.process_time() - started) / requests


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--refused"]
    refused = "--refused" in sys.argv[1:]
    count = int(arguments[0]) if arguments else 20000
    print(f"{uvloop.run(measure(count, refused)) * 1e6:.1f} us of Python per "
          f"{'refused (429)' if refused else 'proxied'} request (in process, no syscalls; includes this driver's "
          f"future and loop turn per request)")
