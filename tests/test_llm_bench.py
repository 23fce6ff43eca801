"""bench/llm.py's report: its targets from measured numbers (the run itself needs the GPU machine's minutes;
`python bench/llm.py OUT --small --parts overload --tokens 8 --overload 0.3 --rounds 2 --phase-s 3 --critical-rate 2
--critical-tokens 4` runs the overload on a CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("llm_bench", ROOT / "bench" / "llm.py")
llm_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llm_bench)


def run(tokens_per_s: float, ttft_p99_ms: float = 100.0, statuses: dict | None = None) -> dict:
    return {"tokens": 1000, "seconds": 1.0, "tokens_per_s": tokens_per_s, "ttft_p50_ms": 50.0, "ttft_p90_ms": 80.0,
            "ttft_p99_ms": ttft_p99_ms, "itl_p50_ms": 10.0, "itl_p99_ms": 20.0, "sequences": 102,
            "statuses": statuses or {"200": 4}}


def mixed(variant: str, critical_ms: float, errors: int) -> dict:
    return {**llm_bench.variant_settings(variant), "critical": run(0, ttft_p99_ms=critical_ms),
            "standard": run(0, statuses={"200": 10, "429": 5, "502": errors}),
            "stages": {"llm_1of4": {"steps": 10, "mean_batch": 5.0, "queue_ms": 6.2, "compute_ms": 21.0}},
            "gate": {"llm_0_batch/standard": {"steps": 100, "held": 90, "mean_wait_ms": 56.0}}}


def results(four: float, one: float, critical_loaded_ms: float, errors: int, compared: dict | None = None) -> dict:
    variants = {**(compared or {}), "0+batch": critical_loaded_ms}
    return {"date": "2026-11-30", "device": "test", "config": "7b", "tokens": 64,
            "baseline": {"1": run(100.0), "32": run(900.0)},
            "served": {"1": {"32": run(one)}, "4": {"32": run(four)}},
            "overload": {"critical_rate_per_s": 2.8, "critical_tokens": 16, "critical_per_phase": 34, "rounds": 3,
                         "standard_clients": 96, "flood_tokens": 64,
                         "alone": {"critical": run(0, ttft_p99_ms=100.0), "stages": {}, "gate": {}},
                         "mixed": {variant: mixed(variant, ms, errors) for variant, ms in variants.items()}}}


def test_targets_met() -> None:
    found = {t["name"]: t for t in llm_bench.targets(results(500.0, 550.0, 140.0, 0))}
    assert [t["met"] for t in found.values()] == [True, True, True, True]
    assert found["4 shards, 32 sequences: tokens/s over the baseline one at a time"]["value"] == 5.0
    assert found["critical TTFT P99 under overload over alone, step gate 0+batch"]["value"] == 1.4


def test_targets_missed_are_reported_as_missed() -> None:
    found = llm_bench.targets(results(300.0, 500.0, 200.0, 3))
    assert [(t["value"], t["met"]) for t in found] == [(3.0, False), (0.6, False), (2.0, False), (3, False)]


def test_each_compared_step_gate_setting_has_its_own_ratio_and_all_count_for_5xx() -> None:
    found = llm_bench.targets(results(500.0, 550.0, 140.0, 1, compared={"off": 285.0}))
    assert [(t["name"].rsplit(" ", 1)[-1], t["value"], t["met"]) for t in found[2:4]] == [
        ("off", 2.85, False), ("0+batch", 1.4, True)]
    assert found[-1]["value"] == 2  # one 502 in each setting's flood


def test_report_is_written_with_its_targets_and_the_overload_tables(tmp_path: Path) -> None:
    llm_bench.write(tmp_path, results(500.0, 550.0, 140.0, 0))
    written = json.loads((tmp_path / "llm-2026-11-30.json").read_text())
    assert len(written["targets"]) == 4
    table = (tmp_path / "llm-2026-11-30.md").read_text()
    assert "| 4 shard(s) via the gateway | 32 | 500.0 |" in table
    assert "| baseline (transformers generate, a batch of N) | 1 | 100.0 |" in table
    assert "| beside the flood | 0+batch | 102 | 50.0 | 80.0 | 140.0 |" in table  # samples, P50, P90, P99
    assert "| beside the flood | 0+batch | llm_1of4 | 10 | 5.0 | 6.2 | 21.0 |" in table
    assert "| beside the flood | 0+batch | llm_0_batch/standard | 100 | 90 | 56.0 |" in table


def test_the_p99_of_a_hundred_values_is_the_99th_not_the_largest() -> None:
    values = [float(v) for v in range(1, 101)]
    assert llm_bench.percentile(values, 0.99) == 99.0
    assert llm_bench.percentile(values, 0.5) == 50.0
    assert llm_bench.percentile([7.0], 0.99) == 7.0


def test_a_step_gate_setting_is_read_or_named_as_wrong() -> None:
    assert llm_bench.variant_settings("off") == {"urgent_steps_per_stage": None, "one_batch_per_stage": False,
                                                 "one_stage_at_a_time": False}
    assert llm_bench.variant_settings("2+batch") == {"urgent_steps_per_stage": 2, "one_batch_per_stage": True,
                                                     "one_stage_at_a_time": False}
    assert llm_bench.variant_settings("0+batch+stage") == {"urgent_steps_per_stage": 0, "one_batch_per_stage": True,
                                                           "one_stage_at_a_time": True}
    assert llm_bench.overload_pipeline("0+batch") == "llm_0_batch"
    for wrong in ("0+fast", "0+batch+batch", "fast+batch"):
        with pytest.raises(ValueError, match="expected off or N, then \\+batch and/or \\+stage"):
            llm_bench.variant_settings(wrong)
