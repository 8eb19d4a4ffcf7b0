"""What every benchmark script shares: the `--json [PATH]` flag and writing its results (benchmarks/README.md).

    --json            write benchmarks/results/<name>.json (the script's default)
    --json PATH       write PATH (must end in .json)
    (no --json)       write nothing: the printed table is the result

PATH must end in `.json` so that `--json train.epochs=7` or `--json RUN` (an override or a positional
argument after a bare `--json`) is an error, not a file name; put `--json` after them instead.

Scripts run as `python benchmarks/x.py` from the repository root, where `benchmarks` is not importable
(only `reid` is installed), so each puts the root on sys.path first:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # parents[2] from benchmarks/experiments/
    from benchmarks.common import add_json_flag, write_json

    p = argparse.ArgumentParser(...)
    add_json_flag(p, "search_scale")
    args = p.parse_args()
    ...
    write_json(args.json, {"rows": rows})  # nothing without --json
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "add_json_flag", "write_json"]


def _json_path(value: str) -> str:
    if not value.endswith(".json"):
        raise argparse.ArgumentTypeError(
            f"expected a path ending in .json, got {value!r} (to write benchmarks/results/ give a bare --json "
            "after the positional arguments and key=value overrides)")
    return value


def add_json_flag(parser: argparse.ArgumentParser, name: str) -> None:
    """Add `--json [PATH]`: `args.json` is None without it, `RESULTS/<name>.json` alone, PATH with a path."""
    default = RESULTS / f"{name}.json"
    parser.add_argument("--json", nargs="?", const=str(default), default=None, type=_json_path, metavar="PATH",
                        help=f"write the results as JSON to PATH, or to benchmarks/results/{default.name} when "
                             "PATH is left out; without --json nothing is written")


def write_json(path: str | os.PathLike | None, payload) -> None:
    """Write `payload` as indented JSON to `path`, creating its folder; do nothing when `path` is None."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    shown = os.path.relpath(path)  # short inside the working directory, as given outside it
    print(f"wrote {path if shown.startswith(os.pardir) else shown}")
