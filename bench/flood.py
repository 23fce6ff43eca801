"""The gateway-bound scenarios of the suite alone: the flood (critical P99 under a flood of the lowest class,
gateway vs nginx vs Triton direct) and CPU per request (admitted and refused); same as
`cpctl bench suite --only flood,cpu`. Writes bench/results/flood-cpu-<date>.{json,md}.

    .venv/bin/python bench/flood.py [--quick]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.bench.cli import suite_command  # noqa: E402

if __name__ == "__main__":
    suite_command(quick="--quick" in sys.argv[1:], only="flood,cpu")
