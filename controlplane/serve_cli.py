"""`cpctl up|gateway|status|top|infer|validate|hash-key`: the serving room's commands, one Typer app (`serve_app`)
whose commands controlplane/cli.py puts at the top level.

`up` owns the local run state (controlplane/runstate.py) that `status` and `infer` read; `gateway` runs the
same runtime as it runs in a cluster pod and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from controlplane.clikit import FAILED, JSON_OPTION, SPEC_OPTION, area_app, console, fail, load, print_json
from controlplane.spec import hash_api_key

if TYPE_CHECKING:  # both import the gateway: loaded only by the commands that serve
    from controlplane.gpu.telemetry import Telemetry
    from controlplane.runstate import RunState
    from controlplane.stack import ServingStack

serve_app = area_app("Serve a spec's models: shards behind the gateway, and the commands that talk to them.")
ENDPOINTS_OPTION = typer.Option(None, "--endpoints", help="shards_backend `static`: JSON list of shards: name, host, "
                                "port, models.")


@serve_app.command()
def validate(spec_file: Path = SPEC_OPTION) -> None:
    """Check a spec file; print each problem as FILE:LINE: FIELD: WHAT.

    Example: cpctl validate -f examples/local/cluster.yaml
    """
    spec = load(spec_file)
    replicas = sum(s.replicas for s in spec.shards)
    console.print(f"[green]ok[/green] {spec_file}: cluster '{spec.cluster}', {len(spec.models)} models, "
                  f"{len(spec.shards)} shards ({replicas} replicas), {len(spec.priority_classes)} classes, "
                  f"{len(spec.tenants)} tenants")


@serve_app.command("hash-key")
def hash_key(key: str = typer.Argument(..., help="The API key to store for a tenant.")) -> None:
    """Print the SHA-256 of an API key, the form `tenants[].api_key_sha256` stores.

    Example: cpctl hash-key cp-demo-key
    """
    console.print(hash_api_key(key))


@serve_app.command()
def up(
    spec_file: Path = SPEC_OPTION,
    port: int = typer.Option(None, help="Gateway port (default: the spec's; 0 picks a free one)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log every shard state change."),
    ready_timeout: float = typer.Option(60.0, "--ready-timeout", min=1.0,
                                        help="Seconds the shards have to load their models (large models: more)."),
) -> None:
    """Start the spec's Triton shards and the gateway, show live status until Ctrl-C, then stop everything.

    Example: cpctl up -f examples/local/cluster.yaml --port 8000
    """
    from controlplane.runstate import RunState, StackAlreadyRunning, run_dir_for
    from controlplane.shards.local import LocalShards, ShardStartError
    from controlplane.shards.triton import TritonNotFound
    from controlplane.stack import ServingStack

    spec = load(spec_file)
    logging.basicConfig(level=logging.INFO if verbose or not console.is_terminal else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    run = RunState(run_dir_for(spec))
    try:
        run.claim(spec.cluster)
        shards = LocalShards(spec, run.run_dir, ready_timeout_s=ready_timeout)
    except StackAlreadyRunning as exc:
        fail(str(exc), FAILED)
    except TritonNotFound as exc:
        fail(str(exc))
    except OSError as exc:  # the run directory cannot be written
        fail(f"run directory {run.run_dir}: {exc.strerror or exc} (set CPCTL_RUN_DIR to a writable folder)", FAILED)
    stack = ServingStack(spec, shards, port, worker_log_dir=run.logs, on_change=lambda: run.write(stack.snapshot()))
    console.print(f"starting cluster '{spec.cluster}' (logs in {run.logs}) ...")
    try:
        _run(stack, run)
    except (ShardStartError, OSError) as exc:
        fail(str(exc), FAILED)


@serve_app.command()
def gateway(
    spec_file: Path = SPEC_OPTION,
    endpoints: Path = ENDPOINTS_OPTION,
    port: int = typer.Option(None, help="Gateway port (default: the spec's)."),
) -> None:
    """Run only the gateway, in front of Triton shards that something else runs, as it runs in a cluster: it
    writes nothing to disk. With the spec's `shards_backend.kind: kubernetes` (in a cluster) it follows the
    shard pods through their EndpointSlices (credentials: the pod's ServiceAccount, else KUBECONFIG); with
    `static` it probes the --endpoints file and re-reads it when it changes.

    Example: cpctl gateway -f cluster.yaml --endpoints endpoints.json
    In a pod (as the Pulumi program runs it): cpctl gateway --file /etc/controlplane/cluster.yaml
    """
    from controlplane.shards.static import EndpointsFileError, StaticShards
    from controlplane.stack import ServingStack

    spec = load(spec_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    startup_errors: tuple[type[Exception], ...] = (OSError,)
    if spec.shards_backend.kind == "kubernetes":
        from controlplane.shards.kubernetes import KubernetesShards, KubernetesUnavailable, api_client

        if endpoints is not None:
            fail(f"{spec_file} has shards_backend.kind: kubernetes, which watches the cluster; --endpoints is for "
                 "`static`")
        try:
            shards = KubernetesShards(spec, api_client())
        except KubernetesUnavailable as exc:
            fail(str(exc), FAILED)
        startup_errors += (KubernetesUnavailable,)
    else:
        if endpoints is None:
            fail(f"{spec_file} has shards_backend.kind: static: pass --endpoints FILE (or set "
                 "shards_backend.kind: kubernetes in a cluster)")
        try:
            shards = StaticShards(endpoints)
        except EndpointsFileError as exc:
            fail(str(exc))
    console.print(f"starting the gateway of cluster '{spec.cluster}' ...")
    try:
        _run(ServingStack(spec, shards, port), None)
    except startup_errors as exc:
        fail(str(exc), FAILED)


def _run(stack: ServingStack, run: RunState | None) -> None:
    import uvloop

    uvloop.install()
    asyncio.run(_serve(stack, run))


async def _serve(stack: ServingStack, run: RunState | None) -> None:
    """Start the stack, show its status until SIGINT/SIGTERM, stop it. `run`: the run state `up` keeps."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        await stack.start()
        if run is not None:
            run.write(stack.snapshot())
        console.print(f"[green]serving[/green] at {stack.url} (KServe v2; shards ready in "
                      f"{time.monotonic() - started:.1f} s); Ctrl-C stops everything", highlight=False)
        if console.is_terminal:
            with Live(_status_table(stack.snapshot()), console=console, refresh_per_second=2) as live:
                while not stop.is_set():
                    await asyncio.sleep(0.5)
                    live.update(_status_table(stack.snapshot()))
        else:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=2.0)
                if run is not None:
                    run.write(stack.snapshot())
    finally:
        console.print("stopping ...")
        await stack.stop()
        if run is not None:
            run.remove()
        console.print("stopped: every process started is gone")


def _status_table(snapshot: dict) -> Table:
    statuses = ", ".join(f"{code}: {n}" for code, n in snapshot.get("by_status", {}).items()) or "none yet"
    table = Table(title=f"gateway {snapshot['gateway']}  requests {snapshot.get('requests', 0)}  "
                        f"in flight {snapshot.get('in_flight', 0)}  ({statuses})")
    for column in ("shard", "state", "url", "pid", "restarts", "models", "last error"):
        table.add_column(column)
    for shard in snapshot["shards"]:
        colour = {"ready": "green", "stopped": "dim"}.get(shard["state"], "yellow")
        name = shard["name"] + (" (standby)" if shard.get("standby") else "")
        table.add_row(name, f"[{colour}]{shard['state']}[/{colour}]", shard.get("url") or "-",
                      str(shard.get("pid") or "-"), str(shard.get("restarts", 0)), ",".join(shard["models"]),
                      shard.get("last_error") or "")
    workers = snapshot.get("workers", [])
    if workers:
        table.caption = "gateway workers: " + ", ".join(
            f"{w['index']} pid {w['pid'] or '-'} {'alive' if w['alive'] else '[red]down[/red]'}"
            + (f" ({w['restarts']} restarts)" if w.get("restarts") else "") for w in workers)
    return table


async def _ready_shards(urls: list[str | None]) -> list[bool]:
    """Probe every shard at once (the shards' own probe); no URL: not ready."""
    from controlplane.shards.base import probe_ready

    async def ready(url: str | None) -> bool:
        if not url:
            return False
        host, _, port = url.removeprefix("http://").rpartition(":")
        return await probe_ready(host, int(port))

    return list(await asyncio.gather(*(ready(url) for url in urls)))


@serve_app.command()
def status(
    spec_file: Path = SPEC_OPTION, as_json: bool = JSON_OPTION
) -> None:
    """Show the running stack of a spec: gateway address and worker processes, shards, their models and
    live health.

    Example: cpctl status -f examples/local/cluster.yaml --json
    """
    from controlplane.runstate import pid_alive, read_state, run_dir_for

    spec = load(spec_file)
    state = read_state(run_dir_for(spec))
    if state is None:
        fail(f"no stack of cluster '{spec.cluster}' is running (start one with `cpctl up -f {spec_file}`)", FAILED)
    ready, telemetry = asyncio.run(_ready_and_gpus(state))
    shards = [
        {"name": s["name"], "url": s["url"], "ready": is_ready, "models": s["models"],
         "pid": s["pid"], "state": s["state"], "restarts": s["restarts"], "standby": s["standby"]}
        for s, is_ready in zip(state["shards"], ready, strict=True)
    ]
    workers = [{**w, "alive": w["alive"] and pid_alive(w["pid"])} for w in state.get("workers", [])]
    if as_json:
        print_json({"gateway": state["gateway"], "gateway_pid": state["pid"], "workers": workers, "shards": shards,
                    "gpu": telemetry.to_dict()})
        return
    state["workers"] = workers
    state["shards"] = [{**s, "state": s["state"] if s["ready"] or not s["url"] else "unready"} for s in shards]
    console.print(_status_table(state), *_gpu_tables(telemetry))


@serve_app.command()
def top(
    spec_file: Path = SPEC_OPTION,
    interval: float = typer.Option(2.0, min=0.5, max=60.0, help="Seconds between refreshes (0.5 to 60)."),
    once: bool = typer.Option(False, "--once", help="Print one reading and leave (for scripts and tests)."),
) -> None:
    """Watch the GPUs live: utilization and memory per GPU or MIG instance (NVML), and per shard what its Triton
    and its models report (GPU gauges, the CUDA allocator's reserved, allocated and fragmentation). Ctrl-C leaves.

    Example: cpctl top -f examples/gpu/h200.yaml
    """
    from controlplane.runstate import read_state, run_dir_for

    spec = load(spec_file)
    run_dir = run_dir_for(spec)

    def reading() -> Group:
        state = read_state(run_dir)  # read each time: shards restart on other ports, the stack may stop
        _, telemetry = asyncio.run(_ready_and_gpus(state or {"shards": []}))
        running = f"cluster '{spec.cluster}'" if state else f"no stack of cluster '{spec.cluster}' is running"
        return Group(f"{running}   {time.strftime('%H:%M:%S')}", *_gpu_tables(telemetry))

    if once:
        console.print(reading())
        return
    try:
        with Live(reading(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(reading(), refresh=True)
    except KeyboardInterrupt:
        pass


async def _ready_and_gpus(state: dict) -> tuple[list[bool], Telemetry]:
    """Every shard's readiness (the shards' own probe) and the GPU telemetry of this machine and of every running
    shard, at once."""
    from controlplane.gpu.telemetry import read_telemetry

    running = [(s["name"], s.get("metrics_url")) for s in state["shards"] if s.get("metrics_url")]
    return await asyncio.gather(_ready_shards([s["url"] for s in state["shards"]]), read_telemetry(running))


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"


def _gib(used: float | None, total: float | None = None) -> str:
    if used is None:
        return "-"
    return f"{used / 2**30:.1f}" + ("" if total is None else f" / {total / 2**30:.1f}") + " GiB"


def _gpu_tables(telemetry: Telemetry) -> list[Table | str]:
    """The GPUs of this machine, then per shard: its GPUs as its Triton sees them and its models' allocators."""
    out: list[Table | str] = []
    if telemetry.no_gpu:
        out.append(f"[yellow]{telemetry.no_gpu}[/yellow]")
    else:
        devices = Table(title="GPUs (NVML)")
        for column in ("gpu", "device", "name", "utilization", "memory"):
            devices.add_column(column)
        for d in telemetry.devices:
            devices.add_row(str(d.gpu) if d.kind == "gpu" else f"  {d.gpu} (MIG)", d.uuid, d.name,
                            _percent(d.utilization), _gib(d.memory_used_bytes, d.memory_total_bytes))
        out.append(devices)
    if telemetry.shards:
        shards = Table(title="shards (Triton metrics; CUDA allocator per model)")
        for column in ("shard", "device / model", "utilization", "memory / reserved", "allocated", "fragmentation"):
            shards.add_column(column)
        for shard in telemetry.shards:
            if not shard.up:
                shards.add_row(shard.shard, f"[red]metrics unreadable[/red]: {shard.error}", "", "", "", "")
            elif not shard.gpus and not shard.allocators:
                shards.add_row(shard.shard, "[dim]no GPU in use[/dim]", "", "", "", "")
            for gpu in shard.gpus:
                shards.add_row(shard.shard, gpu["uuid"], _percent(gpu.get("utilization")),
                               _gib(gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")), "", "")
            for a in shard.allocators:
                shards.add_row(shard.shard, f"{a.model} ({a.device})", "", _gib(a.reserved_bytes),
                               _gib(a.allocated_bytes), _percent(a.fragmentation))
        out.append(shards)
    return out


def _example_inputs(metadata: dict, config: dict) -> list:
    """Inputs filled from a model's metadata: batch of 1, variable dims of 4, deterministic values."""
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import triton_to_np_dtype

    batching = config.get("max_batch_size", 0) > 0
    inputs = []
    for i, tensor in enumerate(metadata["inputs"]):
        shape = [int(d) for d in tensor["shape"]]
        shape = [1 if batching and j == 0 else (4 if d < 0 else d) for j, d in enumerate(shape)]
        if tensor["datatype"] == "BYTES":
            values = np.array(["hello from cpctl"] * int(np.prod(shape)), dtype=np.object_).reshape(shape)
        else:
            values = (np.linspace(-1, 1, int(np.prod(shape))) * (i + 1)).reshape(shape)
            values = values.astype(triton_to_np_dtype(tensor["datatype"]))
        inferred = httpclient.InferInput(tensor["name"], shape, tensor["datatype"])
        inferred.set_data_from_numpy(values, binary_data=True)
        inputs.append(inferred)
    return inputs


@serve_app.command()
def infer(
    model: str = typer.Argument(..., help="Model name."),
    spec_file: Path = SPEC_OPTION,
    url: str = typer.Option(None, help="Gateway URL (default: the running stack's)."),
    api_key: str = typer.Option(None, "--api-key", envvar="CPCTL_API_KEY", help="Tenant API key."),
) -> None:
    """Send one request built from the model's metadata and print the outputs.

    Example: cpctl infer risk
    """
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    if url is None:
        from controlplane.runstate import read_state, run_dir_for

        state = read_state(run_dir_for(load(spec_file)))
        if state is None:
            fail("no running stack found: start one with `cpctl up` or pass --url", FAILED)
        url = state["gateway"]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), connection_timeout=10, network_timeout=30)
    try:
        metadata = client.get_model_metadata(model, headers=headers)
        config = client.get_model_config(model, headers=headers)
        if config.get("model_transaction_policy", {}).get("decoupled"):
            fail(f"'{model}' streams its answer: POST to {url}/v2/models/{model}/generate_stream instead")
        started = time.perf_counter()
        result = client.infer(model, _example_inputs(metadata, config), headers=headers)
        elapsed_ms = (time.perf_counter() - started) * 1000
    except InferenceServerException as exc:
        fail(f"{url}: {exc.message()} (status {exc.status()})", FAILED)
    except OSError as exc:
        fail(f"cannot reach {url}: {exc}", FAILED)
    finally:
        client.close()
    table = Table(title=f"{model} at {url} ({elapsed_ms:.1f} ms)")
    for column in ("output", "datatype", "shape", "values"):
        table.add_column(column)
    for output in result.get_response()["outputs"]:
        values = result.as_numpy(output["name"])
        table.add_row(output["name"], output["datatype"], str(list(values.shape)),
                      np.array2string(values.reshape(-1)[:8], precision=4))
    console.print(table)


