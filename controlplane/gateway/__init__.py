"""The HTTP data plane: KServe v2 in front of Triton shards, with priority flow control.

A request's path, top to bottom:
- `server`: connections and HTTP parsing (httptools), pipelining, back-pressure both ways.
- `app`: the routes; creates one `exchange.Exchange` per inference request.
- `exchange`: one request's steps: admit -> check -> queue -> forward -> relay -> release.
- `admission`: identity (API key -> tenant), class, tenant token buckets, deadlines.
- `inference`: checks of the JSON inference header against the model's metadata and the bytes present.
- `scheduler`: priority bands, shares, fairness across tenants, bounded queues (model and invariants at its top).
- `routing`: the endpoint pool, adaptive per-shard concurrency, ejection, retries.
- `upstream`: pooled keep-alive connections to Triton, responses relayed as they arrive.
- `overload`: the gateway's own overload (event-loop lag, CPU, memory, connections), acted on by class.
- `diagnostics`: opt-in (environment) timeline of large requests and the knobs that test their causes.
- `ladder`: the degradation ladder (standby shards, cheaper variants, shedding) with hysteresis.
- `metrics`, `errors`: Prometheus metrics; the JSON error answers.
- `workers`, `worker`, `channel`, `shared_buckets`: several worker processes on one port, their supervisor,
  the socketpair messages between them and the shared tenant buckets (a memfd: nothing on disk).
"""

import importlib.machinery
from pathlib import Path


def stale_extensions(directory: Path) -> list[Path]:
    """The .py files in `directory` changed after they were compiled (scripts/compile-gateway)."""
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for built in directory.glob(f"*{suffix}"):
            source = built.with_name(built.name.removesuffix(suffix) + ".py")
            if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
                stale.append(source)
    return stale


# Python imports a compiled module in place of its source: one older than its .py would silently run old code.
if stale := stale_extensions(Path(__file__).parent):
    raise ImportError(f"{', '.join(map(str, stale))} changed after being compiled: run `make .venv/.stamp-compiled` "
                      "to compile again, or `scripts/compile-gateway --clean` to run the sources")
