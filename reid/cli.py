"""`reid <command>`: parse arguments, build the config and environment, call into the library.

Library modules never import this one. Every `ReidError` ends here as one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from reid.errors import ReidError

COMMANDS = {
    "train": "train CTACL (one process, torchrun or SLURM) and evaluate",
    "evaluate": "evaluate a checkpoint on a dataset's query/gallery split",
    "synth": "write the synthetic multi-camera vehicle dataset (VeRi-776 layout)",
    "data": "inspect datasets: `reid data summary --format F --root PATH`",
    "ablate": "run the ablation table (same epochs for every row)",
    "selftest": "check the distributed loss against the single-process loss (run under torchrun)",
    "submit": "submit training to SLURM through submitit",
    "search": "embed a folder or dataset split into a faiss index; query it with images (--json, --picture)",
    "bench": "throughput benchmarks: step, loss, input, scaling, eval (--quick, --json, --png)",
}


def _cmd_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="reid train", description=COMMANDS["train"])
    p.add_argument("--config", help="YAML file overriding the defaults (e.g. configs/synthetic.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 data.root=/data/VeRi")
    args = p.parse_args(argv)
    from reid.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors before the heavy imports
    from reid.train import main

    main(cfg)
    return 0


def _cmd_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="reid evaluate", description=COMMANDS["evaluate"])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config (e.g. data.root=...)")
    args = p.parse_args(argv)
    from reid.train import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.overrides)
    if result is not None:  # rank 0 (or the only process)
        print(json.dumps(result, indent=2))
    return 0


def _cmd_synth(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="reid synth", description=COMMANDS["synth"])
    p.add_argument("--out", required=True, help="output folder (VeRi-776 layout)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="generator settings as key=value, e.g. identities=50 cameras=8")
    args = p.parse_args(argv)
    from reid.config import load_config
    from reid.data.synthetic import generate

    overrides = [o if o.startswith("synth.") else f"synth.{o}" for o in args.overrides]
    if args.seed is not None:
        overrides.append(f"synth.seed={args.seed}")
    cfg = load_config(None, overrides)
    counts = generate(args.out, cfg.synth)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _cmd_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="reid data", description=COMMANDS["data"])
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("summary", help="images, cameras, tracklets and identities per split")
    s.add_argument("--format", required=True, choices=["veri776", "veriwild", "vveri901", "csv"])
    s.add_argument("--root", required=True, help="dataset folder (for csv: the manifest file)")
    s.add_argument("--protocol", default="small", choices=["small", "medium", "large"])
    s.add_argument("--check-images", action="store_true", help="open every image header")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    from reid.data.readers import load_dataset

    dataset = load_dataset(args.format, args.root, args.protocol, check_images=args.check_images)
    summary = dataset.summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{dataset.name} at {dataset.root}")
    print(f"{'split':<8} {'images':>9} {'cameras':>8} {'tracklets':>10} {'identities':>11}")
    for split, row in summary.items():
        print(f"{split:<8} {row['images']:>9} {row['cameras']:>8} {row['tracklets']:>10} {row['identities']:>11}")
    return 0


def _cmd_ablate(argv: list[str]) -> int:
    from reid.ablate import main

    return main(argv)


def _cmd_selftest(argv: list[str]) -> int:
    from reid.selftest import main

    return main(argv)


def _cmd_submit(argv: list[str]) -> int:
    from reid.submit import main

    return main(argv)


def _cmd_search(argv: list[str]) -> int:
    from reid.search_cli import main

    return main(argv)


def _cmd_bench(argv: list[str]) -> int:
    from reid.bench import main

    return main(argv)


HANDLERS = {
    "train": _cmd_train, "evaluate": _cmd_evaluate, "synth": _cmd_synth, "data": _cmd_data,
    "ablate": _cmd_ablate, "selftest": _cmd_selftest, "submit": _cmd_submit, "search": _cmd_search,
    "bench": _cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    width = max(map(len, COMMANDS))
    epilog = "commands:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    p = argparse.ArgumentParser(prog="reid", description="Unsupervised vehicle re-identification with "
                                "distributed camera-tracklet-aware contrastive learning (CTACL).",
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER)
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0
    ns = p.parse_args(argv[:1])
    try:
        return HANDLERS[ns.command](argv[1:]) or 0
    except ReidError as exc:
        # Several ranks share one terminal: start a new line, another rank's progress bar may hold this one.
        lead = "\n" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{lead}error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # A rank whose peer died mid-collective: the peer printed the real error; say so in one line, not with
        # a traceback from deep inside the collective.
        if "closed by peer" in str(exc) or "Connection reset by peer" in str(exc):
            print(f"\nerror: rank {os.environ.get('RANK', '?')}: another rank stopped (its error is above); "
                  "this rank stops too", file=sys.stderr)
            return 3
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
