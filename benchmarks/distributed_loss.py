"""Now `reid bench scaling`: the camera-sharded loss and full step at 1, 2, 4 ranks (weak scaling, gloo on CPU).

The benchmark lives in reid/bench_scaling.py; this script stays so that older commands keep working:

    python benchmarks/distributed_loss.py [--quick] [scaling.key=value ...] [--json [PATH]]   ≡   reid bench scaling ...
"""
import sys

from reid.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "scaling", *sys.argv[1:]]))
