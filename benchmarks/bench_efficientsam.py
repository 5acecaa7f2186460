"""Speed/memory benchmark of the EfficientSAM library; same as ``efficientsam bench``.

Usage (numbers for README's table, 2-core CPU):
    python benchmarks/bench_efficientsam.py --checkpoint ../shared/fixtures/efficientsam_ti_random.pt \
        --json benchmarks/results/cpu-2core.json --markdown benchmarks/results/cpu-2core.md
"""

import sys

from efficientsam.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
