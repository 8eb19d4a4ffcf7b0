"""`reid ablate`: the ablation table — every row the same config and epochs, one component switched off.

Rows run one after another through the same `main(cfg)`; each writes its own run folder under
`<output_dir>/ablation/<row>`, and the table is printed and saved as JSON and Markdown.

The warm-up epochs use the intra-camera loss alone, so they are the same for every row (same seed, same
losses). `--share-warmup` trains them once in `<output_dir>/ablation/_warmup` and every row starts from that
finished warm-up (`train.init_from`); continuing retraces an uninterrupted run exactly, so the table is the
same as with each row retraining its own warm-up, for a fraction of the CPU time.
"""
from __future__ import annotations

import argparse
import json
import os


from reid.config import load_config

ROWS = {
    "intra-only": ["train.warmup_epochs={epochs}"],
    "full": [],
    "no camera loss": ["loss.cam_weight=0"],
    "no hard positives": ["loss.hard_positives=false"],
    "no easy positives": ["loss.easy_positives=false"],
    "no grey zone": ["loss.grey_zone=0"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reid ablate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--table-only", action="store_true", help="only collect finished rows into the table")
    p.add_argument("--share-warmup", action="store_true",
                   help="train the warm-up epochs once and start every row from that checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every row")
    args = p.parse_args(argv)
    from reid.train import main as train_main

    base = load_config(args.config, args.overrides)
    root = os.path.join(base.output_dir, "ablation")
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        from reid.errors import ReidError

        raise ReidError(f"--rows: unknown row(s) {', '.join(unknown)} (known: {', '.join(ROWS)})")
    warmup_dir = os.path.join(root, "_warmup")
    shared = args.share_warmup and 0 < base.train.warmup_epochs < base.train.epochs
    if shared and not args.table_only:
        train_shared_warmup(args.config, args.overrides, warmup_dir)
    for name in [] if args.table_only else names:
        row_overrides = [o.format(epochs=base.train.epochs) for o in ROWS[name]]
        start = [f"train.init_from={warmup_dir}"] if shared else []
        cfg = load_config(args.config, args.overrides + row_overrides + start + [f"output_dir={_row_dir(root, name)}"])
        print(f"\n=== ablation row: {name} ({' '.join(row_overrides) or 'reference recipe'}) ===", flush=True)
        train_main(cfg)
    # The table is built from every finished row folder, so rows may run in separate processes.
    results = collect(root, base.train.epochs)
    table = format_ablation(results, base.train.epochs)
    print("\n" + table)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "ablation.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(root, "ablation.md"), "w") as f:
        f.write(table + "\n")
    return 0


def train_shared_warmup(config: str, overrides: list[str], warmup_dir: str) -> None:
    """Train only the warm-up epochs of `config` + `overrides` into `warmup_dir` (resumes if interrupted)."""
    from reid.train import main as train_main

    base = load_config(config, overrides)
    print(f"\n=== shared warm-up ({base.train.warmup_epochs} epochs) ===", flush=True)
    train_main(load_config(config, overrides + [f"train.epochs={base.train.warmup_epochs}",
                                                f"output_dir={warmup_dir}"]))


def _row_dir(root: str, name: str) -> str:
    return os.path.join(root, name.replace(" ", "_"))


def collect(root: str, epochs: int) -> dict:
    """{row: final metrics + last epoch's mined-positive precision} for every finished row under `root`."""
    results = {}
    for name, overrides in ROWS.items():
        path = os.path.join(_row_dir(root, name), "metrics.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            metrics = json.load(f)
        last = (metrics.get("epochs") or [{}])[-1]
        results[name] = {"overrides": [o.format(epochs=epochs) for o in overrides], **metrics.get("final", {}),
                         "warmup_mAP": (metrics.get("warmup") or {}).get("mAP"),
                         "hard_positive_precision": last.get("hard_positive_precision"),
                         "easy_positive_precision": last.get("easy_positive_precision")}
    return results


def format_ablation(results: dict, epochs: int) -> str:
    lines = [f"| row ({epochs} epochs each) | mAP | R1 | R5 | hard-positive precision | easy-positive precision |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        def pct(key):
            return f"{100 * r[key]:.1f}" if r.get(key) is not None else "–"
        lines.append(f"| {name} | {pct('mAP')} | {pct('rank1')} | {pct('rank5')} | "
                     f"{pct('hard_positive_precision')} | {pct('easy_positive_precision')} |")
    return "\n".join(lines)
