"""The router's rules with a fake clock: adaptive limits, least-loaded choice, ejection and probing, retry budget."""

from __future__ import annotations

import pytest

from controlplane.gateway.routing import Router
from controlplane.shards.base import Endpoint
from controlplane.spec import Concurrency, Ejection

from .conftest import ManualClock

MODELS = frozenset({"m"})


def router(**concurrency) -> tuple[Router, ManualClock]:
    clock = ManualClock()
    r = Router(Concurrency(**{"initial": 4, "max": 64, "slack_ms": 0, **concurrency}),
               Ejection(consecutive_failures=3, base_s=1.0, max_s=8.0), retry_budget=0.1, clock=clock)
    r.update([Endpoint("a", "127.0.0.1", 1, MODELS), Endpoint("b", "127.0.0.1", 2, MODELS)])
    return r, clock


def test_requests_go_only_into_free_slots_least_loaded_first() -> None:
    r, _ = router()
    taken = [r.acquire("m") for _ in range(8)]
    assert sorted(t.name for t in taken) == ["a"] * 4 + ["b"] * 4  # alternates, each up to its limit of 4
    assert r.acquire("m") is None and not r.can_serve("m")
    r.unreserve(taken[0])
    assert r.acquire("m") is taken[0]


def test_with_turn_affinity_a_turns_requests_stay_on_one_shard_while_it_has_room() -> None:
    r, _ = router()
    r.turn_affinity = True
    a, b = r.target_named("a"), r.target_named("b")
    first_turn = [r.acquire("m") for _ in range(6)]
    assert first_turn == [a] * 4 + [b] * 2  # the turn's shard until its limit of 4, then the least loaded
    r.end_turn()
    assert r.acquire("m") is b  # a new turn starts on the least loaded shard (b: 2 of 4)
    assert r.acquire("m", exclude=b) is None  # a full; b excluded: never the turn's shard then
    r.unreserve(a)
    assert r.acquire("m", exclude=b) is a
    r.update([Endpoint("c", "127.0.0.1", 3, MODELS)])
    assert r.acquire("m").name == "c"  # a shard that left the set is never the turn's shard


def test_a_protected_top_class_ignores_turn_affinity_and_takes_the_least_loaded_shard() -> None:
    r, _ = router(urgent_bound=8)
    r.turn_affinity = True
    a, b = r.target_named("a"), r.target_named("b")
    assert [r.acquire("m", urgent=False) for _ in range(3)] == [a, a, a]  # the turn's shard
    assert r.acquire("m", urgent=True) is b  # the top class: least loaded, not where the turn's flood went
    assert r.acquire("m", urgent=False) is a  # and the turn's shard stays the others'


def test_without_turn_affinity_each_request_goes_to_the_least_loaded_shard() -> None:
    r, _ = router()
    assert [t.name for t in (r.acquire("m") for _ in range(4))] == ["a", "b", "a", "b"]


def test_limit_grows_on_fast_answers_and_shrinks_on_slow_ones() -> None:
    r, clock = router()
    a = r.target_named("a")
    for _ in range(40):  # unloaded latency 10 ms
        r.acquire("m", exclude=r.target_named("b"))
        clock.now += 0.01
        r.release(a, 0.010, ok=True)
    grown = a.limit
    assert grown > 6
    r.acquire("m", exclude=r.target_named("b"))
    clock.now += 0.05
    r.release(a, 0.050, ok=True)  # 5x the unloaded latency: overload
    assert a.limit < grown and a.limit == grown * 0.9


def test_failing_shard_is_ejected_then_probed_before_it_returns() -> None:
    r, clock = router()
    a = r.target_named("a")
    for _ in range(3):
        r.acquire("m", exclude=r.target_named("b"))
        r.release(a, 0.0, ok=False)
    assert not a.available and all(r.acquire("m") is not a for _ in range(3))
    assert r.due_for_probe() == []  # still within its 1 s back-off
    clock.now += 1.0
    assert r.due_for_probe() == [a] and not a.available  # probing: no traffic meanwhile
    r.probed(a, healthy=False)
    clock.now += 1.5
    assert r.due_for_probe() == []  # the back-off doubled to 2 s
    clock.now += 0.5
    assert r.due_for_probe() == [a]
    r.probed(a, healthy=True)
    assert a.available and a.limit == 4  # back at the initial limit (slow start)


def test_an_overloaded_shard_whose_requests_time_out_together_is_not_ejected() -> None:
    """Requests of a shard that keeps answering others time out at their deadlines in bursts: slow, not dead.
    (In the fault run such a burst ejected the only shard left while the other was frozen: 154 critical requests
    shed.) A shard that answers nothing while its requests are out is still ejected."""
    r, clock = router()
    a, b = r.target_named("a"), r.target_named("b")
    for _ in range(4):
        r.acquire("m", exclude=b)
    clock.now += 0.2
    r.release(a, 0.2, ok=True)  # answered one of them
    clock.now += 0.05
    for _ in range(3):
        r.release(a, 0.25, ok=False)  # the others time out together, all sent before that answer
    assert a.available and a.consecutive_failures == 0 and a.failures == 3
    assert a.limit < 4  # what does change: its limit, as for any slow answer
    for _ in range(3):
        r.acquire("m", exclude=b)
    clock.now += 1.0
    for _ in range(3):
        r.release(a, 1.0, ok=False)  # nothing answered in that second
    assert not a.available


def test_retries_stay_within_the_budget() -> None:
    r, _ = router()
    granted = 0
    for _ in range(1000):
        slot = r.acquire("m")
        r.unreserve(slot)
        granted += r.take_retry_token()
    assert granted <= 0.1 * 1000 + 10  # 10% of requests, plus the saved-up start


def gpu_router(**concurrency) -> tuple[Router, ManualClock]:
    """One shard on a GPU ("g") beside one on the CPU ("c"), both serving m."""
    clock = ManualClock()
    r = Router(Concurrency(**{"initial": 2, "max": 64, "slack_ms": 0, **concurrency}), clock=clock)
    r.update([Endpoint("g", "127.0.0.1", 1, MODELS, gpu=True), Endpoint("c", "127.0.0.1", 2, MODELS)])
    return r, clock


def empty(r: Router) -> None:
    """Give back every slot taken."""
    for target in r.targets.values():
        while target.outstanding:
            r.unreserve(target)


def fill(r: Router, urgent: bool = True) -> dict[str, int]:
    """Acquire until nothing is free; how many went to each shard."""
    taken: dict[str, int] = {}
    for _ in range(200):
        target = r.acquire("m", urgent=urgent)
        if target is None:
            return taken
        taken[target.name] = taken.get(target.name, 0) + 1
    raise AssertionError("the router never filled up")


def test_a_gpu_shard_keeps_its_floor_in_flight_however_slow_it_answers() -> None:
    r, clock = gpu_router(gpu_floor=6)
    gpu, cpu = r.target_named("g"), r.target_named("c")
    r.release(r.acquire("m", exclude=cpu), 0.010, ok=True)  # an unloaded latency of 10 ms
    for _ in range(20):  # batching makes every answer slow: AIMD cuts the limit to its minimum
        clock.now += 1.0
        r.release(r.acquire("m", exclude=cpu), 0.200, ok=True)
    assert gpu.limit == 1.0
    assert fill(r) == {"g": 6, "c": 2}  # the GPU shard still takes a full batch's worth, the CPU shard its limit
    assert r.total_slots() == 8


def test_while_the_top_class_is_active_other_classes_get_only_the_urgent_bound_over_a_gpu_floor() -> None:
    r, clock = gpu_router(gpu_floor=8, urgent_bound=3)
    assert fill(r, urgent=False) == {"g": 8, "c": 2}  # no top-class traffic yet: the floor holds
    empty(r)
    r.acquire("m", urgent=True)  # a top-class request is dispatched: the bound holds for a second
    assert fill(r, urgent=False) == {"g": 2, "c": 2}  # 3 in flight at the GPU shard, the top one included
    assert fill(r, urgent=True) == {"g": 5}  # the top class keeps the whole room (the floor)
    gpu = r.target_named("g")
    for _ in range(8):
        r.unreserve(gpu)
    clock.now += 1.1  # no top-class dispatch for longer than the window: the floor again
    assert fill(r, urgent=False) == {"g": 8}


def test_the_urgent_bound_holds_at_a_cpu_shard_too() -> None:
    r, clock = gpu_router(initial=6, urgent_bound=2)
    assert fill(r, urgent=False) == {"g": 6, "c": 6}  # no top-class traffic yet: the limits hold
    empty(r)
    r.acquire("m", exclude=r.target_named("g"), urgent=True)  # a top-class request goes to the CPU shard
    assert fill(r, urgent=False) == {"g": 2, "c": 1}  # 2 in flight at each, the top one included
    assert fill(r, urgent=True) == {"g": 4, "c": 4}  # the top class keeps the whole limit
    clock.now += 1.1  # the window has passed: lower classes get the limit again once slots free
    cpu = r.target_named("c")
    for _ in range(4):
        r.unreserve(cpu)
    assert fill(r, urgent=False) == {"c": 4}


def test_without_a_floor_or_bound_a_gpu_shard_follows_its_adaptive_limit() -> None:
    r, _ = gpu_router()
    r.acquire("m", urgent=True)
    assert fill(r, urgent=False) == {"g": 1, "c": 2}


def test_the_other_classes_room_adapts_to_the_top_class_latency() -> None:
    r, clock = gpu_router(initial=8, slack_ms=100, urgent_tolerance=2.0, urgent_slack_ms=0)  # the limit stays
    cpu = r.target_named("c")
    r.release(r.acquire("m", exclude=r.target_named("g"), urgent=True), 0.010, ok=True, urgent=True)  # unloaded: 10 ms
    for _ in range(5):  # the top class waits 50 ms (behind the others): their room there is cut, once a round trip
        clock.now += 0.1
        r.release(r.acquire("m", exclude=r.target_named("g"), urgent=True), 0.050, ok=True, urgent=True)
    assert cpu.urgent_room == pytest.approx(8 * 0.9 ** 5, rel=0.05)
    assert fill(r, urgent=False) == {"g": 8, "c": 4}  # the other classes get int(4.7) there; the GPU shard: its limit
    empty(r)
    for _ in range(20):  # fast answers to the top class give it back, about one per round trip
        r.release(r.acquire("m", exclude=r.target_named("g"), urgent=True), 0.012, ok=True, urgent=True)
    assert cpu.urgent_room > 6
    clock.now += 1.1  # the top class is gone: the others get the whole limit
    assert fill(r, urgent=False)["c"] == int(cpu.limit)
    assert r.snapshot()[1]["urgent_room"] <= cpu.limit
