"""bench/gpu.py's report: its targets from measured numbers (the run itself needs the GPU machine's minutes;
`python bench/gpu.py OUT --small` runs every step on a CPU in ~2 min)."""

from __future__ import annotations

import importlib.util

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
gpu_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bench)


def results(direct: float, gateway: float, fp16_agreement: float) -> dict:
    return {
        "date": "2026-11-30", "machine": {"gpu": "test"}, "config": {}, "errors": {},
        "ceiling": {"fp16 b64": {"pipeline_graph": {"img_s": 800.0, "ms_per_batch": 80.0}},
                    "fp16 b256": {"pipeline_graph": {"img_s": 1000.0, "ms_per_batch": 256.0}},
                    "fp32 b256": {"pipeline_graph": {"img_s": 5000.0, "ms_per_batch": 51.2}}},
        "serving": {"runs": {"direct fp16 pixels c4": {"img_s": direct / 2},
                             "direct fp16 pixels c16": {"img_s": direct},
                             "gateway fp16 pixels c16": {"img_s": gateway},
                             "gateway fp32 pixels c16": {"img_s": 4000.0}}},
        "convert": {"checks": [{"variant": "r_fp16", "precision": "fp16", "top1_agreement": fp16_agreement,
                                "relative_error": 0.01, "tolerance": 0.02, "classes_seen": 9, "samples": 512},
                               {"variant": "r_bf16", "precision": "bf16", "top1_agreement": 0.995,
                                "relative_error": 0.05, "tolerance": 0.08, "classes_seen": 9, "samples": 512}]},
    }


def test_served_throughput_is_compared_with_the_best_fp16_ceiling() -> None:
    found = {t["name"]: t for t in gpu_bench.targets(results(direct=850.0, gateway=650.0, fp16_agreement=0.98))}
    assert found["direct / in-process ceiling, FP16 img/s"] == {
        "name": "direct / in-process ceiling, FP16 img/s", "value": 0.85, "target": ">= 0.8", "met": True}
    assert found["gateway / in-process ceiling, FP16 img/s"]["value"] == 0.65  # FP32's 4000 does not count
    assert not found["gateway / in-process ceiling, FP16 img/s"]["met"]
    assert not found["convert: FP16 top-1 agreement with FP32"]["met"]
    assert found["convert: BF16 top-1 agreement with FP32"]["met"]
    assert not found["critical P99 at 3x overload / at 0.5x, on the GPU, zero 5xx"]["met"]  # not run: not met


def test_missing_steps_give_unmet_targets_without_values() -> None:
    found = gpu_bench.targets({"ceiling": {}, "serving": {"runs": {}}})
    assert all(t["value"] is None and not t["met"] for t in found)


def test_the_markdown_report_lists_targets_and_runs() -> None:
    data = results(direct=850.0, gateway=650.0, fp16_agreement=0.98)
    data["targets"] = gpu_bench.targets(data)
    text = gpu_bench.markdown(data)
    assert "| direct / in-process ceiling, FP16 img/s | 0.85 | >= 0.8 | yes |" in text
    assert "| fp16 b256 | pipeline_graph | 1000.0 | 256.0 |" in text
    assert "| gateway fp32 pixels c16 | 4000.0 |" in text


def test_the_gateway_worker_imports_without_tritonclient() -> None:
    """The GPU machine has no tritonclient (nothing can be installed there): the gateway must not need it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['tritonclient'] = None; sys.modules['tritonclient.http'] = None; "
            "import controlplane.gateway.worker, controlplane.gateway.workers, controlplane.cli")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def overload(calm_p99: float, over_p99: float, errors_5xx: int) -> dict:
    def multiple(p99: float, errors: int) -> dict:
        flow = {"sent": 10, "ok": 10, "ok_p99_ms": p99}
        return {"flows": {"critical": flow, "sheddable": flow}, "all": {"errors_5xx": errors},
                "generator_lag_p99_ms": 1.0}

    return {"images_per_request": 16, "capacity_rps": 750.0,
            "multiples": {"0.5": multiple(calm_p99, 0), "1": multiple(calm_p99, 0),
                          "3": multiple(over_p99, errors_5xx)}}


def test_the_overload_target_is_critical_p99_at_3x_over_0_5x_with_no_5xx() -> None:
    name = "critical P99 at 3x overload / at 0.5x, on the GPU, zero 5xx"
    data = results(direct=850.0, gateway=650.0, fp16_agreement=0.98)
    found = {t["name"]: t for t in gpu_bench.targets(data | {"overload": overload(20.0, 28.0, 0)})}
    assert found[name]["value"] == 1.4 and found[name]["met"] and found[name]["errors_5xx"] == 0
    found = {t["name"]: t for t in gpu_bench.targets(data | {"overload": overload(20.0, 28.0, 3)})}
    assert found[name]["value"] == 1.4 and not found[name]["met"]  # a 5xx fails it whatever the latency
    found = {t["name"]: t for t in gpu_bench.targets(data | {"overload": overload(18.0, 204.0, 0)})}
    assert found[name]["value"] == 11.333 and not found[name]["met"]


def test_the_ceiling_is_the_best_fp16_mode_of_the_served_work() -> None:
    data = results(direct=850.0, gateway=650.0, fp16_agreement=0.98)
    data["ceiling"]["fp16 b256"]["pipeline_compile"] = {"img_s": 2000.0, "ms_per_batch": 128.0}
    data["ceiling"]["fp16 b256"]["model_graph"] = {"img_s": 5000.0, "ms_per_batch": 51.2}  # the model alone: no
    assert gpu_bench.best_ceiling(data) == ("fp16 b256 pipeline_compile", 2000.0)
    found = {t["name"]: t for t in gpu_bench.targets(data)}
    assert found["direct / in-process ceiling, FP16 img/s"]["value"] == 0.425
    data["overload"] = overload(18.0, 204.0, 0)
    data["targets"] = gpu_bench.targets(data)
    text = gpu_bench.markdown(data)
    assert "Ceiling: fp16 b256 pipeline_compile, 2000.0 img/s." in text
    assert "| 3x | 204.0 (10/10) | - | 204.0 (10/10) | 0 | 1.0 |" in text
