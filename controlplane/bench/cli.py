"""`cpctl bench`: open-loop load against any KServe v2 endpoint, and the overload suite."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import uvloop
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks: open-loop load and the overload suite.", no_args_is_help=True)
console = Console()

ScenarioOption = typer.Option(..., "-s", "--scenario", help="Scenario YAML: rate, duration_s, arrivals, flows.")
JsonOption = typer.Option(None, "--json", help="Write the report as JSON here.")
UrlOption = typer.Option(..., "--url", help="Endpoint; repeat for several (round robin, e.g. Triton direct).")


@bench_app.command("run")
def run_command(
    scenario_file: Path = ScenarioOption,
    url: list[str] = UrlOption,
    rate: float = typer.Option(None, help="Override the scenario's rate (req/s)."),
    duration: float = typer.Option(None, help="Override the scenario's duration (s)."),
    json_out: Path = JsonOption,
) -> None:
    """Offer a scenario's load (open loop) to an endpoint; print per-class percentiles, goodput, statuses.

    Example: cpctl bench run -s bench/scenarios/mix.yaml --url http://127.0.0.1:8000 --rate 500
    """
    from controlplane.bench.loadgen import load_scenario, run

    try:
        scenario = load_scenario(scenario_file)
    except (OSError, ValidationError, ValueError) as exc:
        console.print(f"[red]error:[/red] {scenario_file}: {exc}")
        raise typer.Exit(2) from None
    updates = {k: v for k, v in (("rate", rate), ("duration_s", duration)) if v is not None}
    scenario = scenario.model_copy(update=updates)
    with Progress(TextColumn("sending"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("send", total=int(scenario.rate * scenario.duration_s))
        report = uvloop.run(run(scenario, url, lambda done, total: progress.update(task, completed=done)))
    summary = report.summary()
    table = Table(title=f"{scenario.rate:g} req/s offered for {scenario.duration_s:g} s "
                        f"(achieved {summary['achieved_rate']:.0f}/s, generator lag P99 "
                        f"{summary['generator_lag_p99_ms']} ms)")
    for column in ("flow", "sent", "2xx", "P50 ms", "P90 ms", "P99 ms", "P99.9 ms", "goodput/s", "429",
                   "shed reasons", "statuses"):
        table.add_column(column)
    for name, f in [*summary["flows"].items(), ("all", summary["all"])]:
        table.add_row(name, str(f["sent"]), str(f["ok"]), f"{f['ok_p50_ms']:.2f}", f"{f['ok_p90_ms']:.2f}",
                      f"{f['ok_p99_ms']:.2f}", f"{f['ok_p999_ms']:.2f}", f"{f['goodput_rps']:.0f}", str(f["shed"]),
                      json.dumps(f["shed_reasons"]), json.dumps(f["statuses"]))
    console.print(table)
    if summary["generator_fell_behind"]:
        console.print("[yellow]warning:[/yellow] the load generator fell behind its schedule: these numbers "
                      "describe the generator, not the server (lower the rate or use more cores)")
    if json_out is not None:
        json_out.write_text(json.dumps(summary, indent=1))


@bench_app.command("suite")
def suite_command(
    quick: bool = typer.Option(False, help="Short steps (minutes less; noisier numbers)."),
    only: str = typer.Option(None, help="Run only these scenario groups, comma-separated: overload (peak, overhead, "
                             "capacity, overload mix, fault), flood (gateway-bound flood), cpu (CPU per request)."),
) -> None:
    """The overload benchmark: gateway vs nginx vs Triton direct, one run; writes bench/results/<name>-<date>.*

    Example: cpctl bench suite; cpctl bench suite --only flood,cpu --quick
    """
    from controlplane.bench.suite import run_suite

    groups = [g.strip() for g in only.split(",") if g.strip()] if only else None
    try:
        results = run_suite(quick=quick, log=lambda line: console.print(line, highlight=False), only=groups)
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table(title="targets")
    for column in ("target", "value", "goal", "met"):
        table.add_column(column)
    for t in results["targets"]:
        table.add_row(t["name"], str(t["value"]), t["target"], "[green]yes[/green]" if t["met"] else "[red]NO[/red]")
    console.print(table)
