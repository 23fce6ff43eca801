"""The overload benchmark (gateway vs nginx vs Triton direct); same as `cpctl bench suite`.

    .venv/bin/python bench/overload.py [--quick]
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["bench", "suite", "--results-dir", str(ROOT / "bench" / "results"), *sys.argv[1:]])
