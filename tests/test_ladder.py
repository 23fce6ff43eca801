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


def test_on_the_gpu_spec_the_lowest_class_moves_to_vision_fp16_under_backlog() -> None:
    from controlplane.gateway.app import GatewayApp
    from controlplane.gateway.routing import Router

    from .conftest import ROOT

    spec = load_spec(ROOT / "examples" / "gpu" / "h200.yaml")  # vision's cheaper variant: vision_fp16
    clock = ManualClock()
    app = GatewayApp(spec, Router(clock=clock), clock)
    config = spec.gateway.ladder
    assert app.routed_model("vision", "sheddable") == "vision"
    backlog = {"sheddable": config.backlog_high + 1}
    app.ladder.tick(backlog)
    clock.now += config.up_after_s
    app.ladder.tick(backlog)  # no standby in this spec: the first step up is the variants' step
    assert app.ladder.step == 2
    assert app.routed_model("vision", "sheddable") == "vision_fp16"
    assert app.routed_model("risk", "sheddable") == "risk_fp16"
    assert app.routed_model("vision", "critical") == "vision"  # only the lowest class is degraded
    assert app.routed_model("vision_bf16", "sheddable") == "vision_bf16"  # a model without a variant stays


def test_on_the_gpu_spec_the_last_step_sends_the_lowest_class_to_batches_of_16() -> None:
    from controlplane.gateway.app import GatewayApp
    from controlplane.gateway.routing import Router

    from .conftest import ROOT

    spec = load_spec(ROOT / "examples" / "gpu" / "h200.yaml")  # vision -> vision_fp16 -> vision_fp16_b16
    clock = ManualClock()
    app = GatewayApp(spec, Router(clock=clock), clock)
    config = spec.gateway.ladder
    assert app.ladder.steps == [0, 2, 3]
    backlog = {"sheddable": config.backlog_high + 1}
    app.ladder.tick(backlog)
    for _ in range(2):
        clock.now += config.up_after_s
        app.ladder.tick(backlog)
    assert app.ladder.step == 3
    assert app.routed_model("vision", "sheddable") == "vision_fp16_b16"  # FP32 -> FP16, then batch 256 -> 16
    assert app.routed_model("vision_fp16", "sheddable") == "vision_fp16_b16"
    assert app.routed_model("risk", "sheddable") == "risk_fp16"  # no smaller-batch variant: step 2's stays
    assert app.routed_model("vision", "critical") == "vision"
    low = {"sheddable": config.backlog_low}
    app.ladder.tick(low)
    clock.now += config.down_after_s
    app.ladder.tick(low)  # one step down: back to the FP16 variant at full batch
    assert app.ladder.step == 2 and app.routed_model("vision", "sheddable") == "vision_fp16"
