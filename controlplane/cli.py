"""`cpctl`: the command line. Thin: it parses, calls the rooms of controlplane/, and renders."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from controlplane.bench.cli import bench_app
from controlplane.convert.cli import convert
from controlplane.gpu.cli import gpu, mig_app, plan
from controlplane.infra.cli import infra_app
from controlplane.provision.cli import inventory, provision
from controlplane.spec import ClusterSpec, SpecError, hash_api_key, load_spec
from controlplane.tune.cli import tune

DEFAULT_SPEC = Path("examples/local/cluster.yaml")
SpecOption = typer.Option(DEFAULT_SPEC, "-f", "--file", help="The cluster spec (cluster.yaml).")
EndpointsOption = typer.Option(..., "--endpoints", help="JSON list of shards: name, host, port, models.")

app = typer.Typer(help="Serve AI models on GPU clusters with priority flow control.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def load(spec_file: Path) -> ClusterSpec:
    try:
        return load_spec(spec_file)
    except SpecError as exc:
        raise fail(f"{spec_file} is not a valid spec:\n{exc}") from None


@app.command()
def validate(spec_file: Path = SpecOption) -> None:
    """Check a spec file; print each problem as FILE:LINE: FIELD: WHAT.

    Example: cpctl validate -f examples/local/cluster.yaml
    """
    spec = load(spec_file)
    replicas = sum(s.replicas for s in spec.shards)
    console.print(f"[green]ok[/green] {spec_file}: cluster '{spec.cluster}', {len(spec.models)} models, "
                  f"{len(spec.shards)} shards ({replicas} replicas), {len(spec.priority_classes)} classes, "
                  f"{len(spec.tenants)} tenants")


@app.command("hash-key")
def hash_key(key: str = typer.Argument(..., help="The API key to store for a tenant.")) -> None:
    """Print the SHA-256 of an API key, the form `tenants[].api_key_sha256` stores.

    Example: cpctl hash-key cp-demo-key
    """
    console.print(hash_api_key(key))


@app.command()
def up(
    spec_file: Path = SpecOption,
    port: int = typer.Option(None, help="Gateway port (default: the spec's; 0 picks a free one)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log every shard state change."),
) -> None:
    """Start the spec's Triton shards and the gateway, show live status until Ctrl-C, then stop everything.

    Example: cpctl up -f examples/local/cluster.yaml --port 8000
    """
    from controlplane.shards.local import ShardStartError
    from controlplane.shards.triton import TritonNotFound
    from controlplane.stack import LocalStack, StackAlreadyRunning, run_dir_for

    spec = load(spec_file)
    logging.basicConfig(level=logging.INFO if verbose or not console.is_terminal else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        stack = LocalStack(spec, run_dir_for(spec), port)
    except TritonNotFound as exc:
        raise fail(str(exc)) from None
    try:
        asyncio.run(_serve(stack))
    except (ShardStartError, StackAlreadyRunning, OSError) as exc:
        raise fail(str(exc), 1) from None


@app.command()
def gateway(
    spec_file: Path = SpecOption,
    endpoints: Path = EndpointsOption,
    port: int = typer.Option(None, help="Gateway port (default: the spec's)."),
) -> None:
    """Run only the gateway, in front of Triton shards that something else runs (Kubernetes Services,
    existing hosts). The endpoints file is probed and re-read when it changes.

    Example: cpctl gateway -f cluster.yaml --endpoints endpoints.json
    """
    from controlplane.shards.static import EndpointsFileError, StaticShards
    from controlplane.stack import LocalStack, StackAlreadyRunning, run_dir_for

    spec = load(spec_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        shards = StaticShards(endpoints)
    except EndpointsFileError as exc:
        raise fail(str(exc)) from None
    with contextlib.suppress(ImportError):
        import uvloop
        uvloop.install()
    try:
        asyncio.run(_serve(LocalStack(spec, run_dir_for(spec), port, shards=shards)))
    except (StackAlreadyRunning, OSError) as exc:
        raise fail(str(exc), 1) from None


async def _serve(stack) -> None:  # noqa: ANN001 - LocalStack, imported lazily
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    console.print(f"starting cluster '{stack.spec.cluster}' (logs in {stack.run_dir / 'logs'}) ...")
    try:
        await stack.start()
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
                stack.write_state()
    finally:
        console.print("stopping ...")
        await stack.stop()
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


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@app.command()
def status(
    spec_file: Path = SpecOption, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")
) -> None:
    """Show the running stack of a spec: gateway address and worker processes, shards, their models and
    live health.

    Example: cpctl status -f examples/local/cluster.yaml --json
    """
    from controlplane.stack import read_state, run_dir_for

    spec = load(spec_file)
    state = read_state(run_dir_for(spec))
    if state is None:
        raise fail(f"no stack of cluster '{spec.cluster}' is running (start one with `cpctl up -f {spec_file}`)", 1)
    shards = [
        {"name": s["name"], "url": s["url"], "ready": bool(s["url"]) and _ready(s["url"]), "models": s["models"],
         "pid": s["pid"], "state": s["state"], "restarts": s["restarts"], "standby": s["standby"]}
        for s in state["shards"]
    ]
    workers = [{**w, "alive": w["alive"] and _pid_alive(w["pid"])} for w in state.get("workers", [])]
    if as_json:
        print(json.dumps({"gateway": state["gateway"], "gateway_pid": state["pid"], "workers": workers,
                          "shards": shards}))
        return
    state["workers"] = workers
    state["shards"] = [{**s, "state": s["state"] if s["ready"] or not s["url"] else "unready"} for s in shards]
    console.print(_status_table(state))


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


@app.command()
def infer(
    model: str = typer.Argument(..., help="Model name."),
    spec_file: Path = SpecOption,
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
        from controlplane.stack import read_state, run_dir_for

        state = read_state(run_dir_for(load(spec_file)))
        if state is None:
            raise fail("no running stack found: start one with `cpctl up` or pass --url", 1)
        url = state["gateway"]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), connection_timeout=10, network_timeout=30)
    try:
        metadata = client.get_model_metadata(model, headers=headers)
        config = client.get_model_config(model, headers=headers)
        if config.get("model_transaction_policy", {}).get("decoupled"):
            raise fail(f"'{model}' streams its answer: POST to {url}/v2/models/{model}/generate_stream instead")
        started = time.perf_counter()
        result = client.infer(model, _example_inputs(metadata, config), headers=headers)
        elapsed_ms = (time.perf_counter() - started) * 1000
    except InferenceServerException as exc:
        raise fail(f"{url}: {exc.message()} (status {exc.status()})", 1) from None
    except OSError as exc:
        raise fail(f"cannot reach {url}: {exc}", 1) from None
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


app.command("plan")(plan)
app.command("convert")(convert)
app.command("tune")(tune)
app.command("gpu")(gpu)
app.command("inventory")(inventory)
app.command("provision")(provision)
app.add_typer(mig_app, name="mig", help="MIG layouts: the config to apply, the steps, and the diff to a node.")
app.add_typer(infra_app, name="infra", help="The Pulumi program of infra/: offline preview of what it creates.")
app.add_typer(bench_app, name="bench", help="Benchmarks: open-loop load (`run`) and the overload suite (`suite`).")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
