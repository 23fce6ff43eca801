"""`cpctl gpu tune` (alias `cpctl tune`), registered by controlplane/cli.py. Parses, runs the search with a
progress bar, prints the points tried as a table, writes the best config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.progress import Progress
from rich.table import Table

from controlplane.bench.client import HttpClient
from controlplane.clikit import FAILED, JSON_OPTION, console, err_console, fail, print_json
from controlplane.tune.pbtxt import to_pbtxt
from controlplane.tune.search import (
    Measured,
    Point,
    TuneError,
    as_row,
    best,
    example_request,
    get_json,
    override,
    points,
    search,
    seed_default,
)

OUTPUT_OPTION = typer.Option(None, "-o", "--output", help="Write the best config here (config.pbtxt).")


def tune(
    model: str = typer.Argument(..., help="The served model (its fp32 variant when variants are searched)."),
    url: str = typer.Option(..., "--url", help="A Triton server (a shard, not the gateway) started with explicit "
                            "model control, as cpctl's shards are."),
    variants: str = typer.Option("", "--variants", help="Comma-separated precision variants to try too, e.g. "
                                 "vision_fp16,vision_bf16 (each name ending in _fp16/_bf16/_fp8 names its precision)."),
    p99_ms: float = typer.Option(100.0, "--p99-ms", min=0.1, help="The P99 latency target."),
    rate: float = typer.Option(100.0, "--rate", min=0.1, max=50_000, help="Requests per second offered."),
    seconds: float = typer.Option(3.0, "--seconds", min=0.5, max=120, help="Load per point."),
    batch: int = typer.Option(1, "--batch", min=1, max=4096, help="Rows per request."),
    max_batches: str = typer.Option("8,16,32,64", "--max-batch", help="Max batch sizes to try."),
    delays: str = typer.Option("0,500,2000", "--queue-delay-us", help="Dynamic batching queue delays to try."),
    instances: str = typer.Option("1,2", "--instances", help="Instance counts to try."),
    gpu: str = typer.Option("", "--gpu", help="GPU name for the seed's starting point (default: this machine's)."),
    output: Path = OUTPUT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Search max batch, queue delay, instances and precision variant for the most goodput under a P99 target.

    Example: cpctl gpu tune work --url http://127.0.0.1:8001 --rate 400 --p99-ms 50 -o /tmp/work.pbtxt
    """
    try:
        grid = [[int(v) for v in text.split(",") if v] for text in (max_batches, delays, instances)]
    except ValueError:
        fail("--max-batch, --queue-delay-us and --instances take comma-separated integers")
    if not all(grid) or min(min(g) for g in grid) < 0 or min(grid[0] + grid[2]) < 1:
        fail("--max-batch and --instances need values >= 1, --queue-delay-us values >= 0")
    models = [model, *[v for v in variants.split(",") if v]]
    gpu = gpu or _this_gpu()
    seed_batch, seed_precision = seed_default(gpu)
    seed_model = next((m for m in models if m.endswith(f"_{seed_precision}")), model)
    candidates = points(models, *grid)
    seed_point = Point(seed_model, seed_batch, grid[1][0], grid[2][0])
    if seed_point not in candidates:
        candidates.append(seed_point)
    try:
        metadata, config = asyncio.run(_describe(url, model))
        if config.get("max_batch_size", 0) < 1:
            fail(f"{model} does not batch (max_batch_size 0): nothing to tune")
        body = example_request(metadata, batch)
        with Progress(console=err_console, transient=True) as progress:
            task = progress.add_task(f"tuning {model}", total=len(candidates))
            results, served = asyncio.run(search(url, candidates, body, rate, seconds, p99_ms,
                                                 lambda _: progress.advance(task)))
    except TuneError as exc:
        fail(str(exc))
    chosen = best(results)
    seed = next(r for r in results if r.point == seed_point)
    if output is not None and chosen is not None:
        output.write_text(f"# Written by `cpctl tune` ({rate:g} req/s of {batch} rows, P99 target {p99_ms:g} ms)\n"
                          + to_pbtxt(override(served[chosen.point.model], chosen.point)))
    report = {"gpu": gpu, "seed_default": {"max_batch": seed_batch, "precision": seed_precision, **as_row(seed)},
              "best": as_row(chosen) if chosen else None, "points": [as_row(r) for r in results]}
    if as_json:
        print_json(report)
    else:
        console.print(_table(results, chosen, seed))
        console.print(_verdict(chosen, seed, p99_ms, output))
    if chosen is None:
        raise typer.Exit(FAILED)


async def _describe(url: str, model: str) -> tuple[dict, dict]:
    client = HttpClient.for_url(url, timeout_s=10)
    try:
        return await get_json(client, f"/v2/models/{model}"), await get_json(client, f"/v2/models/{model}/config")
    finally:
        client.close()


def _table(results: list[Measured], chosen: Measured | None, seed: Measured) -> Table:
    table = Table(title="points tried")
    for column in ("model", "max batch", "delay us", "instances", "goodput/s", "P99 ms", "ok/sent", "5xx", "meets"):
        table.add_column(column)
    for r in results:
        mark = " (best)" if r is chosen else " (seed)" if r is seed else ""
        table.add_row(r.point.model + mark, str(r.point.max_batch), str(r.point.queue_delay_us),
                      str(r.point.instances), f"{r.goodput_rps:g}", f"{r.p99_ms:g}", f"{r.ok}/{r.sent}",
                      str(r.errors_5xx), "yes" if r.meets_target else "no")
    return table


def _verdict(chosen: Measured | None, seed: Measured, p99_ms: float, output: Path | None) -> str:
    if chosen is None:
        return f"[red]no point met P99 <= {p99_ms:g} ms with no 5xx[/red]: offer less (--rate) or widen the search"
    ratio = chosen.goodput_rps / seed.goodput_rps if seed.goodput_rps else float("inf")
    written = f"; written to {output}" if output else ""
    return (f"best: {chosen.point.model}, max batch {chosen.point.max_batch}, delay {chosen.point.queue_delay_us} us, "
            f"{chosen.point.instances} instance(s): {chosen.goodput_rps:g} good req/s at P99 {chosen.p99_ms:g} ms, "
            f"x{ratio:.2f} the seed's starting point ({seed.goodput_rps:g}/s, P99 {seed.p99_ms:g} ms){written}")


def _this_gpu() -> str:
    from controlplane.gpu.discover import NoGpuError, discover

    try:
        gpus = discover().gpus
    except (NoGpuError, OSError, RuntimeError):  # no GPU, no driver: the seed's default for other GPUs applies
        return "none"
    return gpus[0].name if gpus else "none"

