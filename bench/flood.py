"""The gateway-bound scenarios of the suite alone: the flood (critical P99 under a flood of the lowest class,
gateway vs nginx vs Triton direct) and CPU per request (admitted and refused); same as
`cpctl bench suite --only flood,cpu`. Writes bench/results/flood-cpu-<date>.{json,md}.

    .venv/bin/python bench/flood.py [--quick]
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["bench", "suite", "--only", "flood,cpu", "--results-dir", str(ROOT / "bench" / "results"), *sys.argv[1:]])
