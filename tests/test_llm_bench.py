"""bench/llm.py's report: its targets from measured numbers (the run itself needs the GPU machine's minutes;
`python bench/llm.py OUT --small --concurrency 1,2 --tokens 8 --requests-per-client 1 --overload 0.1` runs every
step on a CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("llm_bench", ROOT / "bench" / "llm.py")
llm_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llm_bench)


def run(tokens_per_s: float, ttft_p99_ms: float = 100.0, statuses: dict | None = None) -> dict:
    return {"tokens": 1000, "seconds": 1.0, "tokens_per_s": tokens_per_s, "ttft_p50_ms": 50.0,
            "ttft_p99_ms": ttft_p99_ms, "itl_p50_ms": 10.0, "itl_p99_ms": 20.0, "statuses": statuses or {"200": 4}}


def results(four: float, one: float, critical_loaded_ms: float, errors: int) -> dict:
    return {"date": "2026-11-30", "device": "test", "config": "7b", "tokens": 64,
            "baseline": {"1": run(100.0), "32": run(900.0)},
            "served": {"1": {"32": run(one)}, "4": {"32": run(four)}},
            "overload": {"critical_clients": 4, "standard_clients": 96, "critical_alone": run(0, ttft_p99_ms=100.0),
                         "mixed": {"critical": run(0, ttft_p99_ms=critical_loaded_ms),
                                   "standard": run(0, statuses={"200": 10, "429": 5, "502": errors})}}}


def test_targets_met() -> None:
    found = {t["name"]: t for t in llm_bench.targets(results(500.0, 550.0, 140.0, 0))}
    assert [t["met"] for t in found.values()] == [True, True, True, True]
    assert found["4 shards, 32 sequences: tokens/s over the baseline one at a time"]["value"] == 5.0
    assert found["critical TTFT P99 under overload over alone"]["value"] == 1.4


def test_targets_missed_are_reported_as_missed() -> None:
    found = llm_bench.targets(results(300.0, 500.0, 200.0, 3))
    assert [(t["value"], t["met"]) for t in found] == [(3.0, False), (0.6, False), (2.0, False), (3, False)]


def test_report_is_written_with_its_targets(tmp_path: Path) -> None:
    llm_bench.write(tmp_path, results(500.0, 550.0, 140.0, 0))
    written = json.loads((tmp_path / "llm-2026-11-30.json").read_text())
    assert len(written["targets"]) == 4
    table = (tmp_path / "llm-2026-11-30.md").read_text()
    assert "| 4 shard(s) via the gateway | 32 | 500.0 |" in table
    assert "| baseline (transformers generate, a batch of N) | 1 | 100.0 |" in table
    assert "| overload: critical beside the flood | 4 |" in table
