"""The overload benchmark (gateway vs nginx vs Triton direct); same as `cpctl bench suite`.

    .venv/bin/python bench/overload.py [--quick]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.bench.cli import suite_command  # noqa: E402

if __name__ == "__main__":
    suite_command(quick="--quick" in sys.argv[1:])
