"""The GPU benchmark: ResNet-50 in-process (the ceiling) vs Triton direct vs through the gateway, plus convert.

Meant for the GPU machine (bench/device/gpu.sh runs it there); `--small` runs the same steps on a CPU with a tiny
ResNet on 64 px images, to check the script before spending device time. Steps, each bounded in time:
  1. the machine: GPU, driver, torch, CUDA, Python;
  2. the ceiling, in process, per precision and batch: the model alone on preprocessed device tensors (eager,
     and replayed as a CUDA graph on a GPU), and the served path's work on the same inputs as clients send:
     uint8 images in host memory -> device -> preprocess -> model -> top-1 back (CUDA graph on a GPU);
  3. torchvision's resnet50 weights load into the example's network and give the same outputs (where
     torchvision is importable);
  4. `cpctl up -f examples/gpu/h200.yaml` (the vision variants only), then closed-loop clients (separate
     processes, uint8 images as binary tensors, `--batch` a request) against Triton direct and the gateway, at
     each `--connections` level, after an unrecorded warm-up per model; one JPEG run on each (numpy 1 only:
     under numpy 2 this Triton build's Python backend stub crashes on BYTES inputs);
  5. top-1 agreement of the served FP16/BF16 variants with FP32 on a fixed image set, and `cpctl convert`
     of the same network (fp32, fp16, bf16) verified in its own tritonserver.
Writes OUT/gpu-<date>.{json,md} after every step (a run cut short still leaves what it measured), with
`targets` (issue 11). Torch.compile is not measured (its compile time does not fit the device budget).

    python bench/gpu.py OUT [--small] [--seconds 3] [--batches 64,256] [--connections 4,16]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples" / "models" / "vision" / "1"))

from controlplane.procs import ManagedProcess  # noqa: E402

API_KEY = "cp-demo-key"  # the demo tenant of examples/gpu/h200.yaml
VARIANTS = {"fp16": "vision_fp16", "bf16": "vision_bf16", "fp32": "vision"}
GOALS = {"gateway": 0.7, "direct": 0.8}  # of the in-process ceiling at FP16 (issue 11)
AGREEMENT_GOAL = 0.99


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- 1. the machine ------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    found = {"python": platform.python_version(), "cores": os.cpu_count(), "torch": torch.__version__,
             "cuda": torch.version.cuda, "numpy": np.__version__}
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        found["gpu"] = query.stdout.strip()
    if torch.cuda.is_available():
        found["device"] = torch.cuda.get_device_name(0)
    return found


# --- 2. the ceiling ------------------------------------------------------------------------------------------
def timed(step, batch: int, seconds: float, synchronize) -> dict:
    """img/s and ms per batch of `step` run back to back for `seconds` (after a warm-up)."""
    for _ in range(3):
        step()
    synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    synchronize()
    elapsed = time.perf_counter() - start
    return {"img_s": round(count * batch / elapsed, 1), "ms_per_batch": round(elapsed / count * 1e3, 3)}


def ceiling(arch: str, size: int, batches: list[int], seconds: float) -> dict:
    import torch
    from resnet import PRECISIONS, prepare, preprocess, resnet, sample_images

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    results = {}
    for precision, dtype in PRECISIONS.items():
        model = prepare(resnet(arch), device, precision)
        for batch in batches:
            key = f"{precision} b{batch}"
            images = sample_images(batch, size, seed=batch)
            host = images.pin_memory() if cuda else images
            x = preprocess(images.to(device), size, dtype)
            row = {}
            with torch.inference_mode():
                row["model_eager"] = timed(lambda m=model, x=x: m(x), batch, seconds, synchronize)
                served = {"x": host.to(device)}

                def pipeline(m=model, served=served, host=host, dtype=dtype):
                    served["x"].copy_(host, non_blocking=True)
                    return m(preprocess(served["x"], size, dtype)).argmax(1)

                if cuda:
                    row["model_graph"] = timed(graphed(lambda m=model, x=x: m(x)), batch, seconds, synchronize)
                    replay = graphed(pipeline)
                    row["pipeline_graph"] = timed(lambda r=replay: r().cpu(), batch, seconds, synchronize)
                else:
                    row["pipeline_eager"] = timed(lambda p=pipeline: p().cpu(), batch, seconds, synchronize)
            results[key] = row
            log(f"ceiling {key}: {json.dumps(row)}")
        del model
    return results


def graphed(step):
    """`step` captured as a CUDA graph (after a warm-up on a side stream); returns a replay that gives its output."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()

    def replay():
        graph.replay()
        return output

    return replay


# --- 3. torchvision equivalence ------------------------------------------------------------------------------
def torchvision_check(size: int) -> dict:
    import torch
    from resnet import preprocess, resnet, sample_images

    try:
        import torchvision
    except ImportError:
        return {"checked": False, "why": "torchvision is not importable here"}
    reference = torchvision.models.resnet50(weights=None).eval()
    ours = resnet("resnet50")
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = preprocess(sample_images(4, size, seed=7), size, torch.float32)
    with torch.inference_mode():
        difference = (ours(x) - reference(x)).abs().max().item()
    return {"checked": True, "torchvision": torchvision.__version__, "state_dict_loads_strict": True,
            "max_abs_difference": difference}


# --- 4. serving ----------------------------------------------------------------------------------------------
def model_repository(directory: Path, arch: str, size: int) -> Path:
    """The vision variants, with the benchmark's architecture and image size in their configs."""
    for name in VARIANTS.values():
        target = directory / name
        shutil.copytree(ROOT / "examples" / "models" / name, target, symlinks=False)
        config = (target / "config.pbtxt").read_text()
        config = config.replace('string_value: "resnet50"', f'string_value: "{arch}"')
        (target / "config.pbtxt").write_text(config.replace('string_value: "224"', f'string_value: "{size}"'))
    return directory


def spec_text(repository: Path, workers: int) -> str:
    spec = yaml.safe_load((ROOT / "examples" / "gpu" / "h200.yaml").read_text())
    spec["model_repository"] = str(repository)
    spec["models"] = [m for m in spec["models"] if m["name"] in VARIANTS.values()]
    spec["shards"][0]["models"] = list(VARIANTS.values())
    spec["gateway"].update(port=0, workers=workers)
    return yaml.safe_dump(spec, sort_keys=False)


def run_clients(url: str, model: str, body: Path, connections: int, seconds: float, headers: dict[str, str],
                workdir: Path) -> dict:
    """`connections` closed-loop connections over up to 4 client processes; their counts summed."""
    clients = min(4, connections)
    connections //= clients
    started = []
    for i in range(clients):
        out = workdir / f"client-{model}-{i}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "client", url, model, str(body), str(connections),
                str(seconds), json.dumps(headers), str(out)]
        started.append((ManagedProcess(argv, log_path=workdir / f"client-{i}.log"), out))
    reports = []
    for process, out in started:
        deadline = time.monotonic() + seconds + 60
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        process.stop(grace_s=1)
        reports.append(json.loads(out.read_text()) if out.exists() else {"error": process.log_tail(500)})
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        return {"error": errors[0]}
    latencies = sorted(x for r in reports for x in r["latencies_ms"])
    elapsed = max(r["seconds"] for r in reports)
    first_error = next((r["first_error"] for r in reports if r.get("first_error")), None)
    return {"img_s": round(sum(r["images"] for r in reports) / elapsed, 1), "requests": len(latencies),
            "statuses": _sum_counts([r["statuses"] for r in reports]), "first_error": first_error,
            "p50_ms": _percentile(latencies, 0.5), "p99_ms": _percentile(latencies, 0.99),
            "clients": clients, "connections": clients * connections}


def client_main(url: str, model: str, body_file: Path, connections: int, seconds: float, headers: str,
                out: Path) -> None:
    """One load process: closed loop on `connections` keep-alive connections, the same request each time."""
    from controlplane.bench.client import ClientError, HttpClient

    request = json.loads(body_file.with_suffix(".json").read_text())
    body, batch = body_file.read_bytes(), request["batch"]
    headers = {**json.loads(headers), **request["headers"]}
    latencies, statuses, images, first_error = [], {}, 0, None

    async def loop(client: HttpClient, stop: float) -> None:
        nonlocal images, first_error
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                response = await client.request("POST", f"/v2/models/{model}/infer", body, headers)
                status = str(response.status)
                if status != "200" and first_error is None:
                    first_error = response.body[:400].decode(errors="replace")
            except (ClientError, TimeoutError) as exc:
                status = type(exc).__name__
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                images += batch
                latencies.append(round((time.perf_counter() - start) * 1e3, 2))

    async def main() -> float:
        client = HttpClient.for_url(url, timeout_s=30)
        start = time.monotonic()
        await asyncio.gather(*(loop(client, start + seconds) for _ in range(connections)))
        client.close()
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    out.write_text(json.dumps({"images": images, "seconds": elapsed, "statuses": statuses, "latencies_ms": latencies,
                               "first_error": first_error}))


def request_files(workdir: Path, size: int, batch: int) -> dict[str, Path]:
    """The request bodies the clients send: uint8 pixels, and JPEG bytes (quality 90) of the same images."""
    import io

    from PIL import Image
    from resnet import sample_images

    from controlplane.bench.tensors import infer_body

    images = sample_images(batch, size, seed=1).numpy()
    jpegs = []
    for image in images:
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, format="JPEG", quality=90)
        jpegs.append(encoded.getvalue())
    files = {}
    for kind, inputs in (("pixels", {"pixels": images}), ("jpeg", {"jpeg": jpegs})):
        request = infer_body(inputs, ["top1"])
        path = workdir / f"{kind}.bin"
        path.write_bytes(request.body)
        path.with_suffix(".json").write_text(json.dumps({"batch": batch, "headers": request.headers}))
        files[kind] = path
    return files


def serving(args: argparse.Namespace, workdir: Path, results: dict, save) -> None:
    from scaling import Stack

    repository = model_repository(workdir / "models", args.arch, args.size)
    started = time.monotonic()
    stack = Stack(workdir / "stack", spec_text(repository, args.workers), timeout_s=300)
    try:
        state = stack.state()
        shard = state["shards"][0]["url"]
        results["serving"] = {"start_s": round(time.monotonic() - started, 1), "shard": state["shards"][0]["name"],
                              "gateway_workers": len(state.get("workers", [])), "batch": args.batch, "runs": {}}
        log(f"stack up in {results['serving']['start_s']} s: gateway {state['gateway']}, shard {shard}")
        files = request_files(workdir, args.size, args.batch)
        agreement_inputs(shard, args, results)
        save()
        auth = {"Authorization": f"Bearer {API_KEY}"}
        levels = [int(c) for c in args.connections.split(",")]
        for precision, model in VARIANTS.items():
            # Not recorded: cuDNN tunes each new batch size that dynamic batching forms (benchmark mode).
            run_clients(shard, model, files["pixels"], max(levels), 2.0, {}, workdir)
            for setup, url, headers in (("direct", shard, {}), ("gateway", state["gateway"], auth)):
                for connections in levels:
                    run = run_clients(url, model, files["pixels"], connections, args.seconds, headers, workdir)
                    results["serving"]["runs"][f"{setup} {precision} pixels c{connections}"] = run
                    log(f"{setup} {precision} c{connections}: {json.dumps(run)}")
                    save()
        if int(np.__version__.split(".")[0]) >= 2:
            results["serving"]["jpeg"] = ("not run: under numpy 2 this Triton build's Python backend stub crashes on "
                                          "any BYTES input (it reads garbage lengths) before the model's code runs")
        else:
            for setup, url, headers in (("direct", shard, {}), ("gateway", state["gateway"], auth)):
                run = run_clients(url, VARIANTS["fp16"], files["jpeg"], min(levels), args.seconds, headers, workdir)
                results["serving"]["runs"][f"{setup} fp16 jpeg c{min(levels)}"] = run
                log(f"{setup} fp16 jpeg: {json.dumps(run)}")
        gpu_metrics = _get(state["shards"][0]["metrics_url"])
        results["serving"]["triton_gpu_metrics"] = [line for line in gpu_metrics.splitlines()
                                                    if line.startswith(("nv_gpu_utilization", "nv_gpu_memory"))][:8]
        # The gateway's GPU telemetry after the load: NVML per GPU, the shard's Triton, the models' CUDA allocators.
        gateway_metrics = _get(f"{state['gateway']}/metrics")
        results["serving"]["gateway_gpu_metrics"] = [
            line for line in gateway_metrics.splitlines()
            if line.startswith(("cp_gpu_", "cp_shard_gpu_", "cp_shard_cuda_", "cp_shard_metrics_up"))][:40]
    finally:
        stack.close()


# --- 5. agreement --------------------------------------------------------------------------------------------
def agreement_inputs(shard: str, args: argparse.Namespace, results: dict) -> None:
    """Top-1 of the served FP16 and BF16 variants vs the FP32 one, on a fixed set of seeded images."""
    from resnet import sample_images

    from controlplane.bench.tensors import infer_body, read_outputs

    images = sample_images(args.samples, args.size, seed=12345).numpy()
    top1 = {}
    for precision, model in VARIANTS.items():
        parts = []
        for start in range(0, len(images), 64):
            request = infer_body({"pixels": images[start:start + 64]}, ["top1"])
            status, headers, body = _post(shard, f"/v2/models/{model}/infer", request.body, request.headers)
            if status != 200:
                raise RuntimeError(f"{model}: HTTP {status}: {body[:300]!r}")
            parts.append(read_outputs(body, int(headers["Inference-Header-Content-Length"]))["top1"].ravel())
        top1[precision] = np.concatenate(parts)
    results["served_agreement"] = {
        "samples": len(images), "distinct_fp32_classes": int(len(set(top1["fp32"].tolist()))),
        **{precision: float(np.mean(top1[precision] == top1["fp32"])) for precision in ("fp16", "bf16")}}
    log(f"served top-1 agreement: {results['served_agreement']}")


def convert_check(args: argparse.Namespace, workdir: Path) -> dict:
    from controlplane.convert.entry import Serving, write_entry
    from controlplane.convert.source import load
    from controlplane.convert.verify import verify

    factory = "resnet50" if args.arch == "resnet50" else "resnet_tiny"
    source = load(f"{ROOT}/examples/models/vision/1/resnet.py:{factory}", [f"images:fp32:3x{args.size}x{args.size}"],
                  ["logits"])
    variants = write_entry(source, workdir / "converted", "resnet", ["fp32", "fp16", "bf16"], Serving(max_batch=64))
    # The comparison set: the seeded images, preprocessed (the network's input), not noise.
    import torch
    from resnet import preprocess, sample_images

    images = preprocess(sample_images(args.samples, args.size, seed=12345), args.size, torch.float32).numpy()
    checks = verify(source, workdir / "converted", variants, samples=args.samples, batch=64, inputs=[images])
    return {"checks": [{**c.__dict__, "passed": c.passed} for c in checks]}


# --- report --------------------------------------------------------------------------------------------------
def targets(results: dict) -> list[dict]:
    found = []
    best = max((row.get("pipeline_graph", row.get("pipeline_eager", {})).get("img_s", 0)
                for key, row in results.get("ceiling", {}).items() if key.startswith("fp16")), default=0)
    runs = results.get("serving", {}).get("runs", {})
    for setup, goal in GOALS.items():
        served = max((run.get("img_s") or 0 for key, run in runs.items() if key.startswith(f"{setup} fp16 pixels")),
                     default=None)
        ratio = served / best if served and best else None
        found.append(_target(f"{setup} / in-process ceiling, FP16 img/s", ratio, f">= {goal}",
                             ratio is not None and ratio >= goal))
    checks = results.get("convert", {}).get("checks", [])
    for precision in ("fp16", "bf16"):
        agree = next((c["top1_agreement"] for c in checks if c["precision"] == precision), None)
        found.append(_target(f"convert: {precision.upper()} top-1 agreement with FP32", agree,
                             f">= {AGREEMENT_GOAL}", agree is not None and agree >= AGREEMENT_GOAL))
    found.append(_target("critical P99 at 3x overload / at 0.5x, on the GPU, zero 5xx", None, "<= 1.5",
                         False) | {"note": "not run in this benchmark"})
    return found


def markdown(results: dict) -> str:
    lines = [f"# GPU benchmark {results['date']}", "", f"Machine: `{json.dumps(results['machine'])}`", "",
             f"Config: `{json.dumps(results['config'])}`", "", "## Targets", "", "| target | value | goal | met |",
             "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'no'} |"
              for t in results["targets"]]
    lines += ["", "## In-process ceiling (img/s; ms per batch)", "", "| precision, batch | mode | img/s | ms |",
              "|---|---|---|---|"]
    for key, row in results.get("ceiling", {}).items():
        lines += [f"| {key} | {mode} | {m['img_s']} | {m['ms_per_batch']} |" for mode, m in row.items()]
    lines += ["", "## Served (closed loop, uint8 images or JPEG as binary tensors)", "",
              "| run | img/s | P50 ms | P99 ms | statuses |", "|---|---|---|---|---|"]
    for key, run in results.get("serving", {}).get("runs", {}).items():
        lines.append(f"| {key} | {run.get('img_s')} | {run.get('p50_ms')} | {run.get('p99_ms')} | "
                     f"{run.get('statuses', run.get('error'))} {run.get('first_error') or ''} |")
    lines += ["", "## Agreement", "", f"Served variants vs FP32: `{json.dumps(results.get('served_agreement'))}`", ""]
    for c in results.get("convert", {}).get("checks", []):
        lines.append(f"- convert {c['variant']} ({c['precision']}): relative error {c['relative_error']:.3g} "
                     f"(tolerance {c['tolerance']}), top-1 agreement {c['top1_agreement']} "
                     f"({c['classes_seen']} classes seen), {c['samples']} samples")
    lines += ["", f"torchvision check: `{json.dumps(results.get('torchvision'))}`", "",
              f"Errors: `{json.dumps(results.get('errors', {}))}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        url, model, body, connections, seconds, headers, out = argv[1:8]
        client_main(url, model, Path(body), int(connections), float(seconds), headers, Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--small", action="store_true", help="resnet-tiny on 64 px images (a CPU check)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batches", default="64,256", help="ceiling batch sizes")
    parser.add_argument("--batch", type=int, default=64, help="images per request of the clients")
    parser.add_argument("--connections", default="4,16", help="closed-loop connections of the served runs (each)")
    parser.add_argument("--workers", type=int, default=4, help="gateway workers")
    parser.add_argument("--samples", type=int, default=512, help="images of the agreement set")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: ceiling,torchvision,serving,convert")
    args = parser.parse_args(argv)
    if not 0.5 <= args.seconds <= 30 or max(int(c) for c in args.connections.split(",")) > 256 \
            or args.samples > 10_000:
        parser.error("bounds: 0.5 <= seconds <= 30, connections <= 256, samples <= 10000")
    args.arch, args.size = ("resnet-tiny", 64) if args.small else ("resnet50", 224)
    skip = set(args.skip.split(",")) - {""}
    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    results = {"date": date, "machine": machine(), "config": {k: v for k, v in vars(args).items() if k != "out"}
               | {"out": None}, "errors": {}}

    def save() -> None:
        results["targets"] = targets(results)
        (args.out / f"gpu-{date}.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / f"gpu-{date}.md").write_text(markdown(results))

    log(f"machine: {results['machine']}")
    with tempfile.TemporaryDirectory(prefix="cpctl-gpu-bench-") as tmp:
        steps = [("ceiling", lambda: ceiling(args.arch, args.size, [int(b) for b in args.batches.split(",")],
                                             args.seconds)),
                 ("torchvision", lambda: torchvision_check(args.size)),
                 ("serving", lambda: serving(args, Path(tmp), results, save)),
                 ("convert", lambda: convert_check(args, Path(tmp)))]
        for name, step in steps:
            if name in skip:
                continue
            started = time.monotonic()
            try:
                value = step()
                if value is not None:
                    results[name] = value
            except Exception as exc:  # a failed step is recorded and the next one still runs
                results["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
                log(f"{name} failed: {results['errors'][name]}")
            log(f"{name}: {time.monotonic() - started:.1f} s")
            save()
    log(f"targets: {json.dumps(results['targets'])}")


def _target(name: str, value: float | None, goal: str, met: bool) -> dict:
    return {"name": name, "value": None if value is None else round(value, 3), "target": goal, "met": bool(met)}


def _percentile(values: list[float], p: float) -> float | None:
    return values[min(len(values) - 1, int(len(values) * p))] if values else None


def _sum_counts(counts: list[dict]) -> dict:
    total: dict[str, int] = {}
    for count in counts:
        for key, n in count.items():
            total[key] = total.get(key, 0) + n
    return total


def _post(base: str, path: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(base + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


if __name__ == "__main__":
    main()
