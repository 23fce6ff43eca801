"""One inference request, as one object that walks the gateway's path top to bottom:

    admit -> check -> queue -> forward -> relay -> release

- admit: identity, class, tenant bucket and deadline, decided right after the headers (`GatewayApp.screen`),
  before the body was buffered; the result arrives with the request.
- check: only the JSON inference header is parsed, against the model's signature (names, datatypes, shapes
  against the bytes present); the ladder may send the lowest class to the model's cheaper variant.
- queue: the scheduler dispatches the ticket into a free shard slot, now or later, or sheds it (429).
- forward: the body goes as bytes on a pooled keep-alive connection, with Triton's `priority` and `timeout`
  set from the class and the remaining deadline; a small request is written at the end of the event loop's turn
  with the turn's other requests, so that Triton batches them together (upstream.Outbox). A large binary body
  (server.StreamedBody) is checked, queued and forwarded as soon as its JSON header is in, its tensor bytes
  following as they arrive; a slow client then pauses nothing but itself, and a shard that reads slowly pauses
  its client (TCP back-pressure).
- relay: the response goes back whole (at the end of the turn, with the turn's other writes), or chunk by chunk
  when the shard streams.
- release: the slot goes back with the latency (the shard's limiter, the class's service time) and metrics.
A failure before any response byte is retried once on another shard within the deadline and the retry budget.
Everything runs in callbacks of the event loop: no task or future per request (a task only for the rare
signature lookup or new upstream connection).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from controlplane.gateway.admission import Admitted, Refused
from controlplane.gateway.diagnostics import TIMELINE_DIR, TRACED_BYTES, Timeline, socket_buffers
from controlplane.gateway.errors import ANSWERED, HttpError, send_error
from controlplane.gateway.inference import InferHeader, ModelSignature, NeedsWholeBody, check_generate_request
from controlplane.gateway.routing import Target
from controlplane.gateway.scheduler import Shed, Ticket, TicketState
from controlplane.gateway.server import ClientConnection, Request
from controlplane.gateway.upstream import UpstreamConnection, UpstreamError, request_bytes

if TYPE_CHECKING:
    from controlplane.gateway.app import GatewayApp

# Client request headers that mean something to Triton; all others stay at the gateway.
FORWARDED_REQUEST_HEADERS = (b"content-type", b"content-encoding", b"accept-encoding", b"accept")
STALL_FACTOR = 2.0  # no answer after this many of its class's stall times (and STALL_MIN_S): stalled (top class: 1)
STALL_MIN_S = 0.1
LOOP_BEHIND_S = 0.005  # a timer firing this late means the event loop, not the shard, is slow

log = logging.getLogger(__name__)


def ignore(_: object) -> None:
    pass


def guarded(step: Callable) -> Callable:
    """A step called back by the event loop: a bug in it answers 500 instead of leaving the client hanging."""
    @functools.wraps(step)
    def run(self: Exchange, *args: object) -> None:
        try:
            step(self, *args)
        except Exception:
            log.exception("inference exchange failed in %s", step.__name__)
            self._fail()
    return run


class Exchange:
    __slots__ = ("gateway", "request", "conn", "model", "action", "admitted", "arrived", "checked", "signature",
                 "ticket", "target", "upstream", "sent_at", "timer", "expiry", "task", "attempt", "fresh_retry",
                 "status", "headers", "chunked", "parts", "started", "finished", "answered", "give_up_at", "path",
                 "trace")

    def __init__(self, gateway: GatewayApp, request: Request, conn: ClientConnection, model: str, action: str,
                 admitted: Admitted) -> None:
        self.gateway = gateway
        self.request = request
        self.conn = conn
        self.model = model
        self.action = action
        self.path = request.path  # where the shard is asked: the client's path, unless the ladder changes it
        self.admitted = admitted
        self.arrived = conn.waiting_since(gateway.clock())
        self.checked: InferHeader | None = None
        self.signature: ModelSignature | None = None
        self.ticket: Ticket[Target] | None = None
        self.target: Target | None = None  # the shard whose slot this request holds
        self.upstream: UpstreamConnection | None = None
        self.sent_at = 0.0
        self.give_up_at = 0.0  # when the request in flight is abandoned (deadline or upstream timeout)
        self.timer: asyncio.TimerHandle | None = None  # the in-flight timeout
        self.expiry: asyncio.TimerHandle | None = None  # the deadline while queued
        self.task: asyncio.Task[None] | None = None  # a signature lookup or a new upstream connection
        self.attempt = 0
        self.fresh_retry = False  # a reused connection that the shard had closed was replaced once
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.parts: list[bytes] = []
        self.started = False  # bytes reached the client: no retry, no error response any more
        self.finished = False  # no step is left (answered, or being answered, or the client left)
        self.answered = False  # the whole answer went to the client (or it left): nothing more to send
        # CPCTL_GATEWAY_TIMELINE: a large request's moments, for bench/diagnose/large_body.py (off: None)
        self.trace = (Timeline(id(conn), conn.transport)
                      if TIMELINE_DIR and (request.streamed is not None or len(request.body) >= TRACED_BYTES)
                      else None)

    def start(self) -> Exchange | None:
        """Walk as far as possible now; return self while the answer is pending (the connection cancels it
        if the client leaves), None when answered."""
        signature = self.gateway.signatures.get(self.model)
        if signature is None:
            self.task = self.conn.loop.create_task(self._look_up_then_queue())
        else:
            self._check_and_queue(signature)
        return None if self.finished else self

    # --- check and queue -------------------------------------------------------------------------------
    async def _look_up_then_queue(self) -> None:
        try:
            signature = await self.gateway.signature(self.model)
        except HttpError as error:
            self._answer(error)
            return
        except Exception:
            log.exception("model signature lookup failed")
            self._fail()
            return
        finally:
            self.task = None
        if not self.finished:
            self._check_and_queue(signature)

    @guarded
    def _check_and_queue(self, signature: ModelSignature) -> None:
        gateway, request = self.gateway, self.request
        self.signature = signature
        try:
            if self.action == "infer":
                self.checked = gateway.check_infer(request, signature)
            else:
                check_generate_request(request.body, signature)
        except NeedsWholeBody:
            self._check_when_whole(signature)
            return
        except ANSWERED as error:
            self._answer(error)
            return
        band, tenant = self.admitted.priority_class.name, self.admitted.tenant.name
        routed = gateway.routed_model(self.model, band)
        if routed != self.model:  # the ladder sends it to the cheaper variant
            self.model, self.path = routed, f"/v2/models/{routed}/{self.action}"
        size = len(request.body) + (request.streamed.length if request.streamed is not None else 0)
        self.ticket = Ticket(model=self.model, tenant=tenant, band=band,
                             cost=self.checked.cost if self.checked else 1.0, size=size,
                             deadline=self.arrived + self.admitted.deadline_s,
                             on_dispatch=self.forward, on_shed=self.shed)
        gateway.metrics.requests[band, tenant, "admitted"] += 1
        self._queue()

    def _check_when_whole(self, signature: ModelSignature) -> None:
        """A streamed body that can only be checked whole (BYTES inputs): wait for its end, then check it."""
        streamed = self.request.streamed
        if streamed.complete:
            self._take_whole_body(signature)
        else:
            streamed.on_finish = lambda: self._take_whole_body(signature)

    @guarded
    def _take_whole_body(self, signature: ModelSignature) -> None:
        if self.finished:
            return
        request = self.request
        request.body, request.streamed = request.streamed.whole(), None
        self._check_and_queue(signature)

    def _queue(self, exclude: Target | None = None) -> None:
        scheduler = self.gateway.scheduler
        if exclude is None:
            scheduler.submit(self.ticket)
        else:
            scheduler.requeue(self.ticket, exclude=exclude)
        if self.ticket.state is TicketState.QUEUED:
            wait = max(0.0, self.ticket.deadline - self.gateway.clock())
            self.expiry = self.conn.loop.call_later(wait, scheduler.expire, self.ticket)

    @guarded
    def shed(self, shed: Shed) -> None:
        """The scheduler refused the ticket (queue full, displaced, deadline)."""
        if self.expiry is not None:
            self.expiry.cancel()
        self.gateway.count_shed(self.ticket.band, self.ticket.tenant, shed.reason)
        self._answer(Refused(429, str(shed), shed.retry_after_s, shed.reason))

    # --- forward ---------------------------------------------------------------------------------------
    @guarded
    def forward(self, target: Target) -> None:
        """The scheduler gave the ticket a slot on `target`: send the request there."""
        gateway = self.gateway
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.finished:  # the client left while the slot was being given
            gateway.router.unreserve(target)
            return
        self.target = target
        if self.trace is not None:
            self.trace.mark("dispatched", in_flight=target.outstanding, room=gateway.router.room(target))
        # `sent_at` from here: a failure to open a connection is timed from the dispatch, for the router's ejection
        # (`_send` sets it again once the request leaves)
        now = self.sent_at = gateway.clock()
        if self.attempt == 0:
            gateway.metrics.queue_wait[self.ticket.band].observe(now - self.arrived)
        remaining = self.ticket.deadline - now
        if remaining <= 0:  # the scheduler checked at dispatch; the event loop may have been slow since
            self._unreserve()
            self.shed(Shed("deadline", "the deadline passed before the request could be sent", 0.0))
            return
        # A shard that has not answered after several typical service times is treated as stalled (frozen,
        # wedged), so the request can still be retried elsewhere before its deadline; streams are exempt.
        timeout = min(remaining, gateway.limits.upstream_timeout_s)
        self.give_up_at = now + timeout
        streamed = self.request.streamed
        if self.action == "infer" and self.attempt == 0 and (streamed is None or streamed.complete):
            # (while a streamed body still arrives, a slow client must not look like a stalled shard)
            stall_s = gateway.scheduler.band[self.ticket.band].service.stall_s()
            if self._retries_free():
                # The highest class (its retries are free) after one such time, or sooner where that would leave
                # its retry less than one before the deadline: a stall seen in time costs it nothing, and its
                # retry lands on a shard that now takes the stalled one's load too (the suite's fault run).
                retry_room_s = remaining - stall_s
                if retry_room_s >= STALL_MIN_S:
                    stall_s = min(stall_s, retry_room_s)
            else:  # the others wait longer: a late answer is worth more to them than a retry's duplicate work
                stall_s *= STALL_FACTOR
            timeout = min(timeout, max(STALL_MIN_S, stall_s))
        self.timer = self.conn.loop.call_later(timeout, self._timed_out, timeout, now + timeout)
        upstream = target.pool.take_idle()
        if upstream is None:
            self.task = self.conn.loop.create_task(self._connect_then_send(target))
        else:
            self._send(upstream, remaining)

    async def _connect_then_send(self, target: Target) -> None:
        try:
            upstream = await target.pool.open_spread()
        except UpstreamError as error:
            self.task = None
            self.on_error(error)
            return
        self.task = None
        if self.finished or self.target is not target:
            target.pool.release(upstream)
            return
        self._send(upstream, self.ticket.deadline - self.gateway.clock())

    def _send(self, upstream: UpstreamConnection, remaining_s: float) -> None:
        request, path, headers = self.request, self.path, self.request.headers
        body, header_length = request.body, headers.get(b"inference-header-content-length")
        if self.checked is not None and b"content-encoding" not in headers:
            body, header_length = self._with_triton_parameters(body, header_length, remaining_s)
        lines = []
        for name in FORWARDED_REQUEST_HEADERS:
            value = headers.get(name)
            if value is not None:
                lines.append(b"%s: %s\r\n" % (name, value))
        if header_length is not None:
            lines.append(b"inference-header-content-length: %s\r\n" % header_length)
        self.upstream = upstream
        self.sent_at = self.gateway.clock()
        streamed = request.streamed
        trace = self.trace
        if trace is not None:
            trace.mark("sent", arrived_before=sum(map(len, streamed.pieces)) if streamed is not None else len(body),
                       upstream_bufs=socket_buffers(upstream.transport))
        if streamed is None:
            data = request_bytes(b"POST", path, lines, body)
            outbox = self.gateway.outbox
            if outbox is not None and len(data) == 1 and not self._protected():  # (a large body goes at once)
                outbox.send(upstream, data[0], self)
            else:
                upstream.send(data, self)
            if trace is not None:
                trace.mark("body_out", unsent=upstream.transport.get_write_buffer_size())
            return
        # What arrived so far now, each later piece as it arrives (`write_body`), then the shard's time starts.
        upstream.send([*request_bytes(b"POST", path, lines, body, streamed.length),
                       *streamed.attach(upstream.write_body)], self)
        if not streamed.complete:
            upstream.body_open = True
            conn = self.conn

            def shard_reads(writable: bool) -> None:  # the shard's back-pressure reaches the client
                if trace is not None:
                    trace.paused(writable)
                if writable:
                    conn.resume("upstream")
                else:
                    conn.pause("upstream")

            upstream.write_listener = shard_reads
            streamed.on_finish = self._body_sent
        elif trace is not None:
            trace.mark("body_out", unsent=upstream.transport.get_write_buffer_size())

    def _body_sent(self) -> None:
        """The last piece of a streamed body went to the shard: its connection may be reused after the answer,
        and the shard's service time (for its limiter and the class's statistics) starts now."""
        upstream = self.upstream
        if upstream is not None:
            upstream.body_open = False
            upstream.write_listener = None
            if self.trace is not None:
                self.trace.mark("body_out", unsent=upstream.transport.get_write_buffer_size())
        self.conn.resume_after_upstream()
        self.sent_at = self.gateway.clock()

    def _detach_body(self, upstream: UpstreamConnection | None) -> None:
        """A streamed body stops going to `upstream` (it answered or failed); reading its client goes on."""
        streamed = self.request.streamed
        if streamed is not None:
            streamed.attach(None)
            streamed.on_finish = None
            if upstream is not None:
                upstream.write_listener = None
            self.conn.resume_after_upstream()

    def _with_triton_parameters(self, body: bytes, header_length: bytes | None, remaining_s: float
                                ) -> tuple[bytes, bytes | None]:
        """Carry the class and the remaining deadline into Triton's own queue (`priority`, `timeout` in us)."""
        parameters: dict[str, int] = {}
        signature = self.signature
        if signature.priority_levels:
            parameters["priority"] = min(self.gateway.triton_priority[self.ticket.band], signature.priority_levels)
        if signature.timeout_override:
            parameters["timeout"] = max(1, int(remaining_s * 1_000_000))
        if not parameters:
            return body, header_length
        body, length = self.checked.with_parameters(body, parameters)
        return body, None if length is None else str(length).encode()

    # --- relay (the upstream connection's sink) --------------------------------------------------------
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], chunked: bool) -> None:
        self.status, self.headers, self.chunked = status, headers, chunked
        if self.trace is not None:
            self.trace.mark("head")
        if chunked:
            self.started = True
            self.conn.start_stream(status, headers)
            # A slow client pauses the shard's side of the stream instead of buffering it here.
            upstream = self.upstream
            self.conn.write_listener = lambda writable: upstream.resume_reading() if writable \
                else upstream.pause_reading()

    def on_body(self, data: bytes) -> None:
        if self.chunked:
            self.conn.send_chunk(data)
        else:
            self.parts.append(data)

    @guarded
    def on_end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.request.streamed is not None:
            self._detach_body(self.upstream)
        self.upstream = None
        if self.finished:
            return
        self._done()
        self.started = True
        if self.chunked:
            self.conn.end_stream()
        else:
            self.conn.send(self.status, self.parts[0] if len(self.parts) == 1 else b"".join(self.parts),
                           self.headers, at_once=self._protected())
        self.answered = True
        # 5xx from Triton (its queue full, a timeout, a crash in the model) is an overload or failure signal
        self._release(ok=self.status < 500)
        self._count("completed" if self.status < 500 else "failed")
        self.gateway.metrics.latency[self.ticket.band].observe(self.gateway.clock() - self.arrived)

    @guarded
    def on_error(self, error: UpstreamError) -> None:
        """The shard failed (closed, garbage, timed out, or no connection)."""
        upstream, self.upstream = self.upstream, None
        if self.request.streamed is not None:
            self._detach_body(upstream)
        if (upstream is not None and upstream.reused and error.before_response and not error.timed_out
                and not self.fresh_retry and not self.finished):
            # A keep-alive connection the shard had closed just before we wrote: not the shard's failure. Send
            # again on a fresh connection to the same shard (the in-flight timeout keeps running).
            self.fresh_retry = True
            self.task = self.conn.loop.create_task(self._connect_then_send(self.target))
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.finished:
            return
        target = self.target
        self._release(ok=False)
        if self.started:
            self._done()
            self._count("failed")
            self.conn.abort()
            self.answered = True
            return
        gateway = self.gateway
        deadline_left = self.ticket.deadline - gateway.clock()
        if error.timed_out and (deadline_left <= 0 or self.attempt == 1 or not error.before_response):
            self._count("failed")
            log.warning("shard %s timed out a request of class %s (attempt %d, %.0f ms before its deadline): %s",
                        target.name, self.ticket.band, self.attempt + 1, deadline_left * 1000, error)
            self._answer(HttpError(504, f"the deadline passed in flight: {error}"))
            return
        if self.attempt == 0 and error.before_response and (self._retries_free() or gateway.router.take_retry_token()):
            gateway.metrics.retries += 1
            self.attempt = 1
            self._queue(exclude=target)
            return
        self._count("failed")
        log.warning("shard %s failed a request of class %s: %s", target.name, self.ticket.band, error)
        self._answer(HttpError(502, f"shard {target.name} failed: {error}"))

    @guarded
    def _timed_out(self, timeout_s: float, due: float) -> None:
        self.timer = None
        now = self.gateway.clock()
        left = self.give_up_at - now
        if left > 0 and (not self._may_retry_elsewhere() or now - due > LOOP_BEHIND_S):
            # Stalled, but with nowhere to retry a slow answer beats none. And when this timer fires late, the
            # gateway's own event loop is behind and the answer may well be waiting in our socket: the shard is
            # not to blame. Wait on until the deadline or the upstream timeout.
            self.timer = self.conn.loop.call_later(left, self._timed_out, timeout_s + left, now + left)
            return
        error = UpstreamError(f"no complete response within {timeout_s:.3g} s",
                              before_response=self.upstream is None or not self.upstream.responded, timed_out=True)
        if self.upstream is not None:
            self.upstream.fail(error)  # closes it (never reused) and calls on_error
        else:  # still connecting
            if self.task is not None:
                self.task.cancel()
                self.task = None
            self.on_error(error)

    def _may_retry_elsewhere(self) -> bool:
        router, target = self.gateway.router, self.target
        return (self.attempt == 0 and (self.upstream is None or not self.upstream.responded)
                and (self._retries_free() or router.retry_tokens >= 1.0)
                and any(t is not target and t.available for t in router.by_model.get(self.model, ())))

    def _protected(self) -> bool:
        """A request of the top class where the spec protects its latency (`urgent_bound`, `urgent_tolerance`): it is
        written at once, both ways, not at the end of a turn that a flood of lower classes may make long."""
        return self.ticket.band == self.gateway.top_class and self.gateway.router.protects_top

    def _retries_free(self) -> bool:
        """The highest class retries its one retry outside the budget: when a shard dies with many requests in
        flight, the budget must not be spent before a critical request gets its turn."""
        return self.ticket.band == self.gateway.top_class

    # --- release and ending ----------------------------------------------------------------------------
    def _release(self, ok: bool) -> None:
        target, self.target = self.target, None
        if target is not None:
            service_time = self.gateway.clock() - self.sent_at
            self.gateway.router.release(target, service_time, ok, self.ticket.band == self.gateway.top_class)
            if ok:
                self.gateway.scheduler.completed(service_time, self.ticket.band)

    def _unreserve(self) -> None:
        target, self.target = self.target, None
        if target is not None:
            self.gateway.router.unreserve(target)

    def _count(self, outcome: str) -> None:
        self.gateway.metrics.requests[self.ticket.band, self.ticket.tenant, outcome] += 1

    def _done(self) -> None:
        """No step is left: cut the ticket's ties back to this exchange (the scheduler may still hold the
        ticket), so everything is freed by reference counting, never left for the garbage collector."""
        self.finished = True
        if self.trace is not None:
            self.trace.mark("end")
            self.trace.write(self.status)
        if self.ticket is not None:
            self.ticket.on_dispatch = self.ticket.on_shed = ignore
        streamed = self.request.streamed
        if streamed is not None:  # answered: the rest of its body is read past, not kept
            streamed.drop()
            self.conn.resume_after_upstream()

    def _answer(self, error: Exception) -> None:
        if self.finished:
            return
        self._done()
        send_error(self.conn, error)
        self.answered = True

    def _fail(self) -> None:
        """A step broke (a bug): a 500, or the connection dropped if the answer had begun; never no answer, even
        when the step broke while answering."""
        if not self.finished:
            self._done()
        if not self.answered:
            self.answered = True
            self.conn.fail()

    def cancel(self) -> None:
        """The client left before its answer: give back what the request holds."""
        if self.finished:
            return
        self._done()
        self.answered = True  # nobody to answer
        for handle in (self.timer, self.expiry, self.task):
            if handle is not None:
                handle.cancel()
        if self.ticket is not None and self.ticket.state is TicketState.QUEUED:
            self.gateway.scheduler.expire(self.ticket)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.sink = None
            upstream.close()  # its answer would arrive for nobody: never reuse it
        self._unreserve()  # not the shard's failure: the slot goes back without a verdict
