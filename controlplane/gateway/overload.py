"""The gateway's protection of itself: when the gateway, not a shard, is the bottleneck.

Requests that wait in sockets and in the event loop have no class yet, so the scheduler cannot protect
critical traffic there. Like Envoy's overload manager, monitors are refreshed every `refresh_s` (0.25 s) and
scaled into a pressure of 0..1; unlike it, the gateway also watches its event-loop lag and acts by class.

Monitors (the pressure is the highest of them; two lag probes in a row past saturation refresh at once):
- event-loop lag: how late a timer due every LAG_PROBE_S fires, in the loop's own clock (the median over the
  window): how long any new request waits before the gateway even looks at it; `lag_saturated_ms` is pressure 1.
  It starts an overload only while the process itself is busy (OVERLOAD_NEEDS_CPU): on shared cores the loop also
  runs late when other processes take the CPU, and refusing requests then frees nothing;
- CPU: the share of the window in which the loop's thread ran or waited, runnable, for a core (schedstat): a
  loop that never sleeps in its poll is saturated whoever holds the core. On shared cores a flood kept every
  critical request waiting while the process's own CPU read 0.45-0.55 (it waited for a core the rest of the time);
  run and wait together read 0.96-1.00 there, at most 0.57 at half load and 0.33 in the shard-bound mix
  (bench/diagnose/loop_busy.py). Like the lag, the wait counts toward starting an overload only while the
  process uses OVERLOAD_NEEDS_CPU of a core;
- memory: resident set over `max_rss_mb`;
- connections: open client connections over the connection limit.

Levels say which classes may be refused; entered at once when the pressure reaches them, left only after the
pressure stayed `hysteresis` below for `cool_down_s`:
- 1 (`shed_lowest_at`, 0.80): requests of the lowest class are refused right after their headers (429,
  reason "overload", the body never buffered); a connection that has carried nothing but refused classes is
  then no longer read (held: its client meets TCP back-pressure, which costs the gateway nothing), or, when
  connections or memory are the pressure, its keep-alive is withdrawn (closed after the answer). How many:
  while the pressure stays at level 1, each refresh refuses as many requests as half the low-class
  connections still read (multiplicative decrease); below it, none, and once the levels are left one held
  connection is read again per calm refresh (additive increase). So the gateway reads less, not nothing,
  and settles where the lag stays under the threshold;
- 2 (`shed_all_but_top_at`, 0.95): every request of a class but the highest is refused so, and new
  connections past `connection_budget` are refused at accept.
A class is refused only while a higher class has been seen in the last `protect_window_s`: with nothing
to protect, shedding would only lose work. But at a level, with nothing to protect, the lowest class is read on
at most `lowest_class_read` connections, in turns: beyond them, a connection whose admitted request is answered is
held, and the connection held longest is read in its place (so each waits about as long as all of them being read
would make it wait, not `hold_max_s`: holds that long left a flood's requests unanswered past their 2 s deadline).
Every turn of the loop read every ready connection of a flood (256: tens of milliseconds on shared cores), and a
critical request that came waited two or three such turns before the gateway even read it
(bench/diagnose/flood_first.py). The turns stop while a higher class is protected (the lowest class is refused
then), and once the levels are left the connections waiting their turn are read again, `lowest_class_read` a
probe. A higher class that comes to a level after none for `protect_window_s` makes the classes below it refused
at once, until the next refresh, whatever the pressure (the bound keeps the pressure low). The highest class is
never refused here and its connections are
always read. A held connection is not read but is looked at: the request its client sends next is peeked
(left in the socket) and classified, and a connection whose next request is of a class not refused now is read
again at once, so a client that sends all classes down one connection pool never parks a critical request
behind a hold. Once the levels are left, held connections are read again oldest first, one per calm refresh;
those held longer than half of `hold_max_s` are read again oldest first, spread over the probes of the other
half (so no client waits unanswered longer than `hold_max_s`: its request is refused if the overload lasts),
and one whose client has closed it (looked at once a second: a connection not read never sees the client's FIN)
is closed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from controlplane.gateway.server import ClientConnection, GatewayServer, request_head
from controlplane.spec import Overload, PriorityClass

log = logging.getLogger(__name__)

LAG_PROBE_S = 0.05
# Lag and waiting for a core start an overload only while the process itself uses this much of a core (_refresh)
OVERLOAD_NEEDS_CPU = 0.25
TCP_CLOSE_WAIT = 8  # Linux's tcp_states.h: the peer has sent its FIN
HELD_CHECK_S = 1.0  # how often held connections are checked for gone clients
PEEK_MAX_WAIT_S = 1.0  # a held connection whose client sends nothing is peeked at ever more rarely, up to this
UNLIMITED = 1 << 30
# A connection held for its turn is read again within tens of milliseconds: peeking each at once would be thousands
# of peeks a second, hundreds in one probe (an estimate: not measured on its own); one still held after this is
# peeked as any held one
TURN_PEEK_S = 0.1
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def client_gone(conn: ClientConnection) -> bool:
    """Whether the client of a connection that is not being read has closed it: the socket's TCP state is
    CLOSE_WAIT (peeking would only find the unread request that got the connection held)."""
    sock = conn.transport.get_extra_info("socket")
    if sock is None:
        return True
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE_WAIT
    except OSError:
        return True


@dataclass(slots=True)
class Held:
    """A connection not read while overloaded, and what is known of the request waiting in its socket."""

    since: float
    peek_at: float  # when to look at the socket next
    peek_wait_s: float = LAG_PROBE_S
    waiting_level: int | None = None  # class level of the request waiting unread, once peeked
    owes_turn: bool = False  # held for its turn while its request is in flight: once answered, frees another


def thread_times() -> tuple[float, float]:
    """Seconds the calling thread has run, and seconds it has waited runnable for a core
    (/proc/thread-self/schedstat; where that is missing, its CPU time and no wait)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as schedstat:
            ran_ns, waited_ns = schedstat.read().split()[:2]
        return int(ran_ns) / 1e9, int(waited_ns) / 1e9
    except (OSError, ValueError):
        return time.thread_time(), 0.0


def resident_mb() -> float:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE / 2**20


class OverloadManager:
    def __init__(self, config: Overload, classes: list[PriorityClass], server: GatewayServer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.server = server
        self.clock = clock
        self.levels = sorted({c.level for c in classes})  # ascending: levels[0] is the lowest class
        self.top = self.levels[-1]
        self.level = 0
        self.refused_below = self.refused_below_at(0)  # kept with `level`: read on every screened request
        self.pressure: dict[str, float] = {"lag": 0.0, "cpu": 0.0, "memory": 0.0, "connections": 0.0}
        self.lags_s: list[float] = []  # how late each lag probe of this window fired
        self.calm_since: float | None = None
        self.hold_quota = 0  # refusals left until the next refresh (the "read less" controller)
        self.unprotected_holds = 0  # lowest-class connections over `lowest_class_read` to hold, until the next refresh
        self.in_turn: dict[ClientConnection, None] = {}  # held for their turn by that bound, oldest first
        self.last_seen: dict[int, float] = {}  # class level -> when a request of it last arrived
        self.now = clock()
        self.actions: dict[tuple[str, str], int] = {}  # (action, class) -> count, for /metrics
        self.held: dict[ClientConnection, Held] = {}
        self.overdue: set[ClientConnection] = set()  # read again after `hold_max_s`: next request refused
        self._expected = 0.0
        self._held_checked_at = clock()
        self._looked_at = clock()  # when held connections were last looked at
        self._window_start = (clock(), *thread_times())
        self._timer: asyncio.TimerHandle | None = None
        server.connection_gate = self.refuse_connection
        server.held_answered = self._turn_done

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.enabled:
            # the first window starts now: from __init__ it would take in the process's own start (the CPU of
            # loading the spec and the endpoints, the collector's pass) as load: "cpu 1.00" at startup
            self._window_start = (self.clock(), *thread_times())
            loop = asyncio.get_running_loop()
            self._expected = loop.time() + LAG_PROBE_S
            self._timer = loop.call_later(LAG_PROBE_S, self._probe)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _probe(self) -> None:
        now = self.now = self.clock()
        loop = asyncio.get_running_loop()
        # In the loop's own clock, as its timers run: uvloop's is in whole milliseconds, read when a turn begins,
        # so an idle loop reads 0 (time.monotonic read a timer's rounding as 0.2-0.5 ms of lag when idle)
        lag_s = max(0.0, loop.time() - self._expected)
        self.lags_s.append(lag_s)
        started, ran_before, waited_before = self._window_start
        saturated = self.config.lag_saturated_ms / 1000
        # Two late probes in a row are a burst, not a pause: act now rather than at the end of the window.
        burst = len(self.lags_s) >= 2 and self.lags_s[-2] >= saturated and lag_s >= saturated
        if now - started >= self.config.refresh_s or burst:
            ran, waited = thread_times()
            self._refresh(now, now - started, ran - ran_before, waited - waited_before)
            self._window_start = (now, ran, waited)
        if self.in_turn and not self.level:
            self._read_in_turn(self.config.lowest_class_read)
        if self.held:
            self._look_at_held(now)
        if now - self._held_checked_at >= HELD_CHECK_S:
            self._held_checked_at = now
            self._close_held()
        self._expected = loop.time() + LAG_PROBE_S
        self._timer = loop.call_later(LAG_PROBE_S, self._probe)

    # --- monitors ------------------------------------------------------------------------------------
    def _refresh(self, now: float, wall_s: float, cpu_s: float, waited_s: float = 0.0) -> None:
        """Read the monitors over a window of `wall_s` in which the loop's thread ran `cpu_s` and waited `waited_s`
        for a core, and set the level."""
        config = self.config
        cpu = min(1.0, cpu_s / wall_s) if wall_s > 0 else 0.0
        busy = min(1.0, (cpu_s + waited_s) / wall_s) if wall_s > 0 else 0.0
        # the median, not the worst: one pause (a collection, a big write) is not saturation
        lag = min(1.0, statistics.median(self.lags_s or [0.0]) * 1000 / config.lag_saturated_ms)
        if self.level == 0 and cpu < OVERLOAD_NEEDS_CPU:
            # late, or waiting for a core, in a process that is hardly busy: the machine is, not the gateway;
            # shedding its few requests frees nothing
            lag, busy = 0.0, cpu
        self.pressure = {
            "lag": lag,
            "cpu": busy,
            "memory": min(1.0, resident_mb() / config.max_rss_mb),
            "connections": min(1.0, self.server.counters.connections / self.server.max_connections),
        }
        self.lags_s = []
        pressure = max(self.pressure.values())
        if self.level == 0 and self.server.held and pressure < config.shed_lowest_at - config.hysteresis:
            self._release(1)  # additive increase: one more low-class connection is read again per calm refresh
        wanted = 2 if pressure >= config.shed_all_but_top_at else 1 if pressure >= config.shed_lowest_at else 0
        self.hold_quota = self._quota(wanted)
        excess = self._excess_lowest() if max(wanted, self.level) else 0
        self.unprotected_holds = max(0, excess)
        if excess < 0 and not self._protects(self.levels[0]):
            self._read_in_turn(-excess)  # fewer read than the bound (a connection owing a turn closed, say)
        if wanted >= self.level:
            self.calm_since = None
            self._set_level(wanted)
            return
        threshold = config.shed_all_but_top_at if self.level == 2 else config.shed_lowest_at
        if pressure > threshold - config.hysteresis:
            self.calm_since = None
        elif self.calm_since is None:
            self.calm_since = now
        elif now - self.calm_since >= config.cool_down_s:
            self.calm_since = now
            self._set_level(self.level - 1)

    def _quota(self, wanted: int) -> int:
        """How many more requests of refused classes to refuse (and hold their connections) until the next
        refresh: half of the low-class connections still read while the pressure is at level 1 (multiplicative
        decrease), all at level 2, none once it is below (then held ones return one per probe)."""
        if wanted == 0:
            return 0
        if wanted == 2:
            return UNLIMITED
        refused_below = self.refused_below_at(1)
        read = sum(1 for c in self.server.connections if c.top_level < refused_below and not c.paused_for)
        return max(1, read // 2)

    def _excess_lowest(self) -> int:
        """Connections of the lowest class read now (or answering a request) beyond `lowest_class_read`."""
        lowest = self.levels[0]
        read = sum(1 for c in self.server.connections if c.top_level == lowest and not c.paused_for)
        answering = sum(1 for held in self.held.values() if held.owes_turn)
        return read + answering - self.config.lowest_class_read

    def refused_below_at(self, level: int) -> int:
        """Classes below this level are refused at an overload level: none at 0, the lowest at 1, all but the
        highest at 2."""
        return (self.levels[0], self.levels[min(1, len(self.levels) - 1)], self.top)[level]

    def _set_level(self, level: int) -> None:
        if level != self.level:
            log.warning("gateway overload level %d -> %d (pressure %s)", self.level, level,
                        ", ".join(f"{k} {v:.2f}" for k, v in self.pressure.items()))
        self.level = level
        self.refused_below = self.refused_below_at(level)

    # --- actions -------------------------------------------------------------------------------------
    def refuses(self, conn: ClientConnection, priority_class: PriorityClass) -> bool:
        """Whether a request of this class is refused right after its headers (and notes that it came). The
        request of a connection read again because it was held past `hold_max_s` is refused while its class is,
        whatever the quota: it gets its answer, not a way past the hold."""
        level = priority_class.level
        if self.level and level > self.levels[0] and not self._seen_from(level):
            # Protection begins: the classes below are refused until the next refresh, whatever the pressure (kept
            # under the thresholds by `lowest_class_read`, it would leave the connections still read to the flood).
            self.hold_quota = UNLIMITED
        self.last_seen[level] = self.now
        overdue = conn in self.overdue
        self.overdue.discard(conn)
        if level >= self.refused_below or (self.hold_quota == 0 and not overdue):
            return False
        if self._protects(level):
            self.hold_quota -= not overdue
            return True
        return False

    def admitted(self, conn: ClientConnection, priority_class: PriorityClass) -> None:
        """At a level, a request admitted (not refused here, nor for its tenant's rate; refusals are cheap and
        taking turns would double their cost): if it is of the lowest class, with nothing to protect, and its
        connection carried nothing else, the request is served and its connection held for its turn; once it is
        answered, the connection that waited longest is read again in its place (not at once: the connection's
        request is still in flight, and reading another now would let twice the bound in at a time, enough to keep
        the loop saturated). None while more are read than `lowest_class_read`."""
        level = priority_class.level
        if (level != self.levels[0] or conn.top_level > level or self._protects(level)
                or self.withdraws_keep_alive()):
            return
        if self.unprotected_holds:
            self.unprotected_holds -= 1
            owes_turn = False
        elif self.in_turn:
            owes_turn = True
        else:
            return  # no more read than the bound: nothing to take turns with
        self._hold(conn, priority_class, peek_after_s=TURN_PEEK_S).owes_turn = owes_turn
        self.in_turn[conn] = None

    def _seen_from(self, level: int) -> bool:
        """Whether a class at or above this level was seen in the last `protect_window_s`."""
        window = self.config.protect_window_s
        return any(seen_level >= level and self.now - seen <= window for seen_level, seen in self.last_seen.items())

    def _protects(self, level: int) -> bool:
        """Whether refusing a class of this level protects anything: a class above it was seen recently."""
        return self._seen_from(level + 1)

    def _turn_done(self, conn: ClientConnection) -> None:
        """A held connection was answered: if it was held for its turn in place of another, that one is read, unless
        a higher class is protected now (then the turns stop: the lowest class is refused, and the connections
        waiting their turn are read again as any held one, after `hold_max_s`)."""
        held = self.held.get(conn)
        if held is not None and held.owes_turn:
            held.owes_turn = False
            if not self._protects(self.levels[0]):
                self._read_in_turn(1)

    def _read_in_turn(self, count: int) -> None:
        """Read again up to `count` connections held for their turn, oldest first."""
        read = 0
        while self.in_turn and read < count:
            conn = next(iter(self.in_turn))
            del self.in_turn[conn]
            if conn in self.server.held:
                self.held.pop(conn, None)  # (read again before it was answered, it frees no other)
                self.server.release(conn)
                self._count("connection_released", "-")
                read += 1

    def refused(self, conn: ClientConnection, priority_class: PriorityClass) -> None:
        """After refusing a request: a connection that carried only refused classes is held (not read), or,
        when connections or memory are what runs out, its keep-alive is withdrawn."""
        self._count("refused_after_headers", priority_class.name)
        if conn.top_level >= self.refused_below:
            return
        self.in_turn.pop(conn, None)
        if self.withdraws_keep_alive():
            self._count("keepalive_withdrawn", priority_class.name)
        else:
            self._hold(conn, priority_class)

    def _hold(self, conn: ClientConnection, priority_class: PriorityClass, peek_after_s: float = 0.0) -> Held:
        self._count("connection_held", priority_class.name)
        held = self.held[conn] = Held(since=self.now, peek_at=self.now + peek_after_s)
        conn.hold()
        return held

    def withdraws_keep_alive(self) -> bool:
        """Closing costs the client a new connection and the gateway an accept: worth it only when open
        connections themselves (their count, their memory) are the pressure."""
        threshold = self.config.shed_lowest_at
        return self.level >= 1 and (self.pressure["connections"] >= threshold or self.pressure["memory"] >= threshold)

    def refuse_connection(self, count: int) -> str | None:
        if self.level >= 2 and count > self.config.connection_budget:
            self._count("connection_refused", "-")
            return "the gateway is overloaded and takes no new connections; retry later"
        return None

    def _release(self, count: int) -> None:
        released = self.server.release_held(count)
        self.actions["connection_released", "-"] = self.actions.get(("connection_released", "-"), 0) + released

    def _look_at_held(self, now: float) -> None:
        """Read again each held connection whose waiting request is of a class not refused now (at least the
        lowest class stays held: it comes back one connection per calm refresh), and those held past half of
        `hold_max_s`, oldest first, spread over the probes (as many as the time since the last look is of the
        other half): connections held in one burst would otherwise all be read in one loop turn, a stall of
        tens of milliseconds for everyone every `hold_max_s`; spread so, the last of a burst is read by
        `hold_max_s`."""
        read_from = self.refused_below_at(max(self.level, 1))
        spread_s = self.config.hold_max_s / 2
        expiring = math.ceil(len(self.held) * max(LAG_PROBE_S, now - self._looked_at) / spread_s)
        self._looked_at = now
        for conn, held in list(self.held.items()):
            if conn not in self.server.held:
                del self.held[conn]
                continue
            if held.waiting_level is None and now >= held.peek_at:
                held.waiting_level = self._waiting_level(conn)
                if held.waiting_level is None:  # nothing (whole) sent yet: look again later, less often
                    held.peek_wait_s = min(PEEK_MAX_WAIT_S, held.peek_wait_s * 2)
                    held.peek_at = now + held.peek_wait_s
            expired = expiring > 0 and now - held.since > spread_s
            if expired or (held.waiting_level is not None and held.waiting_level >= read_from):
                expiring -= expired
                if expired:
                    self.overdue.add(conn)
                del self.held[conn]
                self.server.release(conn)
                self._count("connection_released", "-")

    def _waiting_level(self, conn: ClientConnection) -> int | None:
        """The class level of the request waiting unread in a held connection (the top level where the
        connection must be read anyway: its client left, or it sent something the parser will refuse), or None
        while its headers have not all arrived."""
        limit = self.server.limits.max_header_bytes
        data = conn.peek(limit + 1)
        if data is None:
            return None
        if data == b"":
            return self.top  # the client closed: reading sees it and the connection ends
        try:
            head = request_head(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return self.top  # read it: the connection's own parser answers it 400
        if head is None:
            return self.top if len(data) > limit else None
        level = self.server.screen.class_level(*head)
        return self.top if level is None else level

    def _close_held(self) -> None:
        """Close held connections whose client has gone: a connection that is not read never sees its client's
        FIN, and would count against the connection limits for nothing. Forget overdue ones that have closed."""
        self.overdue &= self.server.connections
        for conn in [conn for conn in self.in_turn if conn not in self.server.held]:
            del self.in_turn[conn]
        for conn in list(self.held):
            if conn not in self.server.held:
                del self.held[conn]
            elif client_gone(conn):
                del self.held[conn]
                self._count("held_connection_closed", "-")
                conn.transport.close()

    def _count(self, action: str, class_name: str) -> None:
        key = (action, class_name)
        self.actions[key] = self.actions.get(key, 0) + 1

    def snapshot(self) -> dict:
        return {"level": self.level, "refused_below_level": self.refused_below if self.level else None,
                "pressure": {k: round(v, 3) for k, v in self.pressure.items()},
                "held_connections": len(self.server.held), "refusals_left": min(self.hold_quota, UNLIMITED),
                "connections": self.server.counters.connections,
                "actions": [{"action": a, "class": c, "count": n} for (a, c), n in sorted(self.actions.items())]}
