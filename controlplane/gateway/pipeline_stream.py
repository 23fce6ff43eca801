"""`/generate` and `/generate_stream` of a pipeline (spec `pipelines`): the gateway drives the token loop.

One sequence, top to bottom: admitted after its headers (tenant, class, bucket, deadline: the common screen)
-> body checked (`text_input`, `max_tokens`) -> a place among the pipeline's `max_sequences`, or 429 before
any token -> one replica per stage picked for the whole sequence (its KV cache lives there) -> steps: each
walks the stages as binary-tensor infers, each counted on its stage replica like any request (the shard's
in-flight count, limit, failures and ejection, the class's service statistics); a critical step goes straight
in, the others' past the pipeline's `max_steps_per_stage` at a replica (or past `urgent_steps_per_stage` while a
critical sequence waits for its first token, or, with `one_batch_per_stage`, while the replica has a batch
running, or, with `one_stage_at_a_time`, while a batch of theirs runs at another stage beside a critical sequence)
are held here in class order (StepGate) -> each token is sent as it comes (a server-sent event, or
gathered for /generate) -> released: the last step ends the caches, an early end (deadline, client gone, failure)
sends a release.

Once its first token is sent a stream is never cut by load: it ends at `max_tokens`, at end of text, or at
its own deadline (a last event `{"error": "deadline"}`). Before the first token, a passed deadline is a 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import secrets
from typing import TYPE_CHECKING

import numpy as np
import orjson

from controlplane.gateway.admission import Admitted
from controlplane.gateway.errors import ANSWERED, RETRY_AFTER_NO_SHARD, HttpError, send_error
from controlplane.gateway.inference import BadRequest, json_object
from controlplane.gateway.routing import Target
from controlplane.gateway.server import ClientConnection, Request
from controlplane.gateway.upstream import fetch, request_bytes
from controlplane.llm.pipeline import END, EOS, START, decode, encode, step_request_body, step_response_tensor
from controlplane.spec import Pipeline

if TYPE_CHECKING:
    from controlplane.gateway.app import GatewayApp

log = logging.getLogger(__name__)
DEADLINE_SLACK_S = 0.002  # a step's timeout is the time left: its timing out that close to the deadline is the deadline
STAGE_FULL = "KV cache full"  # the stage's message when it holds max_sequences already (llm_stage/1/stage.py)
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class StageFailed(Exception):
    pass


class StepGate:
    """A pipeline's steps in flight at each stage replica (a sequence has at most one step at a stage).

    Steps of the top class always go in. A step of another class goes in while the replica has fewer than
    `limit` steps in flight (0: no bound), or fewer than `urgent_limit` while a top-class sequence of the pipeline
    waits for its first token (`starting_top` > 0; None: no such bound), and, with `one_batch`, only while the
    replica has no step in flight at all: then every waiting step goes in at once (up to the bound), so the stage
    holds one batch of them, running, and none queued behind it. With `one_stage`, while a top-class sequence of
    the pipeline is in flight (`top_sequences` > 0), the other classes' steps are in flight at one replica at a
    time: the next batch of them goes in once the last one has left, at the replica where the largest batch
    waits (then the oldest step): stages that time-slice one GPU then never run the others' batches side by
    side, so a top-class step finds at most one of them running, and running faster. The others wait here in
    class order (Triton priority, 1 first), then arrival order, and go in as steps leave or the urgency ends. So
    a critical step never waits here, and in the stage's own FIFO queue it waits behind at most the steps
    already in it (with `one_batch`: at most the one batch running).
    """

    def __init__(self, limit: int, urgent_limit: int | None = None, one_batch: bool = False,
                 one_stage: bool = False) -> None:
        self.limit, self.urgent_limit, self.one_batch, self.one_stage = limit, urgent_limit, one_batch, one_stage
        self.in_flight: dict[Target, int] = {}
        self.waiting: dict[Target, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self.arrivals = itertools.count()
        self.starting_top = 0  # top-class sequences of the pipeline before their first token
        self.top_sequences = 0  # top-class sequences of the pipeline in flight
        self.others_in_flight = 0  # steps of the other classes in flight, at every replica together
        self.next_batch_due = False  # `one_stage`: the choice of the next batch is scheduled

    def room(self) -> int | None:
        """Steps a replica may have in flight for a class other than the top one now (None: no bound)."""
        bounds = [self.limit or None, self.urgent_limit if self.starting_top else None]
        return min((b for b in bounds if b is not None), default=None)

    def one_stage_now(self) -> bool:
        return self.one_stage and self.top_sequences > 0

    def places(self, target: Target) -> float:
        """How many steps of a class other than the top one may go in at `target` now."""
        in_flight = self.in_flight.get(target, 0)
        if self.one_batch and in_flight:
            return 0  # its batch is running: the next one forms here
        if self.one_stage_now() and self.others_in_flight:
            return 0  # another batch of theirs runs somewhere in the pipeline
        room = self.room()
        return math.inf if room is None else room - in_flight

    async def enter(self, target: Target, priority: int, top: bool) -> bool:
        """Wait for room at `target`; True when the step was held here."""
        waiting = self.waiting.setdefault(target, [])
        if top or (not waiting and self.places(target) > 0):
            self.in_flight[target] = self.in_flight.get(target, 0) + 1
            self.others_in_flight += not top
            return False
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(waiting, (priority, next(self.arrivals), place))
        try:
            await place
        except asyncio.CancelledError:
            if place.done() and not place.cancelled():  # handed a place just as it left: pass it on
                self.leave(target, top=False)
            raise
        return True

    def leave(self, target: Target, top: bool) -> None:
        """A step left `target`: the first waiting steps still waiting take the room there is."""
        self.in_flight[target] -= 1
        self.others_in_flight -= not top
        if self.one_stage_now():
            self._choose_next_batch_soon()
        else:
            self._admit(target)
        if not self.in_flight[target] and not self.waiting.get(target):  # nothing kept for an idle replica
            del self.in_flight[target]
            self.waiting.pop(target, None)

    def top_starting(self) -> None:
        self.starting_top += 1
        self.top_sequences += 1

    def top_started(self) -> None:
        """A top-class sequence has its first token (or ended): when none is left starting, held steps go in."""
        self.starting_top -= 1
        if not self.starting_top:
            self._admit_everywhere()

    def top_ended(self) -> None:
        """A top-class sequence ended: when none is left, the other classes' steps go in at every stage again."""
        self.top_sequences -= 1
        if not self.top_sequences:
            self._admit_everywhere()

    def _admit_everywhere(self) -> None:
        if self.one_stage_now():
            self._choose_next_batch_soon()
        else:
            for target in list(self.waiting):
                self._admit(target)

    def _choose_next_batch_soon(self) -> None:
        """Choose the next batch once the steps that just left have asked for their next stage (they do so in the
        same turn of the event loop): the batch that ended then waits whole at its next stage."""
        if not self.others_in_flight and not self.next_batch_due:
            self.next_batch_due = True
            asyncio.get_running_loop().call_soon(self._admit_next_batch)

    def _admit_next_batch(self) -> None:
        """`one_stage`: the next batch of the other classes goes in where the largest one waits (then the oldest)."""
        self.next_batch_due = False
        if not self.one_stage_now():
            self._admit_everywhere()
            return
        if self.others_in_flight:
            return
        batches = {}  # target -> (its batch's size, minus its oldest step's arrival); steps whose client left
        for target, waiting in self.waiting.items():  # (cancelled, not yet popped) do not count
            arrivals = [arrival for _, arrival, place in waiting if not place.done()]
            size = min(len(arrivals), self.places(target))
            if size > 0:
                batches[target] = (size, -min(arrivals))
        if batches:
            self._admit(max(batches, key=batches.__getitem__))

    def _admit(self, target: Target) -> None:
        waiting, places = self.waiting.get(target, []), self.places(target)
        while waiting and places > 0:
            _, _, place = heapq.heappop(waiting)
            if not place.done():
                self.in_flight[target] = self.in_flight.get(target, 0) + 1
                self.others_in_flight += 1
                place.set_result(None)
                places -= 1


class PipelineSequences:
    """How many sequences of each pipeline are in flight (the bound that sheds before the first token), and
    each pipeline's step gate."""

    def __init__(self, pipelines: list[Pipeline]) -> None:
        self.pipelines = {p.name: p for p in pipelines}
        self.in_flight = dict.fromkeys(self.pipelines, 0)
        self.gates = {p.name: StepGate(p.max_steps_per_stage, p.urgent_steps_per_stage, p.one_batch_per_stage,
                                       p.one_stage_at_a_time) for p in pipelines}


def check_generate_body(body: bytes, pipeline: Pipeline) -> tuple[str, int]:
    """The prompt and the number of tokens asked, or BadRequest naming the problem."""
    document = json_object(body, "the body", "a JSON object with `text_input` and `max_tokens`")
    prompt, max_tokens = document.get("text_input"), document.get("max_tokens", 16)
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("`text_input` must be a non-empty string")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= pipeline.max_tokens:
        raise BadRequest(f"`max_tokens` must be an integer from 1 to {pipeline.max_tokens}")
    return prompt, max_tokens


class PipelineRun:
    """One sequence of a pipeline, from its checked body to its release."""

    def __init__(self, app: GatewayApp, request: Request, conn: ClientConnection, pipeline: Pipeline,
                 admitted: Admitted, streaming: bool) -> None:
        self.app, self.request, self.conn, self.pipeline = app, request, conn, pipeline
        self.admitted, self.streaming = admitted, streaming
        self.deadline_at = app.clock() + admitted.deadline_s
        self.priority = app.triton_priority[admitted.priority_class.name]
        self.top = admitted.priority_class.name == app.top_class
        self.gate = app.pipeline_sequences.gates[pipeline.name]
        self.starting = False  # a top-class sequence before its first token: the gate's urgency
        self.sequence_id = secrets.randbits(63) or 1
        self.stages: list[Target] = []
        self.tokens: list[int] = []
        self.ended_caches = False

    async def run(self) -> None:
        sequences = self.app.pipeline_sequences
        name, labels = self.pipeline.name, (self.admitted.priority_class.name, self.admitted.tenant.name)
        try:
            prompt, max_tokens = check_generate_body(self.request.body, self.pipeline)
            places = self.pipeline.max_sequences
            if not self.top:
                places -= self.pipeline.reserved_for_top_class
            if sequences.in_flight[name] >= places:
                self.app.count_shed(*labels, "queue_full")
                raise HttpError(429, f"pipeline '{name}' has {sequences.in_flight[name]} sequences in flight, "
                                f"the most class '{self.admitted.priority_class.name}' may have",
                                [(b"retry-after", b"1")])
            self.stages = self._pick_stages()
        except ANSWERED as error:
            send_error(self.conn, error)
            return
        sequences.in_flight[name] += 1
        if self.top:
            self.starting = True
            self.gate.top_starting()
        try:
            outcome = await self._generate(encode(prompt), max_tokens)
            if outcome != "shed":  # count_shed counted those
                self.app.metrics.requests[(*labels, outcome)] += 1
        finally:
            self._started()
            if self.top:
                self.gate.top_ended()
            sequences.in_flight[name] -= 1
            if self.stages and not self.ended_caches:
                await self._release()

    def _pick_stages(self) -> list[Target]:
        stages = []
        for model in self.pipeline.stages:
            target = self.app.router.any_target(model)
            if target is None:
                raise HttpError(503, f"no ready shard serves stage '{model}'", RETRY_AFTER_NO_SHARD)
            stages.append(target)
        return stages

    async def _generate(self, prompt: list[int], max_tokens: int) -> str:
        step_input = np.asarray(prompt, np.int64)
        for step in range(max_tokens):
            if self.app.clock() >= self.deadline_at:
                return self._deadline()
            last = step == max_tokens - 1
            try:
                token = await self._step((START if step == 0 else 0) | (END if last else 0), step_input)
            except StageFailed as failure:
                if self.app.clock() >= self.deadline_at - DEADLINE_SLACK_S:  # the step was cut by the deadline
                    return self._deadline()
                return self._failed(str(failure))
            self.tokens.append(token)
            self._started()
            self.ended_caches = last
            if self.streaming:
                if step == 0:
                    self.conn.start_stream(200, SSE_HEADERS)
                self._event({"model_name": self.pipeline.name, "text_output": decode([token]), "token_id": token})
            if token == EOS:
                break
            step_input = np.asarray([token], np.int64)
        self._finish()
        return "completed"

    async def _step(self, flags: int, data: np.ndarray) -> int:
        carried = data
        for index, target in enumerate(self.stages):
            first, last = index == 0, index == len(self.stages) - 1
            remaining_s = self.deadline_at - self.app.clock()
            carried = await self._infer(target, self.pipeline.stages[index], flags,
                                        "input_ids" if first else "hidden", carried,
                                        "next_token" if last else "hidden_out", remaining_s)
            carried = carried[0]
        return int(carried[0])

    async def _infer(self, target: Target, model: str, flags: int, input_name: str, data: np.ndarray,
                     output_name: str, remaining_s: float) -> np.ndarray:
        body, header_length = step_request_body(self.sequence_id, flags, input_name, data, output_name,
                                                self.priority)
        headers = [b"content-type: application/octet-stream\r\n",
                   b"inference-header-content-length: %d\r\n" % header_length]
        gate, router = self.gate, self.app.router
        asked_at = self.app.clock()
        held = await gate.enter(target, self.priority, self.top)
        router.hold(target)
        sent_at, ok, client_left = self.app.clock(), False, False
        self.app.metrics.count_step(self.pipeline.name, self.admitted.priority_class.name, held, sent_at - asked_at)
        try:
            remaining_s -= sent_at - asked_at  # the wait at the gate came out of it
            timeout_s = max(0.001, min(remaining_s, self.app.limits.upstream_timeout_s))
            answer = await fetch(target.pool, request_bytes(b"POST", f"/v2/models/{model}/infer", headers, body),
                                 timeout_s)
            ok = answer.status < 500  # as for any request: a 5xx or no answer counts against the shard
        except asyncio.CancelledError:
            client_left = True
            raise
        except Exception as exc:  # any upstream failure ends this sequence with a message, never a hang
            raise StageFailed(f"stage {model} on {target.name}: {exc or type(exc).__name__}") from None
        finally:
            gate.leave(target, self.top)
            service_s = self.app.clock() - sent_at
            if client_left:  # the client went away mid-step: says nothing of the shard (a flood leaving at once
                router.unreserve(target)  # must not eject a healthy stage)
            else:
                router.release(target, service_s, ok)  # the shard's limit, failure count and ejection
            if ok:
                self.app.scheduler.completed(service_s, self.admitted.priority_class.name)  # class statistics
        payload = b"".join(answer.parts)
        if answer.status != 200:
            raise StageFailed(f"stage {model} on {target.name} answered {answer.status}: "
                              f"{payload[:300].decode(errors='replace')}")
        length = dict(answer.headers).get(b"inference-header-content-length")
        try:
            return step_response_tensor(payload, int(length) if length is not None else None)
        except (ValueError, KeyError, TypeError) as exc:  # a sequence ends with a message, never a task's traceback
            raise StageFailed(f"stage {model} on {target.name}: unreadable answer ({exc!r})") from None

    def _started(self) -> None:
        if self.starting:
            self.starting = False
            self.gate.top_started()

    # --- endings -------------------------------------------------------------------------------------------
    def _event(self, document: dict) -> None:
        self.conn.send_chunk(b"data: " + orjson.dumps(document) + b"\n\n")

    def _finish(self) -> None:
        if self.streaming:
            self.conn.end_stream()
        else:
            self.conn.send_json(200, orjson.dumps({"model_name": self.pipeline.name,
                                                   "text_output": decode(self.tokens), "token_ids": self.tokens}))

    def _deadline(self) -> str:
        labels = (self.admitted.priority_class.name, self.admitted.tenant.name)
        if not self.tokens:  # nothing sent yet: shed, like any request whose deadline cannot be met
            self.app.count_shed(*labels, "deadline")
            send_error(self.conn, HttpError(429, "the deadline passed before the first token", [(b"retry-after",
                                                                                                  b"1")]))
            return "shed"
        if self.streaming:  # a 200 stream whose last event says why it ended
            self._event({"error": "deadline", "tokens": len(self.tokens)})
            self.conn.end_stream()
            return "completed"
        send_error(self.conn, HttpError(504, f"the deadline passed after {len(self.tokens)} tokens"))
        return "failed"

    def _failed(self, message: str) -> str:
        log.warning("pipeline %s: %s", self.pipeline.name, message)
        if not self.tokens and STAGE_FULL in message:  # a stage's caches are full: shed, as the gateway's bound does
            self.app.count_shed(self.admitted.priority_class.name, self.admitted.tenant.name, "queue_full")
            send_error(self.conn, HttpError(429, message, [(b"retry-after", b"1")]))
            return "shed"
        if self.streaming and self.tokens:
            self._event({"error": message})
            self.conn.end_stream()
        else:
            send_error(self.conn, HttpError(502, message))
        return "failed"

    async def _release(self) -> None:
        """Free the sequence's caches at every stage (best effort: a stage also evicts idle sequences)."""
        for index, target in enumerate(self.stages):
            empty = np.zeros((0,), np.int64) if index == 0 else np.zeros((0, 0), np.float32)
            with contextlib.suppress(StageFailed, asyncio.CancelledError):
                await self._infer(target, self.pipeline.stages[index], END, "input_ids" if index == 0 else "hidden",
                                  empty, "next_token" if index == len(self.stages) - 1 else "hidden_out", 5.0)
