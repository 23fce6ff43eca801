"""The GPU benchmark: ResNet-50 in-process (the ceiling) vs Triton direct vs through the gateway, and more.

Meant for the GPU machine (bench/device/gpu.sh runs it there); `--small` runs the same steps on a CPU with a tiny
ResNet on 64 px images, to check the script before spending device time. Steps, each bounded in time, in the
order of their importance (a run cut short keeps what came first):
  1. the machine: GPU, driver, torch, CUDA, Python;
  2. the ceiling, in process, per precision and batch: the model alone on preprocessed device tensors (eager,
     and replayed as a CUDA graph on a GPU), and the served path's work on the same inputs as clients send:
     uint8 images in host memory -> device -> preprocess -> model -> top-1 back (CUDA graph on a GPU);
  3. torchvision's resnet50 weights load into the example's network and give the same outputs (where
     torchvision is importable); then the network trained for `--train-seconds` on a synthetic labelled set
     (examples/models/vision/train.py): the weights every served variant and `cpctl convert` use, so that
     precisions are compared on confident, varied predictions;
  4. `cpctl up -f examples/gpu/h200.yaml` (the vision variants, `--instances` instances of the FP16 one, and risk),
     then closed-loop clients (separate processes, uint8 images as binary tensors, `--batch` a request) against
     Triton direct and the gateway, after an unrecorded warm-up per model; per run, where the time went: Triton's
     statistics per request (queue, input, infer, output), batches formed, GPU utilization (NVML, sampled), CPU
     cores used by the gateway and by Triton, and how each vision instance runs its batches (compiled,
     CUDA graphs: its lines in tritonserver's log); the same with JPEG bytes (decoded on the GPU) when the stubs' numpy
     reads BYTES (numpy 1: CPCTL_STUB_PYTHON, bench/device/stub_env.sh); the mixed-priority overload scenario
     through the gateway (the CPU suite's mix and capacity search, on small images that the GPU resizes); risk
     FP32 vs FP16; `cpctl gpu tune` of vision (FP32 and FP16 variants, the seed's start included); with
     `--variants` / `--overload-variants`, the same throughput runs / overload multiples through other gateways
     in front of the same shard, each with one concurrency setting changed (GATEWAY_VARIANTS);
  5. torch.compile of the served path's work in process (a separate process, bounded: compiling takes a while);
     the best in-process mode is the ceiling;
  6. top-1 agreement of `cpctl convert`'s variants (fp32, fp16, bf16, and fp8 where the GPU has FP8) of the
     trained network, verified in their own tritonserver on the fixed labelled set.
Writes OUT/gpu-<date>.{json,md} after every step, with `targets` (issue 11).

    python bench/gpu.py OUT [--small] [--seconds 3] [--batches 64,256] [--connections 8,32] [--skip convert]
        [--serve-precisions fp16] [--variants floor0,floor96] [--overload-variants bound8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples" / "models" / "vision" / "1"))
sys.path.insert(0, str(ROOT / "examples" / "models" / "vision"))  # train.py

from controlplane.gateway.diagnostics import timeline_summary  # noqa: E402
from controlplane.procs import ManagedProcess  # noqa: E402

API_KEY = "cp-demo-key"  # the demo tenant of examples/gpu/h200.yaml
VARIANTS = {"fp16": "vision_fp16", "bf16": "vision_bf16", "fp32": "vision"}
RISK = ("risk", "risk_fp16")
RISK_BATCH = 64
OVERLOAD_MULTIPLES = (0.5, 1, 2, 3)  # the CPU suite's
OVERLOAD_GOAL = 1.5
GOALS = {"gateway": 0.7, "direct": 0.8}  # of the in-process ceiling at FP16 (issue 11)
# Other gateways on the same shard, one setting changed from examples/gpu/h200.yaml's (`--variants` for the
# throughput runs, `--overload-variants` for the overload multiples): what that setting does on its own.
GATEWAY_VARIANTS = {**{f"floor{n}": {"gpu_floor": n} for n in (0, 24, 48, 96, 192)},
                    **{f"bound{n}": {"urgent_bound": n} for n in (6, 8, 12)}}
AGREEMENT_GOAL = 0.99
AGREEMENT_SEED = 12345  # the fixed comparison set: labelled_images(samples, size, seed=AGREEMENT_SEED)


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


def served_work(model, host, size: int, dtype, device):
    """The served path's work on `host` uint8 images: copy to the device, preprocess, model, top-1."""
    from resnet import preprocess

    staged = host.to(device)

    def work():
        staged.copy_(host, non_blocking=True)
        return model(preprocess(staged, size, dtype)).argmax(1)

    return work


def ceiling(arch: str, size: int, batches: list[int], seconds: float, precisions: list[str]) -> dict:
    import torch
    from resnet import PRECISIONS, capture, prepare, preprocess, resnet, sample_images

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    results = {}
    for precision in precisions:
        dtype = PRECISIONS[precision]
        model = prepare(resnet(arch), device, precision)
        # FP16 (the targets' precision) at every batch size; the others at the largest only (device time).
        for batch in batches if precision == "fp16" else batches[-1:]:
            key = f"{precision} b{batch}"
            images = sample_images(batch, size, seed=batch)
            host = images.pin_memory() if cuda else images
            x = preprocess(images.to(device), size, dtype)
            row = {}
            with torch.inference_mode():
                row["model_eager"] = timed(lambda m=model, x=x: m(x), batch, seconds, synchronize)
                work = served_work(model, host, size, dtype, device)
                if cuda:
                    row["model_graph"] = timed(capture(lambda m=model, x=x: m(x)), batch, seconds, synchronize)
                    replay = capture(work)
                    row["pipeline_graph"] = timed(lambda r=replay: r().cpu(), batch, seconds, synchronize)
                else:
                    row["pipeline_eager"] = timed(lambda w=work: w().cpu(), batch, seconds, synchronize)
            results[key] = row
            log(f"ceiling {key}: {json.dumps(row)}")
        del model
    return results


def compiled_ceiling(args: argparse.Namespace, workdir: Path, results: dict) -> dict:
    """torch.compile of the served path's work (FP16, the largest batch) in its own process, bounded in time:
    compiling ResNet-50 takes tens of seconds. Its rows join results["ceiling"]."""
    batch = int(args.batches.split(",")[-1])
    out = workdir / "compiled.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "compiled", args.arch, str(args.size), str(batch),
            str(args.seconds), str(out)]
    process = ManagedProcess(argv, log_path=workdir / "compiled.log")
    deadline = time.monotonic() + args.compile_timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.stop(grace_s=2)
    if not out.exists():
        raise RuntimeError(f"torch.compile run gave no result in {args.compile_timeout_s:g} s: "
                           f"{process.log_tail(800)}")
    found = json.loads(out.read_text())
    results.setdefault("ceiling", {}).setdefault(f"fp16 b{batch}", {}).update(found["modes"])
    return found


def compiled_main(arch: str, size: int, batch: int, seconds: float, out: Path) -> None:
    """One process: the served path's work compiled by torch.compile (default mode), then that compiled work
    replayed as a CUDA graph on a GPU; what it measured goes to `out`, whatever failed is named there."""
    import torch
    from resnet import PRECISIONS, capture, prepare, resnet, sample_images

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cudnn.benchmark = True
    model = prepare(resnet(arch), device, "fp16")
    dtype = PRECISIONS["fp16"]
    images = sample_images(batch, size, seed=batch)
    host = images.pin_memory() if cuda else images
    found: dict = {"modes": {}, "errors": {}}
    with torch.inference_mode():
        started = time.monotonic()
        compiled = torch.compile(served_work(model, host, size, dtype, device))
        compiled()
        found["compile_s"] = round(time.monotonic() - started, 1)
        found["modes"]["pipeline_compile"] = timed(lambda: compiled().cpu(), batch, seconds, synchronize)
        out.write_text(json.dumps(found))
        if cuda:
            try:
                replay = capture(compiled)
                found["modes"]["pipeline_compile_graph"] = timed(lambda: replay().cpu(), batch, seconds, synchronize)
            except Exception as exc:  # recorded: the compiled graph may not be capturable
                found["errors"]["pipeline_compile_graph"] = f"{type(exc).__name__}: {exc}"[:500]
    out.write_text(json.dumps(found))


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


def trained_weights(args: argparse.Namespace, workdir: Path) -> dict:
    """The network trained briefly on the GPU (train.py); its state dict goes to workdir/vision-weights.pt."""
    import torch
    from train import train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, report = train(args.arch, args.size, device, args.train_seconds, max_steps=2000 if device == "cuda" else 40,
                          batch=64 if device == "cuda" else 32)
    torch.save(model.state_dict(), workdir / "vision-weights.pt")
    return report


# --- 4. serving ----------------------------------------------------------------------------------------------
def model_repository(directory: Path, args: argparse.Namespace, weights: Path | None) -> Path:
    """The vision variants (with the benchmark's architecture and image size, the trained `weights` when there
    are; `--instances` instances of the FP16 variant, whose speed the targets are about, one of the others; only
    the FP16 variant compiles (`--compile-batches`), the others run CUDA graphs: each compile costs start-up
    time on the device) and risk."""
    for precision, name in served_variants(args).items():
        target = directory / name
        shutil.copytree(ROOT / "examples" / "models" / name, target, symlinks=False)
        config = (target / "config.pbtxt").read_text()
        config = config.replace('string_value: "resnet50"', f'string_value: "{args.arch}"')
        config = config.replace('string_value: "224"', f'string_value: "{args.size}"')
        if weights is not None:
            config = config.replace('{ key: "weights", value: { string_value: "" } }',
                                    f'{{ key: "weights", value: {{ string_value: "{weights}" }} }}')
        compile_batches = args.compile_batches if precision == "fp16" else ""
        config = config.replace('string_value: "64,128,256"', f'string_value: "{compile_batches}"')
        (target / "config.pbtxt").write_text(config.replace("instance_group [ { count: 1 } ]",
                                                            f"instance_group [ {{ count: "
                                                            f"{args.instances if precision == 'fp16' else 1} }} ]"))
    for name in RISK:
        shutil.copytree(ROOT / "examples" / "models" / name, directory / name, symlinks=False)
    return directory


def served_variants(args: argparse.Namespace) -> dict[str, str]:
    """The vision variants the stack serves (`--serve-precisions`): each one costs start-up time on the device."""
    return {p: m for p, m in VARIANTS.items() if p in args.serve_precisions.split(",")}


def spec_text(repository: Path, workers: int, served_models: list[str], concurrency: dict | None = None) -> str:
    served = [*served_models, *RISK]
    spec = yaml.safe_load((ROOT / "examples" / "gpu" / "h200.yaml").read_text())
    spec["model_repository"] = str(repository)
    spec["models"] = [m for m in spec["models"] if m["name"] in served]
    for model in spec["models"]:  # the ladder's smaller-batch variant is not served here
        model.pop("smaller_batch_variant", None)
    spec["shards"][0]["models"] = served
    spec["gateway"].update(port=0, workers=workers)
    spec["gateway"]["concurrency"].update(concurrency or {})
    return yaml.safe_dump(spec, sort_keys=False)


def variant_spec(repository: Path, args: argparse.Namespace, name: str) -> str:
    """The benchmark's spec with the concurrency setting of GATEWAY_VARIANTS[name] changed."""
    return spec_text(repository, args.workers, list(served_variants(args).values()), GATEWAY_VARIANTS[name])


class VariantGateway:
    """`cpctl gateway` of `spec` (e.g. the benchmark's with one setting changed), in front of the running stack's
    shard (its static backend), on a free port, with `env` added; stopped (SIGTERM, then by PID) on leaving."""

    def __init__(self, workdir: Path, name: str, state: dict, spec_yaml: str, env: dict | None = None) -> None:
        from urllib.parse import urlsplit

        from controlplane.procs import free_port

        shard = state["shards"][0]
        address = urlsplit(shard["url"])
        spec, endpoints = workdir / f"gateway-{name}.yaml", workdir / f"endpoints-{name}.json"
        spec.write_text(spec_yaml)
        endpoints.write_text(json.dumps([{"name": shard["name"], "host": address.hostname, "port": address.port,
                                          "models": shard["models"], "gpu": True}]))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = ManagedProcess([sys.executable, "-m", "controlplane.cli", "gateway", "-f", str(spec),
                                       "--endpoints", str(endpoints), "--port", str(port)],
                                      env={**os.environ, **(env or {})}, log_path=workdir / f"gateway-{name}.log",
                                      cwd=ROOT)

    def __enter__(self) -> VariantGateway:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(f"{self.url}/v2/health/ready") is not None:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.stop(grace_s=1)
                raise RuntimeError(f"variant gateway did not start: {self.process.log_tail(800)}")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """Its worker processes (started in their own sessions: found as children, not as a process group)."""
        found, parents = [], [self.process.pid]
        while parents and len(found) < 256:
            for children in Path(f"/proc/{parents.pop()}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    pids = [int(pid) for pid in children.read_text().split()]
                    found += pids
                    parents += pids
        return found or [self.process.pid]

    def __exit__(self, *exc: object) -> None:
        self.process.popen.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.popen.wait(timeout=15)
        self.process.stop(grace_s=1)


class ServerSide:
    """Where a run's time went, read around it: Triton's statistics of the model (per request: queue, input,
    infer, output; batches formed), GPU utilization sampled through NVML, CPU cores used by the gateway's
    processes and by tritonserver (its stubs, which do the model's Python work, are not counted)."""

    def __init__(self, state: dict, model: str) -> None:
        from controlplane.bench import procstat

        self.procstat = procstat
        self.state, self.model, self.url = state, model, state["shards"][0]["url"]
        self.gateway_pids = procstat.gateway_pids(state)
        self.triton_pid = int(state["shards"][0]["pid"])
        self.samples: list[int] = []
        self.stop = threading.Event()

    def __enter__(self) -> ServerSide:
        self.before = (self._stats(), self.procstat.total_cpu_seconds(self.gateway_pids),
                       self.procstat.cpu_seconds(self.triton_pid), time.monotonic(),
                       self.procstat.thread_cpu_seconds(self.triton_pid))
        self.sampler = threading.Thread(target=self._sample_gpu, daemon=True)
        self.sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.sampler.join(timeout=5)
        stats, gateway_cpu, triton_cpu, now = (self._stats(), self.procstat.total_cpu_seconds(self.gateway_pids),
                                               self.procstat.cpu_seconds(self.triton_pid), time.monotonic())
        elapsed = now - self.before[3]
        self.found = {"gateway_cores": round((gateway_cpu - self.before[1]) / elapsed, 2),
                      "triton_cores": round((triton_cpu - self.before[2]) / elapsed, 2),
                      # its busiest threads: one near 1.0 is an HTTP thread reading every body alone
                      "triton_busiest_threads": self.procstat.busiest_threads(
                          self.before[4], self.procstat.thread_cpu_seconds(self.triton_pid), elapsed),
                      "gpu_util_mean": round(sum(self.samples) / len(self.samples), 1) if self.samples else None,
                      **_stats_delta(self.before[0], stats)}

    def _stats(self) -> dict:
        return json.loads(_get(f"{self.url}/v2/models/{self.model}/stats"))["model_stats"][0]

    def _sample_gpu(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML here (a CPU machine): no GPU utilization to report
            return
        while not self.stop.wait(0.2):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def model_log_lines(stack_dir: Path) -> list[str]:
    """What the vision instances said at load (compiled or CUDA graphs, and how long): tritonserver's log."""
    lines = []
    for log_file in sorted(stack_dir.glob("run/*/logs/*.log")):
        lines += [line.strip()[:400] for line in log_file.read_text(errors="replace").splitlines()
                  if line.startswith("vision: ")]
    return lines[:20]


def _stats_delta(before: dict, after: dict) -> dict:
    """Per request ms of Triton's phases and the batches formed, between two reads of the statistics extension."""
    def delta(phase: str, field: str) -> int:
        return int(after["inference_stats"][phase][field]) - int(before["inference_stats"][phase][field])

    requests = delta("success", "count")
    executions = int(after["execution_count"]) - int(before["execution_count"])
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    found = {"requests": requests, "executions": executions,
             "images_per_execution": round(inferences / executions, 1) if executions else None}
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        found[f"{phase}_ms"] = round(delta(phase, "ns") / requests / 1e6, 2) if requests else None
    return found


def run_clients(url: str, model: str, body: Path, connections: int, seconds: float, headers: dict[str, str],
                workdir: Path, clients: int = 4) -> dict:
    """`connections` closed-loop connections over up to `clients` client processes; their counts summed."""
    clients = min(clients, connections)
    connections //= clients
    started = []
    for i in range(clients):
        out = workdir / f"client-{model}-{i}.json"
        out.unlink(missing_ok=True)
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


def write_request(workdir: Path, kind: str, inputs: dict, outputs: list[str], batch: int) -> Path:
    """A binary request body the clients send (`kind`.bin) and its headers and row count (`kind`.json)."""
    from controlplane.bench.tensors import infer_body

    request = infer_body(inputs, outputs)
    path = workdir / f"{kind}.bin"
    path.write_bytes(request.body)
    path.with_suffix(".json").write_text(json.dumps({"batch": batch, "headers": request.headers}))
    return path


def request_files(workdir: Path, size: int, batch: int) -> dict[str, Path]:
    """The request bodies: uint8 pixels, JPEG bytes (quality 90) of the same images, risk's features."""
    import io

    from PIL import Image
    from resnet import sample_images

    images = sample_images(batch, size, seed=1).numpy()
    jpegs = []
    for image in images:
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, format="JPEG", quality=90)
        jpegs.append(encoded.getvalue())
    features = np.random.default_rng(5).standard_normal((RISK_BATCH, 16)).astype(np.float32)
    return {"pixels": write_request(workdir, "pixels", {"pixels": images}, ["top1"], batch),
            "jpeg": write_request(workdir, "jpeg", {"jpeg": jpegs}, ["top1"], batch),
            "risk": write_request(workdir, "risk", {"features": features}, ["score"], RISK_BATCH)}


def stubs_read_bytes() -> tuple[bool, str]:
    """Whether the Python-backend stubs' numpy is 1.x (this Triton build's stub misreads BYTES under numpy 2)."""
    from controlplane.shards.triton import stub_python

    python = stub_python()
    found = subprocess.run([str(python), "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                           text=True, timeout=60)
    version = found.stdout.strip() or found.stderr.strip()[-200:]
    return version.startswith("1."), f"{python}: numpy {version}"


def serving(args: argparse.Namespace, workdir: Path, results: dict, save, skip: set[str]) -> None:
    from scaling import Stack

    weights = workdir / "vision-weights.pt"
    repository = model_repository(workdir / "models", args, weights if weights.exists() else None)
    served_models = list(served_variants(args).values())
    started = time.monotonic()
    # Loading waits for the first vision_fp16 instance to compile its batch sizes (the others then read the cache).
    timelines = workdir / "timelines"
    if args.timeline:  # the gateways (and only they) read it: controlplane/gateway/diagnostics.py
        os.environ["CPCTL_GATEWAY_TIMELINE"] = str(timelines)
    stack = Stack(workdir / "stack", spec_text(repository, args.workers, served_models), timeout_s=300,
                  up_args=("--ready-timeout", "270"))
    try:
        state = stack.state()
        shard, gateway = state["shards"][0]["url"], state["gateway"]
        served = results["serving"] = {
            "start_s": round(time.monotonic() - started, 1), "shard": state["shards"][0]["name"],
            "gateway_workers": len(state.get("workers", [])), "batch": args.batch, "instances": args.instances,
            "runs": {}}
        served["model_log"] = model_log_lines(workdir / "stack")
        log(f"stack up in {served['start_s']} s: gateway {gateway}, shard {shard}; {served['model_log']}")
        files = request_files(workdir, args.size, args.batch)
        if "agreement" not in skip:
            agreement_inputs(shard, args, results)
        save()
        auth = {"Authorization": f"Bearer {API_KEY}"}
        levels = [int(c) for c in args.connections.split(",")]

        def measured(name: str, url: str, model: str, body: Path, connections: int, headers: dict,
                     gateway_pids: list[int] | None = None) -> None:
            begun = time.monotonic()
            with ServerSide(state | {"workers": gateway_pids} if gateway_pids else state, model) as server:
                run = run_clients(url, model, body, connections, args.seconds, headers, workdir, args.clients)
            served["runs"][name] = run | {"server": server.found}
            if args.timeline and url != shard:  # where its large requests waited inside the gateway
                served["runs"][name]["timeline"] = timeline_summary(timelines, (begun, time.monotonic()))
            log(f"{name}: {json.dumps(served['runs'][name])}")
            save()

        for precision, model in served_variants(args).items():
            # Not recorded: the first seconds of traffic on a model are not its speed (allocations, caches).
            run_clients(shard, model, files["pixels"], max(levels), 2.0, {}, workdir, args.clients)
            for setup, url, headers in (("direct", shard, {}), ("gateway", gateway, auth)):
                # FP16 (the targets' precision) at every level; the others at the highest only (device time).
                for connections in levels if precision == "fp16" else levels[-1:]:
                    measured(f"{setup} {precision} pixels c{connections}", url, model, files["pixels"], connections,
                             headers)
        if "jpeg" not in skip:
            reads_bytes, served["stub_numpy"] = stubs_read_bytes()
            if not reads_bytes:
                served["jpeg"] = ("not run: the Python backend stubs run numpy 2, under which this Triton build's "
                                  "stub crashes on any BYTES input (set CPCTL_STUB_PYTHON: bench/device/stub_env.sh)")
            else:
                for setup, url, headers in (("direct", shard, {}), ("gateway", gateway, auth)):
                    measured(f"{setup} fp16 jpeg c{levels[-1]}", url, VARIANTS["fp16"], files["jpeg"], levels[-1],
                             headers)
        for name in filter(None, args.variants.split(",")):
            try:
                with VariantGateway(workdir, name, state, variant_spec(repository, args, name)) as variant:
                    for connections in levels[-2:]:
                        measured(f"gateway-{name} fp16 pixels c{connections}", variant.url, VARIANTS["fp16"],
                                 files["pixels"], connections, auth, variant.pids())
            except Exception as exc:  # recorded; the next step still runs
                results["errors"][f"variant {name}"] = f"{type(exc).__name__}: {exc}"[:2000]
        served["triton_gpu_metrics"] = [line for line in _get(state["shards"][0]["metrics_url"]).splitlines()
                                        if line.startswith(("nv_gpu_utilization", "nv_gpu_memory"))][:8]
        # The gateway's GPU telemetry after the load: NVML per GPU, the shard's Triton, the models' CUDA allocators.
        served["gateway_gpu_metrics"] = [
            line for line in _get(f"{gateway}/metrics").splitlines()
            if line.startswith(("cp_gpu_", "cp_shard_gpu_", "cp_shard_cuda_", "cp_shard_metrics_up"))][:40]
        save()
        def overload_variants() -> dict:
            found = {}
            capacity = results.get("overload", {}).get("capacity_rps")
            for name in filter(None, args.overload_variants.split(",")):
                with VariantGateway(workdir, name, state, variant_spec(repository, args, name)) as variant:
                    found[name] = overload_on_gpu(variant.url, args, capacity)
                    save()
            return found

        for name, step in (("overload", lambda: overload_on_gpu(gateway, args)),
                           ("overload_variants", overload_variants),
                           ("risk", lambda: risk_runs(shard, files["risk"], args, workdir)),
                           ("tune", lambda: tune_vision(shard, args, workdir))):
            if name in skip or (name == "overload_variants" and "overload" in skip):
                continue
            begun = time.monotonic()
            try:
                results[name] = step()
            except Exception as exc:  # recorded; the next step still runs
                results["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"{name}: {time.monotonic() - begun:.1f} s {json.dumps(results.get(name))[:3000]}")
            save()
    finally:
        stack.close()


def overload_on_gpu(gateway: str, args: argparse.Namespace, capacity: float | None = None) -> dict:
    """The CPU suite's mixed-priority overload scenario (its mix, its capacity search, its multiples) on the GPU,
    through the gateway: each request `--overload-batch` 32 px images of vision_fp16 (resized to the network's
    size on the GPU: the GPU's work is the full network's, while the load generator stays able to offer 3x)."""
    from resnet import sample_images

    from controlplane.bench.loadgen import Flow
    from controlplane.bench.suite import MIX, find_capacity, open_loop
    from controlplane.bench.tensors import infer_body

    request = infer_body({"pixels": sample_images(args.overload_batch, 32, seed=3).numpy()}, ["top1"])
    flows = [Flow(name=name, weight=weight, model=VARIANTS["fp16"], priority=name, api_key=API_KEY,
                  deadline_ms=deadline, binary_body=request.body, binary_headers=request.headers)
             for name, weight, deadline in MIX]
    if capacity is None:
        capacity = find_capacity([gateway], flows, log, start=args.overload_start)["rate"]
    if capacity <= 0:
        raise RuntimeError(f"no rate from {args.overload_start:g} req/s down met the capacity test (P99 within the "
                           "SLO, 97% answered): lower --overload-start or --overload-batch")
    found: dict = {"images_per_request": args.overload_batch, "capacity_rps": capacity, "multiples": {}}
    for multiple in OVERLOAD_MULTIPLES:
        # The generator's own pauses were in the 2x row of 2026-12-01 (lag P99 172 ms): no collector pass while
        # it sends (its objects live for one run of a few seconds).
        gc.collect()
        gc.disable()
        try:
            summary = open_loop([gateway], capacity * multiple, args.overload_seconds, flows)
        finally:
            gc.enable()
        found["multiples"][str(multiple)] = {"flows": summary["flows"], "all": summary["all"],
                                             "generator_lag_p99_ms": summary["generator_lag_p99_ms"]}
        log(f"  {multiple}x: " + "  ".join(f"{c} P99 {f['ok_p99_ms']:.0f} ms ok {f['ok']}/{f['sent']}"
                                           for c, f in summary["flows"].items())
            + f"  5xx {summary['all']['errors_5xx']}")
    return found


def risk_runs(shard: str, body: Path, args: argparse.Namespace, workdir: Path) -> dict:
    """risk (FP32) vs risk_fp16 on the GPU, Triton direct, closed loop: rows scored per second and latency."""
    return {model: run_clients(shard, model, body, args.connections_risk, args.seconds, {}, workdir, args.clients)
            for model in RISK}


def tune_vision(shard: str, args: argparse.Namespace, workdir: Path) -> dict:
    """`cpctl gpu tune vision` with its FP16 variant on the running shard (the seed's start, batch 32 FP32 on an
    H200, is among the points), bounded in time; its --json report."""
    out = workdir / "tune.json"
    argv = [sys.executable, "-m", "controlplane.cli", "gpu", "tune", VARIANTS["fp32"], "--url", shard,
            "--variants", VARIANTS["fp16"], "--max-batch", args.tune_batches, "--queue-delay-us", "2000",
            "--instances", args.tune_instances, "--batch", "16", "--rate", str(args.tune_rate),
            "--seconds", str(args.seconds), "--p99-ms", "200", "--json", "-o", str(workdir / "tuned.pbtxt")]
    process = ManagedProcess(argv, log_path=out, cwd=ROOT)
    deadline = time.monotonic() + args.tune_timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    finished = process.poll() is not None
    process.stop(grace_s=2)
    text = out.read_text()
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        raise RuntimeError(f"tune {'failed' if finished else 'ran out of time'}: {text[-1500:]}") from None


# --- 5. agreement --------------------------------------------------------------------------------------------
def agreement_inputs(shard: str, args: argparse.Namespace, results: dict) -> None:
    """Top-1 of the served FP16 and BF16 variants vs the FP32 one, on the fixed labelled set (and each one's
    accuracy on its labels: the trained network's, or chance for the seeded one)."""
    from train import labelled_images

    from controlplane.bench.tensors import infer_body, read_outputs

    images, labels = labelled_images(args.samples, args.size, seed=AGREEMENT_SEED)
    images, labels = images.numpy(), labels.numpy()
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
        **{precision: float(np.mean(top1[precision] == top1["fp32"])) for precision in ("fp16", "bf16")},
        "accuracy": {precision: float(np.mean(top1[precision] == labels)) for precision in VARIANTS}}
    log(f"served top-1 agreement: {results['served_agreement']}")


def convert_check(args: argparse.Namespace, workdir: Path) -> dict:
    from controlplane.convert.entry import Serving, write_entry
    from controlplane.convert.fp8 import fp8_unavailable
    from controlplane.convert.source import load
    from controlplane.convert.verify import verify

    weights = workdir / "vision-weights.pt"
    factory = workdir / "trained_vision.py"  # the trained network as a `file.py:factory` source
    factory.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'examples/models/vision/1')!r})\n"
                       "from resnet import resnet\n\n\n"
                       f"def trained():\n    return resnet({args.arch!r}, "
                       f"{str(weights) if weights.exists() else None!r})\n")
    source = load(f"{factory}:trained", [f"images:fp32:3x{args.size}x{args.size}"], ["logits"])
    no_fp8 = fp8_unavailable()
    precisions = ["fp32", "fp16", "bf16"] + ([] if no_fp8 else ["fp8"])
    variants = write_entry(source, workdir / "converted", "resnet", precisions, Serving(max_batch=64))
    # The comparison set: the fixed labelled images, preprocessed (the network's input), not noise.
    import torch
    from resnet import preprocess
    from train import labelled_images

    images = preprocess(labelled_images(args.samples, args.size, seed=AGREEMENT_SEED)[0], args.size,
                        torch.float32).numpy()
    checks = verify(source, workdir / "converted", variants, samples=args.samples, batch=64, inputs=[images])
    return {"checks": [{**c.__dict__, "passed": c.passed} for c in checks], "fp8_not_run": no_fp8}


# --- report --------------------------------------------------------------------------------------------------
def best_ceiling(results: dict) -> tuple[str | None, float]:
    """The in-process ceiling: the best FP16 img/s of the served path's work (any batch, any mode)."""
    rows = [(f"{key} {mode}", m["img_s"]) for key, row in results.get("ceiling", {}).items() if key.startswith("fp16")
            for mode, m in row.items() if mode.startswith("pipeline")]
    return max(rows, key=lambda row: row[1], default=(None, 0.0))


def targets(results: dict) -> list[dict]:
    found = []
    _, best = best_ceiling(results)
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
    multiples = results.get("overload", {}).get("multiples", {})
    calm, over = multiples.get("0.5"), multiples.get("3")
    ratio = None
    if calm and over and calm["flows"].get("critical", {}).get("ok_p99_ms"):
        ratio = over["flows"]["critical"]["ok_p99_ms"] / calm["flows"]["critical"]["ok_p99_ms"]
    errors_5xx = sum(m["all"]["errors_5xx"] for m in multiples.values())
    found.append(_target("critical P99 at 3x overload / at 0.5x, on the GPU, zero 5xx", ratio,
                         f"<= {OVERLOAD_GOAL}", ratio is not None and ratio <= OVERLOAD_GOAL and errors_5xx == 0)
                 | {"errors_5xx": errors_5xx if multiples else None})
    return found


def overload_table(overload: dict, label: str) -> list[str]:
    lines = ["", f"## Mixed-priority overload on the GPU (through the gateway{label}; capacity "
             f"{overload['capacity_rps']} req/s of {overload['images_per_request']} images)", "",
             "| multiple | critical P99 ms (ok/sent) | standard P99 ms (ok/sent) | sheddable P99 ms (ok/sent) | "
             "5xx | generator lag P99 ms |", "|---|---|---|---|---|---|"]
    for multiple, m in overload["multiples"].items():
        cells = [f"{m['flows'][c]['ok_p99_ms']:.1f} ({m['flows'][c]['ok']}/{m['flows'][c]['sent']})"
                 if c in m["flows"] else "-" for c in ("critical", "standard", "sheddable")]
        lines.append(f"| {multiple}x | {' | '.join(cells)} | {m['all']['errors_5xx']} | {m['generator_lag_p99_ms']} |")
    return lines


def markdown(results: dict) -> str:
    lines = [f"# GPU benchmark {results['date']}", "", f"Machine: `{json.dumps(results['machine'])}`", "",
             f"Config: `{json.dumps(results['config'])}`", "", "## Targets", "", "| target | value | goal | met |",
             "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'no'} |"
              for t in results["targets"]]
    best_key, best = best_ceiling(results)
    lines += ["", "## In-process ceiling (img/s; ms per batch)", "", f"Ceiling: {best_key}, {best} img/s.", "",
              "| precision, batch | mode | img/s | ms |", "|---|---|---|---|"]
    for key, row in results.get("ceiling", {}).items():
        lines += [f"| {key} | {mode} | {m['img_s']} | {m['ms_per_batch']} |" for mode, m in row.items()]
    compiled = results.get("compiled")
    if compiled:
        errors = {mode: " ".join(text.split())[:300] for mode, text in compiled["errors"].items()}
        lines += ["", f"torch.compile: compile {compiled.get('compile_s')} s, errors `{json.dumps(errors)}`"]
    serving = results.get("serving", {})
    lines += ["", f"## Served (closed loop, {serving.get('batch')} images a request as binary tensors; "
              f"{serving.get('instances')} instances of vision_fp16, 1 of the others)", "",
              "Server side per run: Triton's per-request ms (queue / input / infer / output), images per execution, "
              "mean GPU utilization (NVML), CPU cores used by the gateway and by tritonserver.", "",
              "| run | img/s | P50 ms | P99 ms | statuses | queue/in/infer/out ms | img/exec | GPU % | gw cores | "
              "triton cores |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, run in serving.get("runs", {}).items():
        side = run.get("server", {})
        phases = "/".join(str(side.get(f"{p}_ms")) for p in ("queue", "compute_input", "compute_infer",
                                                               "compute_output"))
        lines.append(f"| {key} | {run.get('img_s')} | {run.get('p50_ms')} | {run.get('p99_ms')} | "
                     f"{run.get('statuses', run.get('error'))} {run.get('first_error') or ''} | {phases} | "
                     f"{side.get('images_per_execution')} | {side.get('gpu_util_mean')} | "
                     f"{side.get('gateway_cores')} | {side.get('triton_cores')} |")
    if serving.get("model_log"):
        lines += ["", "How the vision instances run their batches (tritonserver's log at load):", ""]
        lines += [f"- `{line}`" for line in serving["model_log"]]
    if "jpeg" in serving or "stub_numpy" in serving:
        lines += ["", f"JPEG: {serving.get('jpeg', 'run (above)')}; stubs' Python: {serving.get('stub_numpy')}"]
    overloads = {"": results.get("overload"),
                 **{f", gateway {name}: {GATEWAY_VARIANTS[name]}": found
                    for name, found in (results.get("overload_variants") or {}).items()}}
    for label, overload in overloads.items():
        if overload:
            lines += overload_table(overload, label)
    risk = results.get("risk")
    if risk:
        lines += ["", f"## risk FP32 vs FP16 on the GPU (Triton direct, {RISK_BATCH} rows a request)", "",
                  "| model | rows/s | P50 ms | P99 ms | statuses |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {r.get('img_s')} | {r.get('p50_ms')} | {r.get('p99_ms')} | {r.get('statuses')} |"
                  for m, r in risk.items()]
    tune = results.get("tune")
    if tune:
        lines += ["", "## cpctl gpu tune vision (FP32 and FP16 variants)", "",
                  f"GPU `{tune.get('gpu')}`; seed's start `{json.dumps(tune.get('seed_default'))}`; "
                  f"best `{json.dumps(tune.get('best'))}`", "",
                  "| model, max batch, instances | goodput/s | P99 ms | ok/sent | 5xx |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.get('model')} b{r.get('max_batch')} x{r.get('instances')} | {r.get('goodput_rps')} | "
                  f"{r.get('p99_ms')} | {r.get('ok')}/{r.get('sent')} | {r.get('errors_5xx')} |"
                  for r in tune.get("points", [])]
    lines += ["", "## Agreement", "", f"Network trained for the comparison: `{json.dumps(results.get('trained'))}`",
              "", f"Served variants vs FP32: `{json.dumps(results.get('served_agreement'))}`", ""]
    for c in results.get("convert", {}).get("checks", []):
        lines.append(f"- convert {c['variant']} ({c['precision']}): relative error {c['relative_error']:.3g} "
                     f"(tolerance {c['tolerance']}), top-1 agreement {c['top1_agreement']} "
                     f"({c['classes_seen']} classes seen), {c['samples']} samples")
    if results.get("convert", {}).get("fp8_not_run"):
        lines.append(f"- convert fp8: not run ({results['convert']['fp8_not_run']})")
    lines += ["", f"torchvision check: `{json.dumps(results.get('torchvision'))}`", "",
              f"Errors: `{json.dumps(results.get('errors', {}))}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        url, model, body, connections, seconds, headers, out = argv[1:8]
        client_main(url, model, Path(body), int(connections), float(seconds), headers, Path(out))
        return
    if argv and argv[0] == "compiled":
        arch, size, batch, seconds, out = argv[1:6]
        compiled_main(arch, int(size), int(batch), float(seconds), Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--small", action="store_true", help="resnet-tiny on 64 px images (a CPU check)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batches", default="64,256", help="ceiling batch sizes (the last: torch.compile's)")
    parser.add_argument("--precisions", default="fp16,bf16,fp32", help="ceiling precisions")
    parser.add_argument("--batch", type=int, default=64, help="images per request of the clients")
    parser.add_argument("--connections", default="8,32", help="closed-loop connections of the served runs (each)")
    parser.add_argument("--clients", type=int, default=8, help="client processes at most")
    parser.add_argument("--instances", type=int, default=6, help="Triton instances of vision_fp16 (others: 1); 6 "
                        "served 0.95 of the ceiling on the H200, 3 and 4 0.69-0.77 (gpu-2026-12-01-run6.md)")
    parser.add_argument("--workers", type=int, default=4, help="gateway workers")
    parser.add_argument("--samples", type=int, default=512, help="images of the agreement set")
    parser.add_argument("--overload-batch", type=int, default=16, help="images per request of the overload mix")
    parser.add_argument("--overload-start", type=float, default=100.0, help="the capacity search's first rate")
    parser.add_argument("--overload-seconds", type=float, default=4.0, help="seconds per overload multiple")
    parser.add_argument("--connections-risk", type=int, default=8, help="closed-loop connections of the risk runs")
    parser.add_argument("--tune-batches", default="64,256", help="max batch sizes `cpctl gpu tune` tries")
    parser.add_argument("--tune-instances", default="2", help="instance counts `cpctl gpu tune` tries")
    parser.add_argument("--tune-rate", type=float, default=300.0, help="req/s (16 images each) tune offers "
                        "(800 was more than any point served within its P99: gpu-2026-12-01-tune-rate800.md)")
    parser.add_argument("--tune-timeout-s", type=float, default=150.0)
    parser.add_argument("--compile-timeout-s", type=float, default=150.0)
    parser.add_argument("--compile-batches", default="64,128,256",
                        help="batch sizes vision_fp16 compiles at load ('': CUDA graphs only)")
    parser.add_argument("--train-seconds", type=float, default=20.0, help="training of the compared network")
    parser.add_argument("--serve-precisions", default="fp16,bf16,fp32", help="vision variants served (fp16 always)")
    parser.add_argument("--variants", default="", help=f"other gateways' throughput runs: {','.join(GATEWAY_VARIANTS)}")
    parser.add_argument("--timeline", action="store_true",
                        help="per gateway run, where its requests waited inside the gateway (CPCTL_GATEWAY_TIMELINE)")
    parser.add_argument("--overload-variants", default="", help="other gateways' overload multiples (e.g. bound6)")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: ceiling,torchvision,trained,"
                        "serving,agreement,jpeg,overload,risk,tune,compile,convert")
    args = parser.parse_args(argv)
    if not 0.5 <= args.seconds <= 30 or max(int(c) for c in args.connections.split(",")) > 256 \
            or args.samples > 10_000 or not 1 <= args.instances <= 8 or not 1 <= args.clients <= 32:
        parser.error("bounds: 0.5 <= seconds <= 30, connections <= 256, samples <= 10000, 1 <= instances <= 8, "
                     "1 <= clients <= 32")
    unknown = {v for v in f"{args.variants},{args.overload_variants}".split(",") if v} - set(GATEWAY_VARIANTS)
    if unknown or "fp16" not in args.serve_precisions.split(","):
        parser.error(f"unknown variants {sorted(unknown)} (known: {', '.join(GATEWAY_VARIANTS)}); "
                     "--serve-precisions must include fp16")
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
                                             args.seconds, args.precisions.split(","))),
                 ("compiled", lambda: compiled_ceiling(args, Path(tmp), results)),
                 ("torchvision", lambda: torchvision_check(args.size)),
                 ("trained", lambda: trained_weights(args, Path(tmp))),
                 ("serving", lambda: serving(args, Path(tmp), results, save, skip)),
                 ("convert", lambda: convert_check(args, Path(tmp)))]
        for name, step in steps:
            if name in skip or (name == "compiled" and "compile" in skip):
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
