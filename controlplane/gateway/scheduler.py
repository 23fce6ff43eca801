"""The gateway's scheduler: which admitted request goes to a shard next, and which ones are shed.

Model (vocabulary after Kubernetes API Priority and Fairness):
- A *band* holds the queued requests of one priority class; a band has one FIFO *flow* per tenant.
- *Capacity* is the set of free shard slots (each shard's adaptive concurrency limit minus its requests in
  flight). A request is dispatched only into a free slot (late binding): it waits here, not in Triton.
- Between bands: strict priority (higher `level` first), except that every *backlogged* band is guaranteed
  its `share` of dispatches. Shares are normalised over the backlogged bands, so an idle band lends its share
  to the others. Mechanism: on each dispatch every backlogged band earns `share / sum(backlogged shares)`
  credit; a band with credit >= 1 is *owed* and goes before non-owed bands (the highest owed band first);
  the dispatched band pays 1. Credit is bounded to [-1, 2] and reset when a band empties (no hoarding).
- Inside a band: deficit round robin over tenant flows by request *cost* (batch size), so a tenant sending
  big batches does not crowd out one sending small ones.
- Admission sheds at once (never after a wasted wait) when: the band is full (requests or bytes); the whole
  queue is full and no lower band has a request to displace; or the deadline cannot be met (below the top
  band: while queueing for at most QUEUE_SHARE of the time left). The wait is estimated as the requests queued
  in this band and higher bands over the service rate (slots of the shards over the mean time a request holds
  a slot; below the top band, the slots the urgent bound leaves it), at least the band's own queue over its
  guaranteed share of that rate, and at least its queue over the rate at which it really drained during the
  last second.
- When the whole queue is full, a request of a higher band displaces the newest request of the lowest
  backlogged band below it (answered 429); the arriving request never displaces its own band or a higher one.
- A dispatched request whose shard failed before answering is *requeued*: first in its flow, never to that
  shard again, through the same bounds as an arriving one (a full band sheds it; a full queue displaces below).
- A queued request whose deadline passes is removed and answered without reaching a shard; so is one that
  reaches the front with less deadline left than `time_needed_s` (it would likely time out in flight).

Invariants (tested in tests/test_scheduler.py), on every path (submit, requeue, expire, dispatch):
- queued requests <= max_queued_requests and queued bytes <= max_queued_bytes; per band likewise;
- a dispatch goes to the highest non-empty band unless a lower band is owed its share;
- every submitted ticket ends exactly once: dispatched, or shed with a reason (a requeued ticket starts again).

Time comes from an injected clock; nothing here sleeps or touches asyncio.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from controlplane.spec import GatewayLimits, PriorityClass

QUANTUM = 8.0  # cost units a flow earns per round-robin turn
RATE_WINDOW_S = 1.0  # completions counted over this window when the shards are saturated
SERVICE_TIME_WEIGHT = 0.05  # EWMA weight of each completed request's service time
WAIT_MARGIN = 1.25  # admission pads the wait estimate: a request admitted and then expiring is a wasted wait
# A request below the top class queues for at most this share of the time it has left. Its drain depends on the
# higher classes still to come: a queue admitted up to the whole deadline fills until waits sit at the deadline,
# and then every burst of a higher class expires queued requests after their wait: 429s after ~2 s, where a client
# waits out its own timeout (bench: shed P99 2.0 s). The top class, served first, keeps its whole deadline: its
# wait is the shards' to estimate, and a shard's failure (the fault scenario) must not turn it away at once.
QUEUE_SHARE = 0.5
LOOP_ALLOWANCE_S = 0.005  # event-loop delay allowed for between dispatch and the request leaving
CREDIT_MIN, CREDIT_MAX = -1.0, 2.0

# What a dispatch is given: a reserved slot on a shard (the router's `Target`); tests use their own.
SlotT = TypeVar("SlotT")


class Shed(Exception):
    """A request refused by flow control: answered 429 with Retry-After."""

    def __init__(self, reason: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Capacity(Protocol[SlotT]):
    """Free shard slots, as the router keeps them. `exclude`: a shard the request must not go to; `urgent`:
    the request is of the top band (a GPU shard may keep room for it: routing.Router.room)."""

    def can_serve(self, model: str, exclude: SlotT | None, urgent: bool) -> bool: ...
    def acquire(self, model: str, exclude: SlotT | None, urgent: bool) -> SlotT | None: ...
    def unreserve(self, target: SlotT) -> None: ...
    def total_slots(self, urgent: bool) -> float: ...


class TicketState(StrEnum):
    NEW = "new"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    SHED = "shed"


def _ignore_dispatch(target: object) -> None:
    pass


def _ignore_shed(shed: Shed) -> None:
    pass


class Ticket(Generic[SlotT]):
    """One admitted request while the scheduler holds it; it learns its fate through its two callbacks. (A plain
    class, not a dataclass: compiled, mypyc makes it a native class only so, and one is made per request.)"""

    def __init__(self, model: str, tenant: str, band: str, cost: float, size: int, deadline: float,
                 on_dispatch: Callable[[SlotT], None] = _ignore_dispatch,
                 on_shed: Callable[[Shed], None] = _ignore_shed) -> None:
        self.model = model
        self.tenant = tenant
        self.band = band
        self.cost = cost
        self.size = size
        self.deadline = deadline  # absolute, scheduler clock
        self.on_dispatch = on_dispatch
        self.on_shed = on_shed
        self.exclude: SlotT | None = None  # a shard this request must not go to (it failed there)
        self.enqueued_at = 0.0
        self.state = TicketState.NEW

    def dispatch(self, target: SlotT) -> None:
        self.state = TicketState.DISPATCHED
        self.on_dispatch(target)

    def shed(self, shed: Shed) -> None:
        self.state = TicketState.SHED
        self.on_shed(shed)


def count_in_window(times: deque[float], now: float) -> int:
    """Drop event times older than RATE_WINDOW_S; how many remain."""
    while times and times[0] < now - RATE_WINDOW_S:
        times.popleft()
    return len(times)


def record_in_window(times: deque[float], now: float) -> None:
    """Add an event time. Trimming on every add keeps the window bounded even when nobody reads it."""
    times.append(now)
    count_in_window(times, now)


class ServiceTime:
    """Mean and mean deviation of the time requests hold a slot, kept as TCP keeps round-trip times
    (RFC 6298)."""

    def __init__(self) -> None:
        self.mean_s = 0.0
        self.dev_s = 0.0

    def update(self, sample_s: float) -> None:
        if self.mean_s == 0.0:
            self.mean_s, self.dev_s = sample_s, sample_s / 2
        error = sample_s - self.mean_s
        self.mean_s += SERVICE_TIME_WEIGHT * error
        self.dev_s += SERVICE_TIME_WEIGHT * (abs(error) - self.dev_s)

    def needed_s(self) -> float:
        """Deadline worth sending with: about the 84th percentile (mean + one deviation). More would shed
        requests that usually finish; less would turn sheds into timeouts in flight."""
        return self.mean_s + self.dev_s + LOOP_ALLOWANCE_S

    def stall_s(self) -> float:
        """No answer after this long (mean + 4 deviations, RFC 6298's timeout) is unusual."""
        return self.mean_s + 4 * self.dev_s + LOOP_ALLOWANCE_S


class Band(Generic[SlotT]):
    """The queue of one priority class: a FIFO flow per tenant, served by deficit round robin."""

    def __init__(self, name: str, level: int, share: float, max_requests: int, max_bytes: int,
                 top: bool = False) -> None:
        self.name = name
        self.level = level
        self.share = share
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.flows: dict[str, deque[Ticket[SlotT]]] = {}
        self.rotation: deque[str] = deque()  # tenants with queued tickets, in turn order
        self.deficit: dict[str, float] = {}
        self.count = 0
        self.bytes = 0
        self.credit = 0.0
        self.dead = 0  # shed tickets still sitting in flows
        self.backlogged_since = math.inf  # since when this band has had requests queued without a break
        self.service = ServiceTime()  # this class's own (Triton serves classes apart)
        self.dispatched_at: deque[float] = deque()  # dispatch times of the last RATE_WINDOW_S
        self.top = top  # the highest band: its requests are `urgent` to the capacity

    def push(self, ticket: Ticket[SlotT], front: bool = False) -> None:
        flow = self.flows.get(ticket.tenant)
        if flow is None:
            flow = self.flows[ticket.tenant] = deque()
        if ticket.tenant not in self.deficit:  # a tenant is in the rotation exactly when it has a deficit entry
            self.rotation.append(ticket.tenant)
            self.deficit[ticket.tenant] = 0.0
        if front:
            flow.appendleft(ticket)
        else:
            flow.append(ticket)
        self._account(ticket, +1)

    def _account(self, ticket: Ticket[SlotT], sign: int) -> None:
        self.count += sign
        self.bytes += sign * ticket.size

    def forget(self, ticket: Ticket[SlotT]) -> None:
        """Take a ticket out of the counts; it stays in its flow and is skipped when reached (lazy removal).
        Dead tickets are compacted away once they outnumber the live ones, so memory stays bounded."""
        self._account(ticket, -1)
        self.dead += 1
        if self.dead > max(64, self.count):
            for tenant, flow in self.flows.items():
                self.flows[tenant] = deque(t for t in flow if t.state is TicketState.QUEUED and t is not ticket)
            self.dead = 0

    def newest(self) -> Ticket[SlotT] | None:
        """The most recently queued live ticket (the one displacement takes)."""
        best = None
        for flow in self.flows.values():
            for ticket in reversed(flow):
                if ticket.state is TicketState.QUEUED:
                    if best is None or ticket.enqueued_at > best.enqueued_at:
                        best = ticket
                    break
        return best

    def pop_next(self, capacity: Capacity[SlotT]) -> tuple[Ticket[SlotT] | None, SlotT | None]:
        """The next ticket by deficit round robin whose model has a free slot, with that slot."""
        blocked: set[str] = set()
        # Bounded: each visit either serves, drops a tenant, marks one blocked, or adds QUANTUM to a deficit.
        visits = len(self.rotation) * (2 + int(max((f[0].cost for f in self.flows.values() if f), default=0)
                                              // QUANTUM))
        while self.rotation and len(blocked) < len(self.rotation) and visits > 0:
            visits -= 1
            tenant = self.rotation[0]
            flow = self.flows[tenant]
            while flow and flow[0].state is not TicketState.QUEUED:  # drop tickets already shed while queued
                flow.popleft()
            if not flow:
                self.rotation.popleft()
                self.deficit.pop(tenant, None)
                blocked.discard(tenant)
                continue
            head = flow[0]
            if not capacity.can_serve(head.model, head.exclude, self.top):
                blocked.add(tenant)
                self.rotation.rotate(-1)
                continue
            if self.deficit[tenant] < head.cost:
                self.deficit[tenant] += QUANTUM
                self.rotation.rotate(-1)
                continue
            target = capacity.acquire(head.model, head.exclude, self.top)
            if target is None:
                blocked.add(tenant)
                self.rotation.rotate(-1)
                continue
            flow.popleft()
            self.deficit[tenant] -= head.cost
            self._account(head, -1)
            if not any(t.state is TicketState.QUEUED for t in flow):
                flow.clear()
                self.rotation.popleft()
                self.deficit.pop(tenant, None)
            return head, target
        return None, None


class Scheduler(Generic[SlotT]):
    def __init__(self, classes: list[PriorityClass], limits: GatewayLimits, capacity: Capacity[SlotT],
                 clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.clock = clock
        self.max_requests = limits.max_queued_requests
        self.max_bytes = limits.max_queued_bytes
        ordered = sorted(classes, key=lambda c: c.level, reverse=True)
        self.bands: list[Band[SlotT]] = [Band(c.name, c.level, c.share, c.max_queue, c.max_queue_bytes,
                                              top=c is ordered[0]) for c in ordered]
        self.band = {b.name: b for b in self.bands}
        self.count = 0
        self.bytes = 0
        self.completions: deque[float] = deque()  # completion times of the last RATE_WINDOW_S
        self.saturated_since = math.inf  # since when requests have been queued without a break
        self.service = ServiceTime()  # all classes together: the shards' service rate

    # --- admission ---------------------------------------------------------------------------------------
    def submit(self, ticket: Ticket[SlotT]) -> None:
        """Admit, queue or shed a ticket; it is dispatched or shed through its callbacks, maybe at once."""
        now = self.clock()
        band = self.band[ticket.band]
        if ticket.deadline <= now:
            ticket.shed(Shed("deadline", "the deadline has already passed", 0.0))
            return
        if self.count == 0:  # nothing waits: take a free slot now (the common, unloaded case)
            target = self.capacity.acquire(ticket.model, ticket.exclude, band.top)
            if target is not None:
                ticket.dispatch(target)
                return
        wait = self.estimated_wait(band)
        queue_share = 1.0 if band.top else QUEUE_SHARE
        if wait * WAIT_MARGIN > (ticket.deadline - now - self.time_needed_s(band)) * queue_share:
            if math.isinf(wait):  # the band drained nothing for a whole window: no shard takes it now
                ticket.shed(Shed("deadline", f"no request of class '{band.name}' was sent to a shard in the last "
                                             f"{RATE_WINDOW_S:g} s", RATE_WINDOW_S))
            else:
                ticket.shed(Shed("deadline", f"the deadline cannot be met: about {wait * 1000:.0f} ms of work of "
                                             f"class '{band.name}' and above is queued", wait))
            return
        self._enqueue_within_bounds(ticket, band, now)

    def requeue(self, ticket: Ticket[SlotT], exclude: SlotT) -> None:
        """Put back a dispatched ticket whose shard failed before answering: first in its flow, other shard,
        within the same bounds as an arriving ticket."""
        ticket.exclude = exclude
        now = self.clock()
        if ticket.deadline <= now:
            ticket.shed(Shed("deadline", "the deadline passed while retrying", 0.0))
            return
        self._enqueue_within_bounds(ticket, self.band[ticket.band], now, front=True)

    def _enqueue_within_bounds(self, ticket: Ticket[SlotT], band: Band[SlotT], now: float,
                               front: bool = False) -> None:
        """Queue the ticket if its band and the whole queue have room (displacing lower bands if needed), else
        shed it; then dispatch what fits."""
        if band.count + 1 > band.max_requests or band.bytes + ticket.size > band.max_bytes:
            ticket.shed(Shed("queue_full", f"the queue of class '{band.name}' is full", self._retry_after(band)))
            return
        while self.count + 1 > self.max_requests or self.bytes + ticket.size > self.max_bytes:
            if not self._displace_below(band):
                ticket.shed(Shed("queue_full", "the gateway queue is full", self._retry_after(band)))
                return
        if self.count == 0:
            self.saturated_since = now
        if band.count == 0:
            band.backlogged_since = now
        ticket.state = TicketState.QUEUED
        if not front:  # a requeued ticket keeps its age: displacement takes the newest
            ticket.enqueued_at = now
        band.push(ticket, front)
        self.count += 1
        self.bytes += ticket.size
        self.pump()

    def _displace_below(self, band: Band[SlotT]) -> bool:
        for lower in reversed(self.bands):
            if lower.level >= band.level:
                return False
            victim = lower.newest()
            if victim is not None:
                self._remove(victim)
                victim.shed(Shed("displaced", f"displaced by a request of a higher class than '{lower.name}'",
                                 self._retry_after(lower)))
                return True
        return False

    def _remove(self, ticket: Ticket[SlotT]) -> None:
        band = self.band[ticket.band]
        band.forget(ticket)
        self.count -= 1
        self.bytes -= ticket.size
        if band.count == 0:
            band.credit = 0.0
            band.backlogged_since = math.inf

    def expire(self, ticket: Ticket[SlotT]) -> None:
        """Called when a queued ticket's deadline passes: answer it without sending it anywhere."""
        if ticket.state is TicketState.QUEUED:
            self._remove(ticket)
            ticket.shed(Shed("deadline", "the deadline passed while queued", 0.0))

    # --- dispatch ----------------------------------------------------------------------------------------
    def pump(self) -> int:
        """Dispatch queued tickets into free slots until none fits; return how many went."""
        dispatched = 0
        while self.count:
            ticket, target = self._next()
            if ticket is None:
                break
            self.count -= 1
            self.bytes -= ticket.size
            if ticket.deadline - self.clock() < self.time_needed_s(self.band[ticket.band]):
                # it would time out in flight (a 504 and a wasted slot): answer it now instead
                self.capacity.unreserve(target)
                ticket.shed(Shed("deadline", "the deadline would pass before a shard could answer", 0.0))
                continue
            record_in_window(self.band[ticket.band].dispatched_at, self.clock())
            ticket.dispatch(target)
            dispatched += 1
        return dispatched

    def _next(self) -> tuple[Ticket[SlotT] | None, SlotT | None]:
        backlogged = [b for b in self.bands if b.count]
        total_share = sum(b.share for b in backlogged)
        owed = [b for b in backlogged if b.credit >= 1.0]
        for band in owed + [b for b in backlogged if b.credit < 1.0]:
            ticket, target = band.pop_next(self.capacity)
            if ticket is not None:
                for other in backlogged:
                    other.credit = min(CREDIT_MAX, other.credit + other.share / total_share)
                band.credit = max(CREDIT_MIN, band.credit - 1.0)
                if band.count == 0:
                    band.credit = 0.0
                    band.backlogged_since = math.inf
                return ticket, target
        return None, None

    # --- measurements ------------------------------------------------------------------------------------
    def completed(self, service_time_s: float, band: str | None = None) -> None:
        """A dispatched request (of class `band`) finished after holding its slot for service_time_s."""
        record_in_window(self.completions, self.clock())
        self.service.update(service_time_s)
        if band is not None:
            self.band[band].service.update(service_time_s)

    def time_needed_s(self, band: Band[SlotT] | None = None) -> float:
        """Deadline a request needs left when sent: from its own class's service times once known (Triton's
        priority queue serves higher classes faster than the average), else from all classes'."""
        if band is not None and band.service.mean_s > 0.0:
            return band.service.needed_s()
        return self.service.needed_s()

    def service_rate(self, urgent: bool = True) -> float:
        """Requests per second the shards take now (for the top band, or for the others: `urgent`, whose room
        the urgent bound may cut); 0 while unknown. From capacity (Little's law: slots over the time a request
        holds one), lowered to the completions of the last second while requests queue: then the shards are
        saturated and completions are the truth (the gateway's own CPU may be the limit). Completions alone
        would undercount after a lull."""
        if self.service.mean_s <= 0.0:
            return 0.0
        rate = self.capacity.total_slots(urgent) / self.service.mean_s
        now = self.clock()
        completed = count_in_window(self.completions, now)
        if self.count and self.saturated_since <= now - RATE_WINDOW_S and completed:
            rate = min(rate, completed / RATE_WINDOW_S)
        return rate

    def estimated_wait(self, band: Band[SlotT]) -> float:
        """Seconds until a request joining `band` now would be dispatched: requests queued at its level
        and above, over the service rate. An unknown rate estimates no wait (admission stays open)."""
        ahead = sum(b.count for b in self.bands if b.level >= band.level)
        if ahead == 0:
            return 0.0
        rate = self.service_rate(band.top)
        if rate <= 0:
            return 0.0
        # While higher bands are backlogged this band drains only at its guaranteed share of the rate.
        backlogged = [b for b in self.bands if b.count or b is band]
        share = band.share / sum(b.share for b in backlogged)
        wait = max(ahead / rate, (band.count + 1) / (rate * share))
        # Once the band has been backlogged for a whole window, how fast it really drains is known: trust it
        # over the model above (which cannot see, e.g., the gateway's own CPU running out).
        now = self.clock()
        if band.count and band.backlogged_since <= now - RATE_WINDOW_S:
            drained = count_in_window(band.dispatched_at, now) / RATE_WINDOW_S
            wait = max(wait, (band.count + 1) / drained if drained else math.inf)
        return wait

    def _retry_after(self, band: Band[SlotT]) -> float:
        return max(self.estimated_wait(band), 1.0)

    def snapshot(self) -> list[dict]:
        return [{"class": b.name, "level": b.level, "queued": b.count, "bytes": b.bytes,
                 "tenants": {t: sum(1 for x in f if x.state is TicketState.QUEUED) for t, f in b.flows.items() if f},
                 "credit": round(b.credit, 2)} for b in self.bands]

