"""Which shard takes a request: the live endpoint set, free slots under adaptive limits, ejection.

- The shard backend pushes the full set of ready endpoints on every change (`update`).
- Each shard has an adaptive concurrency limit (AIMD): a response faster than `tolerance` x the shard's
  unloaded latency (+ `slack_ms`) adds 1/limit (about +1 per round trip); a slower one, or a failure,
  multiplies the limit by `backoff`, at most once per round trip. The unloaded latency is the lowest latency
  seen, slowly forgotten so it follows a shard whose real speed changes.
- A request is dispatched only into a free slot (in flight < limit): the least loaded shard relative to its
  limit wins (`acquire`); with `turn_affinity` the requests of one turn of the event loop stay on the shard the
  turn's first one took while it has a free slot, so that they reach it, and Triton's batcher, together.
- A limit less than half used decays toward twice the use (RFC 7661's idle congestion window): a burst after
  a quiet spell starts from what was really in use, not from the peak of the last busy spell.
- `consecutive_failures` failures in a row eject a shard for a back-off that doubles up to `max_s` (a failure
  counts only if the shard answered nothing while the request was out: an overloaded shard is not dead); when it
  runs out, the shard is probed (GET /v2/health/ready) before it gets traffic again, starting from the
  initial limit (slow start).
- A retry budget keeps retries under `retry_budget` of the requests.
- Two more bounds, both off by default (spec.Concurrency):
  `gpu_floor`, for throughput, on a shard on a GPU (Endpoint.gpu): its room is never below the floor, so Triton's
  dynamic batcher always has enough requests at hand to form full batches (batching raises latency, which AIMD
  alone would read as overload);
  `urgent_bound`, for latency, on every shard: within URGENT_WINDOW_S of a dispatch of the top priority class,
  requests of the other classes get at most that room (the top class keeps its whole room), so a top-class
  request waits behind about one batch in Triton's queue rather than every batch the limit or floor let in,
  and a flood of lower classes cannot take the shards' CPU from it. Where both are set the bound wins while the
  top class is active and the floor holds otherwise.
- While the top class is active, the other classes' room at a shard also adapts to the top class's own latency
  there (`urgent_room`, AIMD like the limit, off with `urgent_tolerance` 0): a top-class answer slower than
  `urgent_tolerance` x the unloaded latency (+ `urgent_slack_ms`) cuts it, a fast one grows it. The limit
  protects the shard; this protects the top class from whatever the others cost it there (the shard's queue, or
  the CPU it shares with them when the shard is a process on the gateway's machine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.gateway.upstream import UpstreamPool
from controlplane.shards.base import Endpoint
from controlplane.spec import Concurrency, Ejection

BASELINE_FORGET = 1.0005  # the unloaded latency estimate drifts up 0.05% per sample unless seen again
RETRY_BUDGET_CAP = 20.0  # retries that may be saved up for a burst of failures
LIMIT_VALIDATION_S = 1.0  # how often unused limits are cut...
LIMIT_DECAY = 0.5  # ...and by how much at most (idle: from 256 back to an `initial` of 16 in 4 s)
URGENT_WINDOW_S = 1.0  # the top class counts as active this long after its last dispatch


@dataclass(eq=False)
class Target:
    """A shard as the gateway tracks it."""

    endpoint: Endpoint
    pool: UpstreamPool
    limit: float
    outstanding: int = 0
    baseline_s: float = 0.0  # unloaded latency estimate
    last_decrease: float = 0.0
    urgent_room: float = math.inf  # the other classes' room while the top class is active (adapted to it)
    last_urgent_decrease: float = 0.0
    consecutive_failures: int = 0
    ejections_in_a_row: int = 0
    ejected_until: float = 0.0
    probing: bool = False
    draining: bool = False
    served: int = 0
    answered_at: float = 0.0  # when it last answered a request
    failures: int = 0
    ejections: int = 0
    used: int = 0  # the most requests in flight at once since the limit was last validated

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def available(self) -> bool:
        return not self.draining and not self.probing and self.ejected_until == 0.0

    def has_free_slot(self, room: int) -> bool:
        return self.available and self.outstanding < room


class Router:
    def __init__(self, concurrency: Concurrency | None = None, ejection: Ejection | None = None,
                 retry_budget: float = 0.1, max_idle_per_shard: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.concurrency = concurrency or Concurrency()
        self.ejection = ejection or Ejection()
        self.retry_budget = retry_budget
        self.retry_tokens = RETRY_BUDGET_CAP / 2
        self.max_idle_per_shard = max_idle_per_shard
        self.clock = clock
        self.targets: dict[tuple[str, int], Target] = {}
        self.by_model: dict[str, list[Target]] = {}
        self.on_capacity: Callable[[], None] = lambda: None  # told when slots may have freed
        self.validated_at = clock()
        self.urgent_at = -math.inf  # when a request of the top class was last dispatched
        self.protects_top = bool(self.concurrency.urgent_bound or self.concurrency.urgent_tolerance)
        # The requests of one turn of the event loop go to one shard while it has room (set by the gateway when it
        # writes a turn's requests together, upstream.Outbox): Triton batches only what reaches one shard at once.
        self.turn_affinity = False
        self.turn_target: Target | None = None

    def end_turn(self) -> None:
        """The turn's requests were written: the next turn picks its shard afresh (least loaded)."""
        self.turn_target = None

    # --- the endpoint set ---------------------------------------------------------------------------------
    def update(self, endpoints: list[Endpoint]) -> None:
        """Replace the endpoint set; shards that stay keep their connections, limits and history."""
        fresh: dict[tuple[str, int], Target] = {}
        for endpoint in endpoints:
            key = (endpoint.host, endpoint.port)
            target = self.targets.pop(key, None)
            if target is None:
                target = Target(endpoint, UpstreamPool(endpoint.host, endpoint.port, self.max_idle_per_shard),
                                limit=float(self.concurrency.initial))
            target.endpoint = endpoint
            fresh[key] = target
        for gone in self.targets.values():
            gone.pool.close()
        self.targets = fresh
        self.turn_target = None  # (it may have left the set)
        by_model: dict[str, list[Target]] = {}
        for target in fresh.values():
            for model in target.endpoint.models:
                by_model.setdefault(model, []).append(target)
        self.by_model = by_model
        self.on_capacity()

    def has_ready(self, model: str) -> bool:
        return any(t.available for t in self.by_model.get(model, ()))

    def any_target(self, model: str) -> Target | None:
        """Some available shard of the model, full or not (for metadata lookups that bypass the queue)."""
        candidates = [t for t in self.by_model.get(model, ()) if t.available]
        return min(candidates, key=lambda t: t.outstanding / self.room(t), default=None)

    # --- slots (the scheduler's Capacity) -------------------------------------------------------------------
    def room(self, target: Target, urgent: bool = True) -> int:
        """Requests `target` may have in flight, for a request of the top class (`urgent`) or of another: its
        adaptive limit, on a GPU raised to the floor, and for the other classes while the top one is active cut
        to the urgent bound."""
        room = int(self.floored_limit(target))
        if not urgent and self.urgent_at > -math.inf and self.clock() - self.urgent_at < URGENT_WINDOW_S:
            room = min(room, self.concurrency.urgent_bound or room)
            if target.urgent_room < room:
                room = max(1, int(target.urgent_room))
        return room

    def floored_limit(self, target: Target) -> float:
        """The adaptive limit, on a GPU raised to the floor: the top class's room."""
        return max(target.limit, float(self.concurrency.gpu_floor)) if target.endpoint.gpu else target.limit

    def can_serve(self, model: str, exclude: Target | None = None, urgent: bool = True) -> bool:
        return any(t.has_free_slot(self.room(t, urgent)) and t is not exclude for t in self.by_model.get(model, ()))

    def total_slots(self, urgent: bool = True) -> float:
        """Requests all available shards may have in flight together, by their current room (for the top class,
        or for the others: `urgent`)."""
        return float(sum(self.room(t, urgent) for t in self.targets.values() if t.available))

    def acquire(self, model: str, exclude: Target | None = None, urgent: bool = True) -> Target | None:
        """Reserve a slot on the least loaded shard (in flight relative to its room) with one free; with
        `turn_affinity`, on the shard this turn's requests went to while it has one (not for the top class where its
        latency is protected: it takes the least loaded shard). `urgent`: the request is of the top class (the
        scheduler says; see `room`)."""
        best, best_load = None, 2.0
        turn_target = self.turn_target
        affine = self.turn_affinity and not (urgent and self.protects_top)  # a protected top class: least loaded
        if (affine and turn_target is not None and turn_target is not exclude and model in turn_target.endpoint.models
                and turn_target.has_free_slot(self.room(turn_target, urgent))):
            best = turn_target
        else:
            for target in self.by_model.get(model, ()):
                room = self.room(target, urgent)
                if target is exclude or not target.has_free_slot(room):
                    continue
                load = target.outstanding / room
                if load < best_load:
                    best, best_load = target, load
            if affine:
                self.turn_target = best
        if best is not None:
            if urgent and self.protects_top:  # (no clock read per request where nothing is bounded)
                self.urgent_at = self.clock()
            best.outstanding += 1
            if best.outstanding > best.used:
                best.used = best.outstanding
            self.retry_tokens = min(RETRY_BUDGET_CAP, self.retry_tokens + self.retry_budget)
        return best

    def hold(self, target: Target) -> None:
        """Count a request sent to `target` outside the free-slot rule: a pipeline step must go to the replica
        that holds its sequence's cache. It is released (`release`) like any other, feeding the same limits,
        failure counts and ejection, and other traffic sees the shard's load."""
        target.outstanding += 1
        target.used = max(target.used, target.outstanding)

    def unreserve(self, target: Target) -> None:
        """Give back a slot that was never used (the request was not sent)."""
        target.outstanding -= 1
        self.on_capacity()

    def release(self, target: Target, latency_s: float, ok: bool, urgent: bool = False) -> None:
        """A request (of the top class: `urgent`) left `target`: adapt its limit (and the other classes' room
        there), count failures, eject it if it keeps failing."""
        target.outstanding -= 1
        now = self.clock()
        if ok:
            target.served += 1
            target.answered_at = now
            target.consecutive_failures = 0
            target.ejections_in_a_row = 0
            self._adapt(target, latency_s, now)
            if urgent and self.concurrency.urgent_tolerance:
                self._adapt_urgent_room(target, latency_s, now)
        else:
            target.failures += 1
            self._decrease(target, now)
            # A shard that answered others while this request was out is slow (requests of an overloaded shard
            # time out at their deadlines in bursts), not dead: ejecting it would take away capacity when it is
            # needed most (the fault run: the only shard left, while the other was frozen).
            if target.answered_at <= now - latency_s:
                target.consecutive_failures += 1
                if target.consecutive_failures >= self.ejection.consecutive_failures and target.available:
                    self.eject(target, now)
        self.on_capacity()

    def _adapt(self, target: Target, latency_s: float, now: float) -> None:
        c = self.concurrency
        if target.baseline_s == 0.0 or latency_s < target.baseline_s:
            target.baseline_s = latency_s
        else:
            target.baseline_s *= BASELINE_FORGET
        if latency_s <= target.baseline_s * c.tolerance + c.slack_ms / 1000:
            target.limit = min(float(c.max), target.limit + 1.0 / target.limit)
        else:
            self._decrease(target, now)

    def _adapt_urgent_room(self, target: Target, latency_s: float, now: float) -> None:
        c = self.concurrency
        room = min(target.urgent_room, self.floored_limit(target))
        if latency_s <= target.baseline_s * c.urgent_tolerance + c.urgent_slack_ms / 1000:
            # +1 a fast answer, not 1/room: top-class answers are a small part of a round trip's answers
            target.urgent_room = room + 1.0
        elif now - target.last_urgent_decrease >= max(target.baseline_s, 0.001):  # once per round trip
            target.urgent_room = max(1.0, room * c.backoff)
            target.last_urgent_decrease = now

    def _decrease(self, target: Target, now: float) -> None:
        # once per round trip: the responses of one overloaded window should count as one signal
        if now - target.last_decrease >= max(target.baseline_s, 0.001):
            target.limit = max(float(self.concurrency.min), target.limit * self.concurrency.backoff)
            target.last_decrease = now

    def validate_limits(self) -> None:
        """Let a limit that is not being used decay toward twice what is used (at least `initial`), as TCP
        validates an idle congestion window (RFC 7661): a limit grown during a busy spell must not let the
        next burst pour its whole size into the shard's queue at once. Called every upkeep tick; acts once per
        LIMIT_VALIDATION_S on the most used in that time, so ordinary bursts keep their room."""
        now = self.clock()
        if now - self.validated_at < LIMIT_VALIDATION_S:
            return
        self.validated_at = now
        floor = float(self.concurrency.initial)
        for target in self.targets.values():
            if target.used * 2 < target.limit and target.limit > floor:
                target.limit = max(floor, target.used * 2.0, target.limit * LIMIT_DECAY)
            target.used = target.outstanding

    # --- ejection and probing ---------------------------------------------------------------------------------
    def eject(self, target: Target, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        backoff = min(self.ejection.max_s, self.ejection.base_s * 2 ** target.ejections_in_a_row)
        target.ejections_in_a_row += 1
        target.ejections += 1
        target.ejected_until = now + backoff
        target.consecutive_failures = 0

    def due_for_probe(self) -> list[Target]:
        """Ejected shards whose back-off ran out: the caller probes them and reports `probed`."""
        now = self.clock()
        due = [t for t in self.targets.values() if t.ejected_until and t.ejected_until <= now and not t.probing]
        for target in due:
            target.probing = True
        return due

    def probed(self, target: Target, healthy: bool) -> None:
        target.probing = False
        if healthy:
            target.ejected_until = 0.0
            target.limit = float(self.concurrency.initial)
            self.on_capacity()
        else:
            self.eject(target)

    def take_retry_token(self) -> bool:
        if self.retry_tokens >= 1.0:
            self.retry_tokens -= 1.0
            return True
        return False

    def target_named(self, name: str) -> Target | None:
        return next((t for t in self.targets.values() if t.name == name), None)

    def close(self) -> None:
        for target in self.targets.values():
            target.pool.close()
        self.targets = {}
        self.by_model = {}

    def snapshot(self) -> list[dict]:
        now = self.clock()
        return [{"name": t.name, "url": t.endpoint.url, "in_flight": t.outstanding, "limit": round(t.limit, 2),
                 "urgent_room": round(min(t.urgent_room, t.limit), 2),
                 "baseline_ms": round(t.baseline_s * 1000, 3), "served": t.served, "failures": t.failures,
                 "ejections": t.ejections, "draining": t.draining, "probing": t.probing,
                 "ejected_for_s": round(max(0.0, t.ejected_until - now), 2) if t.ejected_until else 0.0}
                for t in self.targets.values()]
