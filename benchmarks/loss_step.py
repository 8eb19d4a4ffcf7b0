"""Now `reid bench loss`: the loss step (fwd + bwd + memory update) against its matmul floor and the naive per-anchor loop.

The benchmark lives in reid/bench_loss.py; this script stays so that older commands keep working:

    python benchmarks/loss_step.py [--quick] [loss.key=value ...] [--json [PATH]]   ≡   reid bench loss ...
"""
import sys

from reid.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "loss", *sys.argv[1:]]))
