"""`cpctl bench`: open-loop load against any KServe v2 endpoint, and the overload suite."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import uvloop
from pydantic import ValidationError
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from controlplane.clikit import FAILED, JSON_OPTION, area_app, console, err_console, fail, print_json

bench_app = area_app("Benchmarks: open-loop load (`run`) and the overload suite (`suite`).")

SCENARIO_OPTION = typer.Option(..., "-s", "--scenario", help="Scenario YAML: rate, duration_s, arrivals, flows.")
OUTPUT_OPTION = typer.Option(None, "-o", "--output", help="Also write the report as JSON to this file.")
URL_OPTION = typer.Option(..., "--url", help="Endpoint; repeat for several (round robin, e.g. Triton direct).")
RESULTS_DIR_OPTION = typer.Option(Path("bench/results"), "--results-dir",
                                  help="Where the results go (<name>-<date>.json, .md, .png).")


@bench_app.command("run")
def run_command(
    scenario_file: Path = SCENARIO_OPTION,
    url: list[str] = URL_OPTION,
    rate: float = typer.Option(None, help="Override the scenario's rate (req/s)."),
    duration: float = typer.Option(None, help="Override the scenario's duration (s)."),
    output: Path = OUTPUT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Offer a scenario's load (open loop) to an endpoint; print per-class percentiles, goodput, statuses.

    Example: cpctl bench run -s bench/scenarios/mix.yaml --url http://127.0.0.1:8000 --rate 500
    """
    from controlplane.bench.loadgen import load_scenario, run

    try:
        scenario = load_scenario(scenario_file)
    except (OSError, ValidationError, ValueError) as exc:
        fail(f"{scenario_file}: {exc}")
    updates = {k: v for k, v in (("rate", rate), ("duration_s", duration)) if v is not None}
    scenario = scenario.model_copy(update=updates)
    with Progress(TextColumn("sending"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("send", total=int(scenario.rate * scenario.duration_s))
        report = uvloop.run(run(scenario, url, lambda done, total: progress.update(task, completed=done)))
    summary = report.summary()
    if output is not None:
        output.write_text(json.dumps(summary, indent=1))
    if as_json:
        print_json(summary)
        return
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


@bench_app.command("suite")
def suite_command(
    quick: bool = typer.Option(False, help="Short steps (minutes less; noisier numbers)."),
    only: str = typer.Option(None, help="Run only these scenario groups, comma-separated: overload (peak, overhead, "
                             "capacity, overload mix, fault), flood (gateway-bound flood), cpu (CPU per request)."),
    results_dir: Path = RESULTS_DIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """The overload benchmark: gateway vs nginx vs Triton direct, one run; writes RESULTS_DIR/<name>-<date>.*

    Example: cpctl bench suite; cpctl bench suite --only flood,cpu --quick
    """
    from controlplane.bench.suite import run_suite
    from controlplane.resources import ResourceMissing

    groups = [g.strip() for g in only.split(",") if g.strip()] if only else None
    progress = err_console if as_json else console  # with --json, stdout carries only the results
    try:
        results = run_suite(quick=quick, log=lambda line: progress.print(line, highlight=False), only=groups,
                            results_dir=results_dir)
    except (RuntimeError, ResourceMissing) as exc:
        fail(str(exc), FAILED)
    if as_json:
        print_json(results)
        return
    table = Table(title="targets")
    for column in ("target", "value", "goal", "met"):
        table.add_column(column)
    for t in results["targets"]:
        table.add_row(t["name"], str(t["value"]), t["target"], "[green]yes[/green]" if t["met"] else "[red]NO[/red]")
    console.print(table)
