"""Model-level benchmark: residual SiT vs every DAR variant, side by side (the same as `dar bench`).

    python benchmarks/bench_model.py --preset cpu --json benchmarks/results/cpu.json
    python benchmarks/bench_model.py --preset sit-xl2 --device cuda --precision bf16
"""

import sys

from dar.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
