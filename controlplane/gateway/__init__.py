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
- `ladder`: the degradation ladder (standby shards, cheaper variants, shedding) with hysteresis.
- `metrics`, `errors`: Prometheus metrics; the JSON error answers.
- `workers`, `worker`, `channel`, `shared_buckets`: several worker processes on one port, their supervisor,
  the socketpair messages between them and the shared tenant buckets (a memfd: nothing on disk).
"""

import importlib.machinery
from pathlib import Path


def _refuse_stale_extensions() -> None:
    """Python imports a compiled module (scripts/compile-gateway) in place of its source: one older than its
    .py would silently run old code, so refuse to start instead."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for built in here.glob(f"*{suffix}"):
            source = built.with_name(built.name.removesuffix(suffix) + ".py")
            if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
                raise ImportError(f"{source} changed after it was compiled: run `make .venv/.stamp-compiled` to "
                                  f"compile it again, or `scripts/compile-gateway --clean` to run the sources")


_refuse_stale_extensions()
