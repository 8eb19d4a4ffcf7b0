"""`python launch/submit.py ARGS` is `reid submit ARGS`; the submitit launcher lives in reid/submit.py."""
import sys

from reid.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
