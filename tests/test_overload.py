"""The gateway's protection of itself (controlplane/gateway/overload.py).

The controller is tested with an injected clock against a real GatewayServer's connection bookkeeping; the
actions are tested end to end on a real gateway in front of real Triton shards, with the memory monitor's
saturation point set below what any Python process uses, so the gateway is overloaded from its first refresh
and every outcome is deterministic.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import uvloop

from controlplane.gateway.overload import LAG_PROBE_S, UNLIMITED, OverloadManager, thread_times
from controlplane.gateway.server import ClientConnection, GatewayServer
from controlplane.spec import GatewayLimits, Overload, PriorityClass, hash_api_key

from .conftest import ROOT, ManualClock, RunningStack, stack_of

CLASSES = [PriorityClass(name="critical", level=300, default_deadline_ms=250, share=0.5),
           PriorityClass(name="standard", level=200, default_deadline_ms=1000, share=0.3),
           PriorityClass(name="sheddable", level=100, default_deadline_ms=2000, share=0.2)]
CRITICAL, STANDARD, SHEDDABLE = CLASSES
# a client connection the manager has no record of (a real one: the compiled manager checks the type)
CONN = ClientConnection(GatewayServer(lambda request, conn: None, GatewayLimits()))


def manager(**config) -> tuple[OverloadManager, ManualClock]:
    clock = ManualClock()
    server = GatewayServer(lambda request, conn: None, GatewayLimits(max_connections=100))
    return OverloadManager(Overload(**config), CLASSES, server, clock), clock


def refresh(overload: OverloadManager, clock: ManualClock, lag_ms: float, seconds: float = 0.25,
            cpu: float = 0.5, waited: float = 0.0) -> None:
    """One refresh window with probes `lag_ms` late, the loop's thread running `cpu` of it and waiting `waited` of
    it for a core."""
    clock.now += seconds
    overload.now = clock.now
    overload.lags_s = [lag_ms / 1000] * 5
    overload._refresh(clock.now, seconds, cpu * seconds, waited * seconds)


def test_nothing_is_refused_without_a_higher_class_to_protect() -> None:
    overload, clock = manager(lag_saturated_ms=5)
    refresh(overload, clock, lag_ms=10)  # saturated: level 2
    assert overload.level == 2
    assert not overload.refuses(CONN, SHEDDABLE)  # only sheddable traffic: shedding it would protect nobody
    overload.refuses(CONN, CRITICAL)  # a critical request arrives...
    assert overload.refuses(CONN, SHEDDABLE) and overload.refuses(CONN, STANDARD)  # ...now the lower classes make way
    assert not overload.refuses(CONN, CRITICAL)  # the highest class is never refused here


def test_levels_climb_at_once_and_step_down_after_the_cool_down() -> None:
    overload, clock = manager(lag_saturated_ms=5, shed_lowest_at=0.8, shed_all_but_top_at=0.95, hysteresis=0.1,
                              cool_down_s=1.0)
    overload.refuses(CONN, CRITICAL)
    refresh(overload, clock, lag_ms=4.2)  # pressure 0.84
    assert (overload.level, overload.refused_below) == (1, STANDARD.level)
    assert overload.refuses(CONN, SHEDDABLE) and not overload.refuses(CONN, STANDARD)
    refresh(overload, clock, lag_ms=3.8)  # 0.76: under the threshold but within the hysteresis: stays
    assert overload.level == 1
    for _ in range(3):
        refresh(overload, clock, lag_ms=1)  # calm, but not yet for the cool-down
    assert overload.level == 1
    for _ in range(3):
        refresh(overload, clock, lag_ms=1)
    assert overload.level == 0 and not overload.refuses(CONN, SHEDDABLE)


def test_the_first_cpu_window_starts_with_the_manager_not_with_the_process() -> None:
    """A worker builds its manager, then loads its endpoints and runs a collector pass before it serves: that CPU is
    the process starting, not load (it read "cpu 1.00" and climbed a level at every gateway start)."""
    async def first_cpu_pressure() -> float:
        overload, clock = manager(lag_saturated_ms=1000)
        busy_until = time.process_time() + 0.25
        while time.process_time() < busy_until:  # the worker's own start, a quarter of a second of CPU
            pass
        clock.now += 0.25
        overload.start()
        clock.now += 0.25  # a quiet first window
        overload._probe()
        overload.stop()
        return overload.pressure["cpu"]

    assert uvloop.run(first_cpu_pressure()) < 0.2


def test_level_one_refuses_half_the_low_connections_per_refresh_and_level_two_all() -> None:
    overload, clock = manager(lag_saturated_ms=5)
    overload.refuses(CONN, CRITICAL)
    refresh(overload, clock, lag_ms=4.5)  # level 1, no low-class connection known yet: one refusal
    assert overload.hold_quota == 1
    assert overload.refuses(CONN, SHEDDABLE) and not overload.refuses(CONN, SHEDDABLE)  # quota spent: next passes
    refresh(overload, clock, lag_ms=10)
    assert overload.hold_quota == UNLIMITED


def test_every_waiting_connection_is_accepted_in_one_loop_turn() -> None:
    """Under a flood one loop turn lasts tens of milliseconds: a listener that accepts one connection a turn
    (uvloop's own server) kept new clients, critical ones among them, unaccepted and unclassified for seconds."""
    async def turns_until_all_accepted(clients: int) -> int:
        server = GatewayServer(lambda request, conn: None, GatewayLimits())
        port = await server.start("127.0.0.1", 0)
        # the kernel completes each handshake on its own: all of them now wait in the accept queue
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
        turns = 0
        while len(server.connections) < clients and turns < 10 * clients:
            await asyncio.sleep(0)
            turns += 1
        await server.stop()
        for sock in sockets:
            sock.close()
        return turns

    assert uvloop.run(turns_until_all_accepted(64)) <= 4


def test_a_late_loop_in_an_idle_process_is_not_an_overload() -> None:
    """On shared cores the loop also runs late when other processes take the CPU: with the gateway itself hardly
    busy, refusing its requests would free nothing (the shard-bound mix at half load was refused so)."""
    overload, clock = manager(lag_saturated_ms=1)
    refresh(overload, clock, lag_ms=3, cpu=0.05)
    assert overload.level == 0 and overload.pressure["lag"] == 0.0
    refresh(overload, clock, lag_ms=3, cpu=0.5)  # the gateway's own work makes it late: an overload
    assert overload.level == 2
    refresh(overload, clock, lag_ms=3, cpu=0.05)  # once in one, the lag alone keeps it (holding frees the CPU)
    assert overload.level == 2


def test_a_loop_that_never_sleeps_is_saturated_though_it_waits_for_a_core() -> None:
    """On shared cores a flood kept the loop running half the time and waiting for a core the other half, its
    timers on time to the millisecond: the process's CPU alone (0.5) and the lag (0) saw nothing, and every
    critical request waited. Run and wait together are the loop's busy share; the shard-bound mix reads <= 0.57."""
    overload, clock = manager(lag_saturated_ms=1)
    overload.refuses(CONN, CRITICAL)
    refresh(overload, clock, lag_ms=0, cpu=0.4, waited=0.17)  # the busiest the mix or half load read
    assert overload.level == 0 and overload.pressure["cpu"] == pytest.approx(0.57)
    refresh(overload, clock, lag_ms=0, cpu=0.1, waited=0.85)  # hardly busy itself: the machine is, not the gateway
    assert overload.level == 0 and overload.pressure["cpu"] == pytest.approx(0.1)
    refresh(overload, clock, lag_ms=0, cpu=0.5, waited=0.47)
    assert overload.level == 2 and overload.refuses(CONN, SHEDDABLE)


def test_thread_times_read_this_threads_run_and_wait() -> None:
    ran, waited = thread_times()
    busy_until = time.thread_time() + 0.05
    while time.thread_time() < busy_until:
        pass
    ran_after, waited_after = thread_times()
    assert ran_after - ran >= 0.04 and waited_after >= waited >= 0


def test_an_idle_event_loop_reads_no_lag() -> None:
    """The lag probe reads the loop's own clock, as its timers run: an idle uvloop reads no lag, where
    time.monotonic read its timers' millisecond rounding as 0.2-0.5 ms of lag, which a tight `lag_saturated_ms`
    took for saturation (lower classes were refused at half load)."""
    async def idle_lag_pressure() -> float:
        server = GatewayServer(lambda request, conn: None, GatewayLimits())
        overload = OverloadManager(Overload(lag_saturated_ms=1.0, refresh_s=0.25), CLASSES, server)
        overload.start()
        await asyncio.sleep(0.6)  # two windows of five probes each
        overload.stop()
        return overload.pressure["lag"]

    assert uvloop.run(idle_lag_pressure()) == 0.0


def test_memory_pressure_withdraws_keep_alive_instead_of_holding() -> None:
    overload, clock = manager(max_rss_mb=1)  # any process is over 1 MB: memory pressure 1
    refresh(overload, clock, lag_ms=0)
    assert overload.level == 2 and overload.pressure["memory"] == 1.0 and overload.withdraws_keep_alive()


# --- end to end --------------------------------------------------------------------------------------------
SPEC = f"""
cluster: overload-test
model_repository: {ROOT / 'examples' / 'models'}
node_pools: [{{name: local, provider: existing, instance_type: this-machine}}]
models:
  - {{name: work, path: work, memory_mb: 32, instance_count: 1, max_batch: 64}}
shards:
  - {{name: main, models: [work], replicas: 1}}
priority_classes:
  - {{name: critical, level: 300, default_deadline_ms: 3000, share: 0.5}}
  - {{name: sheddable, level: 100, default_deadline_ms: 3000, share: 0.5}}
tenants:
  - {{name: demo, api_key_sha256: {hash_api_key('cp-demo-key')}, default_class: sheddable,
      allowed_classes: [critical], rate: 100000, burst: 100000}}
gateway:
  workers: 1  # a class is refused only where a higher one was seen: one process sees both connections
  admin_token_sha256: {hash_api_key('cp-admin-key')}
  overload: {{max_rss_mb: 1, hold_max_s: 60}}  # the held-connection tests release by hand
"""
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}],
                   "parameters": {"work_ms": 0}}).encode()


@pytest.fixture(scope="module")
def overloaded(run_dir: Path):
    with stack_of(SPEC, run_dir, "overload-test") as running:
        time.sleep(0.6)  # the first refresh (0.25 s) sees the memory pressure
        yield running


async def exchange(address: tuple[str, int], head: bytes, body: bytes = b"") -> tuple[bytes, asyncio.StreamReader,
                                                                                      asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(head + body)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in answer.lower().split(b"\r\n")
                  if line.startswith(b"content-length"))
    return answer + await asyncio.wait_for(reader.readexactly(length), 5), reader, writer


def head(priority: str, length: int) -> bytes:
    return (b"POST /v2/models/work/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cp-demo-key\r\n"
            b"x-priority: %s\r\nContent-Length: %d\r\n\r\n" % (priority.encode(), length))


def test_overloaded_gateway_serves_critical_and_refuses_the_rest_before_their_body(overloaded: RunningStack
                                                                                    ) -> None:
    host, port = overloaded.gateway.removeprefix("http://").split(":")
    address = (host, int(port))

    async def scenario():
        critical, _, writer = await exchange(address, head("critical", len(BODY)), BODY)
        writer.close()
        # A sheddable request announcing a 1 MB body is answered from its headers alone: it never sends the body.
        refused, reader, writer = await exchange(address, head("sheddable", 1 << 20))
        closed = await asyncio.wait_for(reader.read(), 5) == b""  # keep-alive withdrawn (memory pressure)
        writer.close()
        return critical, refused, closed

    critical, refused, closed = asyncio.run(scenario())
    assert critical.startswith(b"HTTP/1.1 200") and b'"outputs"' in critical
    assert refused.startswith(b"HTTP/1.1 429") and b"retry-after: 1" in refused.lower()
    assert json.loads(refused.split(b"\r\n\r\n", 1)[1])["reason"] == "overload"
    assert b"connection: close" in refused.lower() and closed

    metrics = urllib.request.urlopen(f"{overloaded.gateway}/metrics", timeout=5).read().decode()
    assert "cp_overload_level 2.0" in metrics
    assert 'cp_overload_pressure{monitor="memory"} 1.0' in metrics
    assert 'cp_overload_actions_total{action="refused_after_headers",class="sheddable"} 1.0' in metrics
    assert 'cp_overload_actions_total{action="keepalive_withdrawn",class="sheddable"} 1.0' in metrics
    assert 'cp_shed_total{class="sheddable",reason="overload",tenant="demo"} 1.0' in metrics
    queues = urllib.request.Request(f"{overloaded.gateway}/admin/queues",
                                    headers={"Authorization": "Bearer cp-admin-key"})
    overload = json.loads(urllib.request.urlopen(queues, timeout=5).read())["overload"]
    assert overload["level"] == 2 and {"action": "refused_after_headers", "class": "sheddable", "count": 1} \
        in overload["actions"]


async def gateway_without_shards(spec_file: Path) -> tuple[GatewayServer, OverloadManager, int]:
    """A real gateway app and server in this event loop, with no shard (an admitted request gets 503)."""
    from controlplane.gateway.app import GatewayApp
    from controlplane.gateway.routing import Router
    from controlplane.spec import load_spec

    spec = load_spec(spec_file)
    app = GatewayApp(spec, Router())
    server = GatewayServer(app, spec.gateway.limits)
    app.serve_on(server)
    return server, app.overload, await server.start("127.0.0.1", 0)


def test_a_low_class_connection_is_held_after_its_refusal_and_read_again_once_released(tmp_path: Path) -> None:
    async def scenario(spec_file: Path):
        server, overload, port = await gateway_without_shards(spec_file)
        overload.refuses(CONN, CRITICAL)  # a critical request was seen: there is something to protect
        overload._set_level(1)
        overload.hold_quota = 1
        refused, reader, writer = await exchange(("127.0.0.1", port), head("sheddable", len(BODY)), BODY)
        writer.write(head("sheddable", len(BODY)) + BODY)  # the next request waits in the socket, unread
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        held = len(server.held)
        overload._set_level(0)
        server.release_held()
        started = next(iter(server.connections)).held_since  # its request waited through the hold: counted
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # read again: answered (no shard here)
        writer.close()
        # A held connection whose client leaves is closed too, though it is not read (it never sees the FIN).
        overload._set_level(1)
        overload.hold_quota = 1
        _, reader, writer = await exchange(("127.0.0.1", port), head("sheddable", len(BODY)), BODY)
        writer.write(head("sheddable", len(BODY)) + BODY)
        await asyncio.sleep(0.1)
        held_again = len(server.held)
        writer.close()
        await asyncio.sleep(0.1)
        overload._close_held()
        await asyncio.sleep(0.1)
        left = (len(server.held), server.counters.connections)
        await server.stop()
        return refused, held, started, answer, held_again, left

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC)
    refused, held, started, answer, held_again, left = asyncio.run(scenario(spec_file))
    assert refused.startswith(b"HTTP/1.1 429") and b"connection: close" not in refused.lower()
    assert held == 1
    assert started > 0  # the request that waited unread keeps the hold's start: its deadline counts from there
    assert answer.startswith(b"HTTP/1.1 503")
    assert held_again == 1 and left == (0, 0)


def test_with_nothing_to_protect_the_lowest_class_is_read_in_turns_on_a_bounded_number_of_connections(
        tmp_path: Path) -> None:
    """Overloaded, with no higher class seen: nothing is refused, but the lowest class is read on only
    `lowest_class_read` (2) connections at a time, in turns: a request served holds its connection and, once
    answered, reads again the one held longest, so every client is answered and none waits for `hold_max_s`.
    When a critical request comes, the lowest class is refused at once, though the refresh found no pressure (the
    bound keeps it low)."""
    async def scenario(spec_file: Path):
        server, overload, port = await gateway_without_shards(spec_file)
        overload._set_level(2)  # (the real refreshes leave it there: it is left only after `cool_down_s`)
        request = head("sheddable", len(BODY)) + BODY
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]

        async def answered(reader: asyncio.StreamReader, wait_s: float) -> bytes | None:
            try:
                head_ = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait_s)
            except TimeoutError:
                return None
            length = next(int(line.split(b":")[1]) for line in head_.lower().split(b"\r\n")
                          if line.startswith(b"content-length"))
            await reader.readexactly(length)
            return head_

        for reader, writer in clients:  # each connection carries the lowest class
            writer.write(request)
            assert await answered(reader, 5)
        overload._refresh(overload.clock(), 0.25, 0.0)  # a refresh (its timer is not started here): 4 read, 2 too many
        second = []
        for reader, writer in clients:
            writer.write(request)
            second.append(await answered(reader, 5))
        held_after_second = len(server.held)
        for _ in range(3):  # three more rounds: each client's request is answered in its turn
            for _, writer in clients:
                writer.write(request)
            rounds = [await answered(reader, 5) for reader, _ in clients]
            assert all(answer is not None for answer in rounds)
        held = len(server.held)
        actions = dict(overload.actions)
        # A critical request comes: the lowest class is refused from now on, though no refresh found any pressure;
        # the two connections read on are answered 429, the two held for their turn stay held
        overload._refresh(overload.clock(), 0.25, 0.0)
        critical, _, critical_writer = await exchange(("127.0.0.1", port), head("critical", len(BODY)), BODY)
        for _, writer in clients:
            writer.write(request)
        after = [await answered(reader, 0.5) for reader, _ in clients]
        # While critical is protected, a connection answered after its turn frees no other
        waiting = next(iter(overload.in_turn))
        overload.held[waiting].owes_turn = True
        overload._turn_done(waiting)
        held_while_protected = len(server.held)
        # The levels are left: the connections held for their turn are read again at the next probe
        overload._set_level(0)
        overload._probe()
        overload.stop()
        turned = [await answered(reader, 5) for (reader, _), answer in zip(clients, after, strict=True)
                  if answer is None]
        critical_writer.close()
        for _, writer in clients:
            writer.close()
        await server.stop()
        return second, held_after_second, held, actions, critical, after, held_while_protected, turned

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC.replace("max_rss_mb: 1, hold_max_s: 60", "lowest_class_read: 2, hold_max_s: 60"))
    second, held_after_second, held, actions, critical, after, held_while_protected, turned = asyncio.run(
        scenario(spec_file))
    assert all(answer.startswith(b"HTTP/1.1 503") for answer in second)  # all served (no shard here), none refused
    assert held_after_second == 2 and held == 2  # two read at a time, all along
    # the second round's first two requests hold their connections (2 read too many); every later one (2 + 12)
    # takes a turn: its connection held, the one held longest read again
    assert actions == {("connection_held", "sheddable"): 16, ("connection_released", "-"): 14}
    assert critical.startswith(b"HTTP/1.1 503")  # admitted (no shard here)
    answers = [answer for answer in after if answer is not None]
    assert len(answers) == 2 and all(answer.startswith(b"HTTP/1.1 429") for answer in answers)
    assert held_while_protected == 4  # the two refused, the two waiting their turn
    assert len(turned) == 2 and all(answer.startswith(b"HTTP/1.1 503") for answer in turned)  # admitted now


def test_a_held_connection_whose_next_request_is_critical_is_read_at_once(tmp_path: Path) -> None:
    """Clients send every class down one connection pool: a critical request that lands on a held connection
    is seen (peeked, left in the socket) and the connection is read again while the overload lasts."""
    async def scenario(spec_file: Path):
        server, overload, port = await gateway_without_shards(spec_file)
        overload.refuses(CONN, CRITICAL)
        overload._set_level(2)  # stays overloaded throughout: nothing is released by the levels
        overload.hold_quota = UNLIMITED
        refused, reader, writer = await exchange(("127.0.0.1", port), head("sheddable", len(BODY)), BODY)
        held = len(server.held)
        writer.write(head("sheddable", len(BODY)) + BODY)  # a sheddable request waits unread...
        await asyncio.sleep(0.1)
        overload._look_at_held(overload.now)
        still_held = len(server.held)
        # ...and stays parked; on a second held connection a critical request is read at once.
        _, reader2, writer2 = await exchange(("127.0.0.1", port), head("sheddable", len(BODY)), BODY)
        writer2.write(head("critical", len(BODY))[:40])  # its headers arrive in two parts
        await asyncio.sleep(0.1)
        overload._look_at_held(overload.now)
        parked_while_partial = len(server.held)
        writer2.write(head("critical", len(BODY))[40:] + BODY)
        await asyncio.sleep(0.1)
        overload._look_at_held(overload.now + 1)  # peeks back off while a client sends nothing whole
        answer = await asyncio.wait_for(reader2.readuntil(b"\r\n\r\n"), 5)  # no shard here: a 503, not a wait
        left_held, actions = len(server.held), dict(overload.actions)
        overload._look_at_held(overload.now + 61)  # past hold_max_s: the parked request gets its answer
        late_answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        for w in (writer, writer2):
            w.close()
        await server.stop()
        return refused, held, still_held, parked_while_partial, answer, left_held, actions, late_answer

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC)
    refused, held, still_held, parked_while_partial, answer, left_held, actions, late_answer = \
        asyncio.run(scenario(spec_file))
    assert refused.startswith(b"HTTP/1.1 429") and held == 1 and still_held == 1
    assert parked_while_partial == 2
    assert answer.startswith(b"HTTP/1.1 503") and b"retry-after" in answer.lower()
    assert left_held == 1 and actions["connection_released", "-"] == 1
    assert late_answer.startswith(b"HTTP/1.1 429")  # read again, still overloaded: refused, not left waiting


def test_connections_held_together_are_read_again_spread_over_the_probes(tmp_path: Path) -> None:
    """Held in one burst, expired in one burst, they would all be read in one loop turn: a stall for every
    client each `hold_max_s`. Past half of it they come back oldest first, len(held) * probe / (hold_max_s / 2) a
    probe (the last by `hold_max_s`), and the request waiting in one is answered: refused while its class is,
    whatever the refusal quota."""
    async def scenario(spec_file: Path) -> tuple[list[int], bytes]:
        server, overload, port = await gateway_without_shards(spec_file)
        overload.refuses(CONN, CRITICAL)
        overload._set_level(2)
        overload.hold_quota = UNLIMITED
        clients = []
        for _ in range(4):
            _, reader, writer = await exchange(("127.0.0.1", port), head("sheddable", len(BODY)), BODY)
            writer.write(head("sheddable", len(BODY)) + BODY)  # waits unread in the held connection
            clients.append((reader, writer))
        await asyncio.sleep(0.1)
        overload._set_level(1)
        overload.hold_quota = 0  # no refusal left this refresh: a request read now would pass...
        held = [len(server.held)]
        overload._looked_at = overload.now + 61  # every one is past hold_max_s (60 s here)...
        for probe in range(1, 5):
            overload._look_at_held(overload.now + 61 + probe * LAG_PROBE_S)  # ...looked at once a probe
            held.append(len(server.held))
        answer = await asyncio.wait_for(clients[0][0].readuntil(b"\r\n\r\n"), 5)  # ...but an overdue one is refused
        for _, writer in clients:
            writer.close()
        await server.stop()
        return held, answer

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC)
    held, answer = asyncio.run(scenario(spec_file))
    assert held == [4, 3, 2, 1, 0]  # ceil(4 * 0.05 / 30) = one a probe
    assert answer.startswith(b"HTTP/1.1 429")
