"""The degradation ladder: automatic, reversible steps under sustained backlog, with hysteresis.

Step 0: normal. Step 1: standby shards are woken. Step 2: the lowest class is sent to the cheaper variant of
its model where the spec names one (e.g. FP32 -> FP16). Step 3: the lowest class is sent on to the smaller-batch
variant of the model it is on where the spec names one (e.g. max batch 32 -> 16: shorter batches on the GPU, so a
batch of the lowest class holds the GPU for less time).
A step is climbed when some class has had more than `backlog_high` requests queued for `up_after_s`; a step
is descended when every class has stayed at or below `backlog_low` for `down_after_s`. Steps that the spec
gives nothing to do (no standby, no variants) are skipped.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from controlplane.spec import ClusterSpec

log = logging.getLogger(__name__)

STEP_NAMES = {0: "normal", 1: "standby shards awake", 2: "lowest class on cheaper variants",
              3: "lowest class on smaller-batch variants"}
HISTORY_KEPT = 20  # the last moves shown in /admin/queues; older ones live in the log


class LadderSteps:
    """What the step in force means for routing (the step: `step`, climbed here or followed from the supervisor)."""

    step: int

    @property
    def use_variants(self) -> bool:
        return self.step >= 2

    @property
    def use_smaller_batches(self) -> bool:
        return self.step >= 3


class DegradationLadder(LadderSteps):
    def __init__(self, spec: ClusterSpec, clock: Callable[[], float],
                 set_standby: Callable[[bool], None] | None = None) -> None:
        self.config = spec.gateway.ladder
        self.clock = clock
        self.set_standby = set_standby
        has_standby = set_standby is not None and any(s.standby for s in spec.shards)
        has_variants = any(m.cheaper_variant for m in spec.models)
        has_smaller_batches = any(m.smaller_batch_variant for m in spec.models)
        self.steps = ([0] + ([1] if has_standby else []) + ([2] if has_variants else [])
                      + ([3] if has_smaller_batches else []))
        self.position = 0  # index into self.steps
        self.high_since: float | None = None
        self.low_since: float | None = None
        self.history: deque[tuple[float, int, str]] = deque(maxlen=HISTORY_KEPT)

    @property
    def step(self) -> int:
        return self.steps[self.position]

    def tick(self, queued_per_class: dict[str, int]) -> None:
        """Look at the backlog once (called periodically) and move at most one step."""
        now = self.clock()
        high = any(n > self.config.backlog_high for n in queued_per_class.values())
        low = all(n <= self.config.backlog_low for n in queued_per_class.values())
        if high:
            self.low_since = None
            self.high_since = self.high_since if self.high_since is not None else now
            if now - self.high_since >= self.config.up_after_s and self.position < len(self.steps) - 1:
                self._move(+1, now, f"backlog {max(queued_per_class.values())} > {self.config.backlog_high} "
                                    f"for {self.config.up_after_s:g} s")
                self.high_since = now
        elif low:
            self.high_since = None
            self.low_since = self.low_since if self.low_since is not None else now
            if now - self.low_since >= self.config.down_after_s and self.position > 0:
                self._move(-1, now, f"backlog <= {self.config.backlog_low} for {self.config.down_after_s:g} s")
                self.low_since = now
        else:
            self.high_since = self.low_since = None

    def _move(self, direction: int, now: float, why: str) -> None:
        before = self.step
        self.position += direction
        after = self.step
        log.warning("degradation ladder: step %d (%s) -> %d (%s): %s", before, STEP_NAMES[before], after,
                    STEP_NAMES[after], why)
        self.history.append((now, after, why))
        if self.set_standby is not None and (before < 1 <= after or after < 1 <= before):
            self.set_standby(after >= 1)

    def snapshot(self) -> dict:
        return {"step": self.step, "name": STEP_NAMES[self.step], "steps": self.steps,
                "history": [{"at": round(t, 3), "step": s, "why": w} for t, s, w in self.history]}
