"""Now `reid bench eval`: exact evaluation at VeRi-Wild large shape (10,000 queries × 128,517 gallery) against the bare matmul.

The benchmark lives in reid/bench_eval.py; this script stays so that older commands keep working:

    python benchmarks/evaluation_scale.py [--quick] [eval.key=value ...] [--json [PATH]]   ≡   reid bench eval ...
"""
import sys

from reid.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "eval", *sys.argv[1:]]))
