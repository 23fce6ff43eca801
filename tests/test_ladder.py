"""The degradation ladder with a manual clock: it climbs under backlog, steps down after, and remembers a
bounded number of moves however long it runs."""

from __future__ import annotations

from controlplane.gateway.ladder import HISTORY_KEPT, DegradationLadder
from controlplane.spec import load_spec

from .conftest import EXAMPLE_SPEC, ManualClock


def test_history_is_bounded_and_keeps_the_latest_moves() -> None:
    spec = load_spec(EXAMPLE_SPEC)  # standby replicas and a cheaper variant: steps 0, 1, 2
    clock, woken = ManualClock(), []
    ladder = DegradationLadder(spec, clock, set_standby=woken.append)
    config = spec.gateway.ladder
    high, low = {"critical": config.backlog_high + 1}, {"critical": config.backlog_low}
    for _ in range(3 * HISTORY_KEPT):
        for backlog, wait_s in ((high, config.up_after_s), (low, config.down_after_s)):
            ladder.tick(backlog)
            clock.now += wait_s
            ladder.tick(backlog)
    assert ladder.step == 0 and woken[:2] == [True, False]
    moves = ladder.snapshot()["history"]
    assert len(ladder.history) == len(moves) == HISTORY_KEPT
    assert moves[-1] == {"at": round(clock.now, 3), "step": 0, "why": moves[-1]["why"]}
