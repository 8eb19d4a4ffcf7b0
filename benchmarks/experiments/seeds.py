"""Recipes over synthetic data seeds: does the cross-camera part pay off on data it was not tuned on? (issue 14)

For every data seed S the synthetic set is generated (`synth.seed=S`, under `data/synth_seed<S>`), the warm-up
(intra-camera loss only, the same for every recipe) is trained once, and every recipe starts from that finished
warm-up (`train.init_from`) and trains to the default schedule: a plain list of config overrides per recipe.
Prints, per recipe, mean ± standard deviation over the seeds of mAP, Rank-1 and cross-camera Rank-1, the
precision of the mined hard and easy positives (last epoch) and the share of the true cross-camera matches
that the grey zone and the mined positives leave among the negatives (from the final memory, the recipe's own
mining similarity), plus every seed's row. Identities are read only here and by the evaluation, never by a loss.

    python benchmarks/experiments/seeds.py --seeds 101,102 --recipes seed,center --json PATH
    python benchmarks/experiments/seeds.py --list            # the recipes and their overrides

Runs go to `runs/seeds/seed<S>/<recipe>`; a finished run (its metrics.json has "final") is not trained again,
so the driver can be stopped and restarted, and `--table-only` only collects. `--parallel 2` trains two runs at
once with one thread each.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root, for benchmarks.common
from benchmarks.common import add_json_flag, write_json  # noqa: E402

# Each recipe: overrides on top of the config (configs/synthetic.yaml). "{epochs}" is the config's train.epochs.
RECIPES = {
    "intra-only": ["train.warmup_epochs={epochs}"],
    "seed": ["loss.variant=seed", "loss.grey_zone=0.3", "loss.cam_weight=10"],  # today's synthetic recipe
    "seed with DESIGN defaults": ["loss.variant=seed", "loss.grey_zone=0.01", "loss.cam_weight=0.2"],
    "center": ["loss.variant=center", "loss.grey_zone=0.3", "loss.cam_weight=10"],
    "center + camera softmax": ["loss.variant=center+camera_softmax", "loss.grey_zone=0.3", "loss.cam_weight=10"],
    "camera softmax": ["loss.variant=camera_softmax", "loss.grey_zone=0.3", "loss.cam_weight=10"],
    "center λ 1": ["loss.variant=center", "loss.grey_zone=0.3", "loss.cam_weight=1"],
    "center λ 1 without hard positives": ["loss.variant=center", "loss.grey_zone=0.3", "loss.cam_weight=1",
                                          "loss.hard_positives=false"],
    "center λ 1 without easy positives": ["loss.variant=center", "loss.grey_zone=0.3", "loss.cam_weight=1",
                                          "loss.easy_positives=false"],
    "center λ 1 without camera loss": ["loss.variant=center", "loss.grey_zone=0.3", "loss.cam_weight=0"],
    "default": [],  # the config's own recipe, and its ablations
    "default without hard positives": ["loss.hard_positives=false"],
    "default without easy positives": ["loss.easy_positives=false"],
}


def run_folder(out: Path, seed: int, recipe: str) -> Path:
    return out / f"seed{seed}" / recipe.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")


def finished(folder: Path) -> bool:
    path = folder / "metrics.json"
    return path.exists() and "final" in json.loads(path.read_text())


def train(config: str, overrides: list[str], folder: Path, threads: int) -> float:
    """One `reid train` in a subprocess (its own memory, its own failure). Returns the wall time in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    start = time.time()
    with open(folder.parent / f"{folder.name}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "reid", "train", "--config", config, *overrides,
                        f"output_dir={folder}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def negatives_share(folder: Path, data_root: str, grey_zone: float, topk: int, center: bool) -> float | None:
    """Share of the true cross-camera matches (same identity, other camera) that the final memory's grey zone and
    top-K leave among the negatives, ranking other-camera rows by each row's similarity to the others (centred
    per camera when the recipe mines that way). N×N at once: synthetic-sized sets only."""
    import torch

    from reid.checkpoint import FOLDER, newest_complete
    from reid.data.readers import load_dataset

    manifest = newest_complete(str(folder / FOLDER), print)
    if manifest is None:
        return None
    shards = [torch.load(folder / FOLDER / manifest["memory_dir"] / name, map_location="cpu", weights_only=True)
              for name in manifest["memory_files"]]
    rows = torch.cat([shard["rows"].float() for shard in shards])
    ids = torch.cat([shard["global_ids"] for shard in shards])
    memory = torch.empty_like(rows)
    memory[ids] = rows
    train = load_dataset("veri776", data_root).train  # the synthetic set is written in the VeRi-776 layout
    cams, pids = torch.as_tensor(train.cams), torch.as_tensor(train.pids)
    if center:
        means = torch.zeros(int(cams.max()) + 1, memory.shape[1]).index_add_(0, cams, memory)
        means /= torch.bincount(cams).clamp(min=1)[:, None].float()
        memory = torch.nn.functional.normalize(memory - means[cams], dim=1)
    sims = memory @ memory.T
    other = cams[:, None] != cams[None, :]
    sims.masked_fill_(~other, -math.inf)
    n_other = other.sum(1)
    depth = torch.floor(n_other.double() * grey_zone + 1e-9).long() + topk
    order = sims.argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    true = other & (pids[:, None] == pids[None, :])
    kept_out = true & (rank < depth[:, None])
    return 1.0 - float(kept_out.sum()) / max(1, int(true.sum()))


def summarise(folder: Path, recipe: str, overrides: list[str], data_root: str) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    final, last = m["final"], m["epochs"][-1]
    row = {"mAP": final["mAP"], "rank1": final["rank1"], "cross_camera_rank1": final.get("cross_camera_rank1"),
           "hard_precision": last.get("hard_positive_precision"),
           "easy_precision": last.get("easy_positive_precision")}
    if recipe != "intra-only":
        values = dict(o.split("=", 1) for o in overrides)
        row["true_matches_among_negatives"] = negatives_share(
            folder, data_root, float(values.get("loss.grey_zone", 0.01)), int(values.get("loss.topk", 5)),
            "center" in values.get("loss.variant", "seed"))
    return row


def mean_sd(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/synthetic.yaml")
    p.add_argument("--seeds", default="101,102,103", help="synthetic data seeds (synth.seed)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names (see --list)")
    p.add_argument("--out", default="runs/seeds")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once (threads split between them)")
    p.add_argument("--table-only", action="store_true", help="only collect finished runs")
    p.add_argument("--list", action="store_true", help="print the recipes and their overrides")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    add_json_flag(p, "seeds")
    args = p.parse_args()
    if args.list:
        for name, overrides in RECIPES.items():
            print(f"{name:28s} {' '.join(overrides)}")
        return 0
    from reid.config import load_config

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"seeds.py: unknown recipe(s) {unknown}, expected some of: {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = load_config(args.config, args.overrides)
    epochs, warmup = cfg.train.epochs, cfg.train.warmup_epochs
    out = ROOT / args.out
    threads = max(1, (os.cpu_count() or 2) // args.parallel)

    def data(seed):
        return [f"synth.seed={seed}", f"data.root=data/synth_seed{seed}", "eval.every=0", *args.overrides]

    def recipe_overrides(name):
        return [o.format(epochs=epochs) for o in RECIPES[name]]

    if not args.table_only:
        for seed in seeds:  # the shared warm-ups first (they also generate the data), one seed at a time
            folder = run_folder(out, seed, "_warmup")
            if not finished(folder):
                print(f"seed {seed}: warm-up ({warmup} epochs) …", flush=True)
                train(args.config, data(seed) + [f"train.epochs={warmup}"], folder, threads * args.parallel)
        jobs = [(seed, name) for seed in seeds for name in recipes if not finished(run_folder(out, seed, name))]

        def work(job):
            seed, name = job
            folder = run_folder(out, seed, name)
            seconds = train(args.config, data(seed) + recipe_overrides(name) +
                            [f"train.init_from={run_folder(out, seed, '_warmup')}"], folder, threads)
            print(f"seed {seed}: {name} done in {seconds / 60:.1f} min", flush=True)

        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(work, jobs))

    table = {}
    for name in recipes:
        rows = {}
        for seed in seeds:
            folder = run_folder(out, seed, name)
            if finished(folder):
                rows[seed] = summarise(folder, name, recipe_overrides(name), f"data/synth_seed{seed}")
        keys = ("mAP", "rank1", "cross_camera_rank1", "hard_precision", "easy_precision",
                "true_matches_among_negatives")
        table[name] = {"overrides": recipe_overrides(name), "seeds": rows,
                       "mean_sd": {k: mean_sd([r.get(k) for r in rows.values()]) for k in keys}}

    def cell(pair, scale=100.0):
        mean, sd = pair
        return f"{'—':>13s}" if mean is None else f"{scale * mean:5.1f} ± {scale * sd:4.1f}"

    print(f"\nseeds {seeds}, {epochs} epochs ({warmup} warm-up); mean ± sd over seeds, in %")
    print(f"{'recipe':28s} {'mAP':>13s} {'R1':>13s} {'cross-cam R1':>13s} {'hard prec.':>13s} {'easy prec.':>13s} "
          f"{'true among neg.':>15s}")
    for name, r in table.items():
        ms = r["mean_sd"]
        print(f"{name:28s} {cell(ms['mAP'])} {cell(ms['rank1'])} {cell(ms['cross_camera_rank1'])} "
              f"{cell(ms['hard_precision'])} {cell(ms['easy_precision'])} {cell(ms['true_matches_among_negatives']):>15s}")
        for seed, row in r["seeds"].items():
            print(f"  seed {seed:<21d} {100 * row['mAP']:5.1f}         {100 * row['rank1']:5.1f}         "
                  f"{100 * (row['cross_camera_rank1'] or 0):5.1f}")
    write_json(args.json, {"experiment": "seeds", "config": args.config, "seeds": seeds, "epochs": epochs,
                           "warmup_epochs": warmup, "overrides": args.overrides, "recipes": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
