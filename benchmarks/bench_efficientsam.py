"""Speed/memory benchmark of the EfficientSAM library (``efficientsam_bench.py``); same options as
``efficientsam bench``.

Usage (numbers for README's table, 2-core CPU):
    python benchmarks/bench_efficientsam.py --checkpoint ../shared/fixtures/efficientsam_ti_random.pt \
        --json benchmarks/results/cpu-2core.json --markdown benchmarks/results/cpu-2core.md
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efficientsam.cli import main  # noqa: E402 (the checkout's library, beside this benchmark)

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
