"""The bench tool end to end (seconds): open-loop load through the real gateway, a report that adds up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from controlplane.bench.loadgen import Sample, percentile, summarize

from .conftest import ROOT, RunningStack

SCENARIO = """
rate: 60
duration_s: 1
arrivals: constant
flows:
  - {name: critical, weight: 1, priority: critical, api_key: cp-demo-key, deadline_ms: 1000,
     body: {inputs: [{name: x, datatype: FP32, shape: [1, 2], data: [1, 2]}], parameters: {work_ms: 1}}}
  - {name: sheddable, weight: 3, api_key: nope-not-a-key, deadline_ms: 1000,
     body: {inputs: [{name: x, datatype: FP32, shape: [1, 2], data: [1, 2]}], parameters: {work_ms: 1}}}
"""


def test_cpctl_bench_run_reports_per_flow_results(stack: RunningStack, tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(SCENARIO)
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "controlplane.cli", "bench", "run", "-s", str(scenario),
                             "--url", stack.gateway, "-o", str(report), "--json"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    summary = json.loads(report.read_text())
    assert json.loads(result.stdout) == summary  # --json: the report on stdout, nothing else
    assert summary["all"]["sent"] == 60 and summary["intended_rate"] == 60
    critical, sheddable = summary["flows"]["critical"], summary["flows"]["sheddable"]
    assert critical["statuses"] == {"200": critical["sent"]} and critical["ok_p50_ms"] > 0
    assert sheddable["statuses"] == {"401": sheddable["sent"]}  # a wrong key: refused, counted, not a crash
    assert critical["sent"] + sheddable["sent"] == 60


def test_bad_scenario_is_a_one_line_error(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("rate: -5\nduration_s: 1\nflows: []\n")
    result = subprocess.run([sys.executable, "-m", "controlplane.cli", "bench", "run", "-s", str(scenario),
                             "--url", "http://127.0.0.1:9"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {scenario}") and "rate" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_summary_percentiles_goodput_and_shed_reasons() -> None:
    samples = [Sample("a", 200, i / 1000, 0.0, 0.05) for i in range(1, 101)]
    samples += [Sample("a", 429, 0.0005, 0.0, 0.05, "deadline"), Sample("a", 503, 0.01, 0.0, 0.05)]
    summary = summarize(samples, duration_s=2.0)
    assert summary["ok_p50_ms"] == 50 and summary["ok_p99_ms"] == 99
    assert summary["goodput_rps"] == 25.0  # 50 answered within the 50 ms deadline, over 2 s
    assert summary["shed_reasons"] == {"deadline": 1} and summary["errors_5xx"] == 1
    assert percentile([], 99) == 0.0


def test_suite_flood_and_cpu_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cpctl bench suite --only flood,cpu --quick` end to end (one model, ~30 s): the flood's statuses are
    counted, the refused tenant is refused at admission, the results carry `targets`. No speed is asserted."""
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} needed: `make system-deps` installs them (make test runs it)"
    from controlplane.bench import suite

    monkeypatch.setattr(suite, "FLOOD_MODELS", (("5ms", 5),))
    results = suite.run_suite(quick=True, only=["flood", "cpu"], results_dir=tmp_path, log=lambda line: None)
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {f"flood-cpu-{results['date']}.json", f"flood-cpu-{results['date']}.md"}
    assert json.loads((tmp_path / f"flood-cpu-{results['date']}.json").read_text())["targets"] == results["targets"]
    assert all(set(t) == {"name", "value", "target", "met"} for t in results["targets"])
    row = results["flood"]["models"]["5ms"]
    for setup in ("gateway", "nginx", "direct"):
        assert row[setup]["alone"]["sent"] > 0 and row[setup]["flood"]["sent"] > 0
        assert sum(row[setup]["flood_traffic"]["statuses"].values()) > 100  # the flood ran and was counted
    flood = row["gateway"]["flood_traffic"]["statuses"]
    assert set(flood) <= {"200", "429"}, flood  # the gateway's overload contract: served or shed, never 5xx
    cpu = results["cpu"]
    assert cpu["refused"]["statuses"].get("429", 0) >= 0.99 * cpu["refused"]["requests"]  # refused at admission
    assert cpu["admitted"]["requests"] > 0 and cpu["admitted"]["cpu_s"] > 0
    assert cpu["nginx_429"]["statuses"] == {"429": cpu["nginx_429"]["requests"]}  # the floor's reference row
    for kind in ("admitted", "refused", "nginx", "nginx_429"):  # the kernel's part is a part (in clock ticks:
        assert 0 <= cpu[kind]["kernel_us_per_request"] <= cpu[kind]["us_per_request"], cpu[kind]  # may read 0)
    assert results["stack_stopped_on_sigint"]


def test_procstat_reads_this_process() -> None:
    """CPU, kernel CPU and run-queue readings of a live process (this one): the kernel's part is a part of the
    whole, and a process that ran was given a core."""
    import os

    from controlplane.bench import procstat

    sum(range(2_000_000))  # some CPU of its own
    os.stat("/")  # and a system call
    whole, kernel = procstat.total_cpu_seconds([os.getpid()]), procstat.kernel_cpu_seconds([os.getpid()])
    waited, slices = procstat.run_queue([os.getpid()])
    assert 0 <= kernel <= whole and whole > 0
    assert waited >= 0 and slices > 0


def test_wrk_output_parsing_and_gateway_pids() -> None:
    from controlplane.bench.procstat import gateway_pids
    from controlplane.bench.wrk import parse

    out = parse("  2 threads and 64 connections\n  9000 requests in 3.01s, 1.1MB read\n"
                "  Socket errors: connect 0, read 2, write 0, timeout 5\n  Non-2xx or 3xx responses: 40\n"
                "Requests/sec:   2990.03\nSTATUS 200 8960\nSTATUS 429 40\n")
    assert (out.requests, out.seconds, out.rps, out.non_2xx) == (9000, 3.01, 2990.03, 40)
    assert out.statuses == {"200": 8960, "429": 40} and out.socket_errors["timeout"] == 5
    assert gateway_pids({"pid": 10}) == [10]
    assert gateway_pids({"pid": 10, "workers": [11, {"pid": 12}, 11]}) == [11, 12]  # the supervisor serves nothing


def test_scaling_spec_is_valid_and_targets_say_what_was_not_run(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import scaling
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from controlplane.spec import parse_spec

    repository = scaling.model_repository(tmp_path / "models", instances=3)
    assert "count: 3" in (repository / "work" / "config.pbtxt").read_text()
    assert (repository / "work" / "1" / "tensors.py").is_file()  # the model imports it (numpy 1 and 2)
    spec = parse_spec(scaling.spec_text(repository, shards=4, workers=1))  # W=1 needs no `workers` field
    assert spec.shards[0].replicas == 4
    assert "workers: 8" in scaling.spec_text(repository, shards=4, workers=8)
    row = {s: {"ok_rps": rps} for s, rps in (("direct", 100.0), ("nginx", 50.0), ("gateway", 40.0))}
    result = {"config": {"models": [0]}, "workers": {"1": {"0ms": {**row, "gateway_over_nginx": 0.8}},
                                                    "2": {"error": "refused"}}}
    result["efficiency"] = scaling.efficiency(result)
    assert result["efficiency"]["0ms"]["gateway"] == {"1": 1.0}
    targets = scaling.scaling_targets(result)
    assert [t["met"] for t in targets] == [False, False] and all(t["value"] is None for t in targets)
    assert "not run" in targets[0]["name"]


def test_linearity_stand_in_answers_what_triton_answered_and_the_gateway_serves_through_it(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import linearity
        import scaling
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from controlplane.procs import children, free_port

    layout = linearity.core_layout(1, load_cores=1)
    assert len(layout["proxy"]) == 1 and layout["load"] and layout["standin"]
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(layout["proxy"]) & set(layout["load"])  # the proxy's core is its own

    repository = scaling.model_repository(tmp_path / "models", instances=1)
    answers = linearity.record_triton(tmp_path / "record", repository)  # a real tritonserver's answers
    assert json.loads(answers["metadata"])["name"] == "work"
    assert json.loads(answers["infer"])["outputs"][0]["name"] == "y"
    with pytest.raises(RuntimeError, match="would misread"):
        linearity.start_standin(tmp_path / "bad", {**answers, "infer": "{'x': 1}"}, [free_port()], 1)

    ports = [free_port(), free_port()]
    standin = linearity.start_standin(tmp_path / "standin", answers, ports, 1)
    try:
        gateway, url = linearity.start_gateway(tmp_path / "gateway", repository, 1, ports)
        try:
            workers = children(gateway.pid)
            assert len(workers) == 1  # one worker, whose CPU the benchmark counts
            body = json.dumps(linearity.work_body({"work_ms": 0})).encode()
            request = urllib.request.Request(url + "/v2/models/work/infer", data=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {linearity.API_KEY}"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200 and json.loads(answer.read()) == json.loads(answers["infer"])
            wrong = urllib.request.Request(url + "/v2/models/work/infer", data=b'{"inputs": [{"name": "nope"}]}',
                                           headers={"Authorization": f"Bearer {linearity.API_KEY}"})
            with pytest.raises(urllib.error.HTTPError) as refused:  # the gateway still checks against the model
                urllib.request.urlopen(wrong, timeout=10)
            assert refused.value.code == 400
        finally:
            gateway.stop(grace_s=10)
    finally:
        standin.stop(grace_s=2)
    assert gateway.poll() is not None and standin.poll() is not None
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # the workers stopped with it
