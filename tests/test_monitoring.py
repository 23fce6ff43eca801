"""The shipped monitoring (deploy/monitoring/): the Prometheus rules pass promtool's check and its unit tests,
and every expression of the rules and of the Grafana dashboard reads series the gateway exports (or the rules
record), so a renamed metric breaks a test instead of a dashboard."""

from __future__ import annotations

import json
import re
import subprocess

import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane.gateway.metrics import GatewayMetrics
from controlplane.gpu.telemetry import AllocatorReading, DeviceReading, ShardReading, Telemetry

from .conftest import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
OUR_SERIES = re.compile(r"\bcp[_:][A-Za-z0-9_:]*")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)


def exported_series() -> set[str]:
    """Every series name the gateway's /metrics has when each of its families holds a sample."""
    metrics = GatewayMetrics()
    metrics.requests["critical", "demo", "completed"] += 1
    metrics.shed["sheddable", "demo", "rate"] += 1
    metrics.latency["critical"].observe(0.01)
    metrics.queue_wait["critical"].observe(0.001)
    telemetry = Telemetry(None, [DeviceReading(0, "GPU-0", "NVIDIA H200", "gpu", 1, 2, 0.5)], [ShardReading(
        "gpu0-0", True, gpus=[{"uuid": "GPU-0", "utilization": 0.5, "memory_used_bytes": 1, "memory_total_bytes": 2}],
        allocators=[AllocatorReading("vision", "cuda:0", 4, 1)])])
    overload = {"level": 0, "pressure": {"cpu": 0.1}, "held_connections": 0,
                "actions": [{"action": "connection_held", "class": "sheddable", "count": 1}]}
    text = metrics.render([{"class": "critical", "queued": 0}],
                          [{"name": "gpu0-0", "in_flight": 0, "limit": 4, "urgent_room": 4, "ejections": 0,
                            "served": 0}], 0, overload,
                          [{"worker": 0, "responses": 1, "connections": 0}], telemetry.to_dict()).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def rule_groups() -> list[dict]:
    return yaml.safe_load((MONITORING / "prometheus-rules.yml").read_text())["groups"]


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", "prometheus-rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 15 rules found" in checked.stdout
    tested = promtool("test", "rules", "rules-test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_rule_reads_series_we_export_or_record() -> None:
    rules = [rule for group in rule_groups() for rule in group["rules"]]
    known = exported_series() | {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        used = set(OUR_SERIES.findall(rule["expr"]))
        assert used, f"{rule}: reads none of our series"
        assert used <= known, f"{rule.get('record') or rule['alert']}: unknown series {sorted(used - known)}"


def test_every_dashboard_query_reads_series_we_export_or_record() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    recorded = {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}
    known = exported_series() | recorded
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(queries) >= 10
    for title, expr in queries:
        used = set(OUR_SERIES.findall(expr))
        assert used and used <= known, f"panel {title!r}: {expr} reads unknown series {sorted(used - known)}"
    shown = {name for _, expr in queries for name in OUR_SERIES.findall(expr)}
    gpu_series = {"cp_gpu_utilization_ratio", "cp:gpu_memory_used:ratio", "cp_shard_gpu_utilization_ratio",
                  "cp_shard_cuda_reserved_bytes", "cp_shard_cuda_allocated_bytes", "cp_shard_cuda_fragmentation_ratio"}
    assert gpu_series <= shown  # the GPU telemetry is on the dashboard
