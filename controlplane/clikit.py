"""What every `cpctl` command shares: the consoles, the one error format, the spec option and spec loading,
and `--json`.

Each area (serve, gpu, provision, infra, bench) has its own Typer app built with `area_app`; controlplane/cli.py
only puts them together. An error is one line on stderr, `error: WHAT` (a spec prints one `FILE:LINE: FIELD:
WHAT` line per problem), and the exit code says whose fault it was: 2 for bad input, 1 for a failed action.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from controlplane.spec import ClusterSpec, SpecError, load_spec

console = Console()
err_console = Console(stderr=True)

BAD_INPUT = 2
FAILED = 1

DEFAULT_SPEC = Path("examples/local/cluster.yaml")
SPEC_OPTION = typer.Option(DEFAULT_SPEC, "-f", "--file", envvar="CPCTL_SPEC",
                           help="The cluster spec (cluster.yaml).")
JSON_OPTION = typer.Option(False, "--json", help="Print JSON on stdout instead of tables (for scripts).")


def area_app(help_text: str) -> typer.Typer:
    """The Typer app of one area of commands, set up the same way as every other."""
    return typer.Typer(help=help_text, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    """Print `error: MESSAGE` on stderr and leave with `code`."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load(spec_file: Path) -> ClusterSpec:
    """The spec, or exit 2 with one `FILE:LINE: FIELD: WHAT` line per problem."""
    try:
        return load_spec(spec_file)
    except SpecError as exc:
        fail("\n".join(exc.lines))


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, never wrapped or coloured."""
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
