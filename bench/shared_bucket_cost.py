"""Cost of one tenant token-bucket take: in the process (one gateway worker) vs in shared memory (several).

Times `take` in a loop, alone and while other processes hammer the same tenant's bucket (the worst case:
every worker admitting the same tenant at once). Prints microseconds per take.

    .venv/bin/python bench/shared_bucket_cost.py [--takes 200000] [--contenders 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from controlplane.gateway.admission import LocalBuckets
from controlplane.gateway.shared_buckets import SharedBuckets
from controlplane.spec import Tenant

TENANT = Tenant(name="t", default_class="c", rate=1e9, burst=1_000_000_000)


def per_take_us(store: LocalBuckets | SharedBuckets, takes: int) -> float:
    started = time.perf_counter()
    for _ in range(takes):
        store.take("t")
    return (time.perf_counter() - started) / takes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--takes", type=int, default=200_000)
    parser.add_argument("--contenders", type=int, default=1, help="other processes taking at the same time")
    args = parser.parse_args()
    local = LocalBuckets([TENANT], time.monotonic)
    shared = SharedBuckets.create([TENANT])
    print(f"local bucket:                  {per_take_us(local, args.takes):.2f} us/take")
    print(f"shared bucket, uncontended:    {per_take_us(shared, args.takes):.2f} us/take")
    contenders = []
    for _ in range(args.contenders):
        pid = os.fork()
        if pid == 0:  # a contender: take until killed
            while True:
                shared.take("t")
        contenders.append(pid)
    try:
        print(f"shared bucket, {args.contenders} contending:  {per_take_us(shared, args.takes):.2f} us/take "
              f"({os.cpu_count()} cores)")
    finally:
        for pid in contenders:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    shared.close()


if __name__ == "__main__":
    main()
