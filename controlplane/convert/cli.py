"""`cpctl gpu convert` (alias `cpctl convert`), registered by controlplane/cli.py. Parses, calls
source/entry/verify, prints the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer
from rich.table import Table

from controlplane.clikit import FAILED, JSON_OPTION, console, fail, print_json

OUTPUT_OPTION = typer.Option(..., "-o", "--output", help="The Triton model repository to write into.")
INPUT_OPTION = typer.Option([], "--input", help="NAME:DATATYPE:DIMS per input of a torch model, without the batch "
                            "dimension (e.g. images:fp32:3x224x224).")
OUTPUT_NAME_OPTION = typer.Option([], "--output-name", help="Output names, in order (default output0, ...).")


def convert(
    source: str = typer.Argument(..., help="A .onnx file, a TorchScript file, or module:factory / file.py:factory "
                                 "returning a torch nn.Module."),
    output: Path = OUTPUT_OPTION,
    name: str = typer.Option(..., "--name", help="Model name (fp32 variant); others are NAME_fp16, NAME_bf16, "
                             "NAME_fp8."),
    inputs: list[str] = INPUT_OPTION,
    outputs: list[str] = OUTPUT_NAME_OPTION,
    precision: str = typer.Option("fp32", "--precision", help="Comma-separated: fp32, fp16, bf16, fp8 (BF16 with "
                                  "FP8 linear layers: a module:factory source, on a GPU with FP8, Ada or Hopper)."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, max=65536, help="Triton max_batch_size."),
    instances: int = typer.Option(1, "--instances", min=1, max=64, help="Model instances per server."),
    queue_delay_us: int = typer.Option(1000, "--queue-delay-us", min=0, max=10_000_000,
                                       help="Dynamic batching: longest wait to fill a batch."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Load each variant into a real tritonserver "
                                "and compare its outputs with the source model."),
    samples: int = typer.Option(64, "--samples", min=1, max=100_000, help="Inputs in the comparison set."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Build TensorRT engines (needs TensorRT)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Convert a model to a Triton repository entry, one variant per precision, each verified in tritonserver.

    Example: cpctl gpu convert examples/models/vision/1/resnet.py:resnet50 --input images:fp32:3x224x224
    --name resnet --precision fp32,fp16,bf16 -o /tmp/models
    """
    if tensorrt and importlib.util.find_spec("tensorrt") is None:
        fail("--tensorrt: TensorRT is not installed here (the `tensorrt` Python package and a GPU are "
                    "needed); leave out --tensorrt to get Python-backend torch variants")
    if tensorrt:
        fail("--tensorrt: building TensorRT engines is not implemented yet; leave out --tensorrt")
    try:
        from controlplane.convert.entry import Serving, write_entry
        from controlplane.convert.source import ConvertError, load
    except ImportError as exc:
        fail(f"convert needs torch and onnx: pip install -e '.[models]' ({exc})")
    try:
        model = load(source, inputs, outputs)
        variants = write_entry(model, output, name, [p.strip() for p in precision.split(",")],
                               Serving(max_batch, instances, queue_delay_us))
    except ConvertError as exc:
        fail(str(exc))
    if not as_json:
        console.print(f"wrote {', '.join(str(v.path) for v in variants)}")
    if not verify:
        return
    from controlplane.convert.verify import verify as run_checks

    checks = run_checks(model, output, variants, samples, batch=min(max_batch, 32))
    if as_json:
        print_json([{**c.__dict__, "passed": c.passed} for c in checks])
    else:
        console.print(checks_table(checks))
    if not all(c.passed for c in checks):
        raise typer.Exit(FAILED)


def checks_table(checks) -> Table:
    table = Table(title="variants vs the source model")
    for column in ("variant", "precision", "output", "max |error|", "relative", "tolerance", "top-1 agree", "ok"):
        table.add_column(column)
    for c in checks:
        agree = "-" if c.top1_agreement is None else f"{c.top1_agreement:.1%} ({c.classes_seen} classes)"
        table.add_row(c.variant, c.precision, c.output, f"{c.max_abs_error:.3g}", f"{c.relative_error:.3g}",
                      f"{c.tolerance:g}", agree, "[green]yes[/green]" if c.passed else "[red]NO[/red]")
    return table

