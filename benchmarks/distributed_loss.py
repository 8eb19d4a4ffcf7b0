"""Camera-sharded CTACL step on CPU with R gloo ranks (issue 5, performance).

Per world size R: step time (sharded loss forward + backward + memory update, full mode), bytes each rank
puts into collectives per step (``reid.dist.COMM_BYTES``), peak RSS per rank, and the per-rank memory bank
against N/R × D × 4. Each rank generates only its own rows: no process ever holds the (N, D) memory.
Communication is measured at two memory sizes (--rows and --small-rows) to show it does not grow with N.

    python benchmarks/distributed_loss.py                                   # N=277,797 D=2048 B=128, R=1,2,4
    python benchmarks/distributed_loss.py --rows 20000 --dim 256 --steps 2  # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F


def _problem(rows: int, cameras: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(cameras, generator=g) + 0.2  # uneven cameras, like real deployments
    cams = torch.multinomial(weights, rows, replacement=True, generator=g)
    tracklets = torch.randint(0, max(1, rows // (8 * cameras)), (rows,), generator=g)
    return cams, tracklets


def _measure(rank, world, rows, args):
    from reid import dist
    from reid.data.sampler import partition_cameras
    from reid.memory import MemoryBank
    from reid.sharded_loss import sharded_ctacl_loss

    cams, tracklets = _problem(rows, args.cameras, args.seed)
    shards = partition_cameras(np.bincount(cams.numpy(), minlength=args.cameras), world)
    own = torch.as_tensor(np.flatnonzero(np.isin(cams.numpy(), shards[rank])))
    bank = MemoryBank(own, cams[own], tracklets[own], args.dim, args.cameras)
    g = torch.Generator().manual_seed(args.seed * 100 + rank)
    for start in range(0, own.numel(), 65536):  # fill in chunks: no second N_r × D copy
        ids = own[start:start + 65536]
        bank.fill(ids, torch.randn(ids.numel(), args.dim, generator=g))
    bank.camera_rows()
    times, sent = [], []
    for step in range(args.steps + 1):  # step 0 warms up allocators and is not counted
        pick = own[torch.randint(0, own.numel(), (args.batch,), generator=g)]
        f = F.normalize(bank.rows[bank.local_index(pick)] + 0.3 * torch.randn(args.batch, args.dim, generator=g),
                        dim=1).requires_grad_()
        dist.barrier()
        dist.reset_comm_bytes()
        start = time.perf_counter()
        out = sharded_ctacl_loss(f, cams[pick], tracklets[pick], pick, bank, temperature=0.07, topk=5,
                                 grey_zone=0.01, cam_weight=0.2, warmup=False)
        out["loss"].backward()
        bank.update(pick, f.detach())
        elapsed = time.perf_counter() - start
        if step:
            times.append(elapsed)
            sent.append(dist.COMM_BYTES["bytes"])
    return {"rows": rows, "rows_on_rank": int(own.numel()), "step_s": float(np.median(times)),
            "comm_bytes_per_step": int(np.median(sent)), "bank_bytes": bank.rows.numel() * bank.rows.element_size(),
            "ideal_bank_bytes": rows / world * args.dim * 4}


def _worker(rank, world, port, args, outdir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from reid import dist

    dist.init_distributed("cpu")
    result = {"small": _measure(rank, world, args.small_rows, args)}
    result["large"] = _measure(rank, world, args.rows, args)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=277797, help="memory rows N (VeRi-Wild train size)")
    p.add_argument("--small-rows", type=int, default=None, help="second N for the comm-vs-N check (default N/8)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch", type=int, default=128, help="anchors per rank")
    p.add_argument("--cameras", type=int, default=174)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed_loss.json"))
    args = p.parse_args(argv)
    args.small_rows = args.small_rows or max(args.rows // 8, args.cameras * 4)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = []
    for world in (int(w) for w in args.worlds.split(",")):
        with tempfile.TemporaryDirectory() as outdir:
            t0 = time.time()
            mp.spawn(_worker, args=(world, _free_port(), args, outdir), nprocs=world, join=True)
            ranks = [json.load(open(os.path.join(outdir, f"rank{r}.json"))) for r in range(world)]
        large = [r["large"] for r in ranks]
        small = [r["small"] for r in ranks]
        results.append({
            "world": world, "wall_s": time.time() - t0,
            "step_s": max(r["step_s"] for r in large),
            "comm_bytes_per_step_per_rank": max(r["comm_bytes_per_step"] for r in large),
            "comm_bytes_per_step_per_rank_small_N": max(r["comm_bytes_per_step"] for r in small),
            "peak_rss_bytes_per_rank": max(r["peak_rss_bytes"] for r in ranks),
            "bank_bytes_per_rank": [r["bank_bytes"] for r in large],
            "bank_over_ideal_max": max(r["bank_bytes"] / r["ideal_bank_bytes"] for r in large),
            "rows_per_rank": [r["rows_on_rank"] for r in large],
        })
        print(f"R={world} done in {results[-1]['wall_s']:.0f} s", file=sys.stderr)

    print(f"\nsharded CTACL step (forward+backward+memory update), N={args.rows} D={args.dim} B={args.batch}/rank, "
          f"{args.cameras} cameras, {os.cpu_count()} CPU cores shared by all ranks, gloo")
    print(f"{'R':>2} {'step s':>8} {'comm MB/step/rank':>18} {f'same at N={args.small_rows}':>20} "
          f"{'peak RSS GB/rank':>17} {'bank GB/rank (max)':>19} {'bank/(N/R·D·4)':>15}")
    for r in results:
        print(f"{r['world']:>2} {r['step_s']:>8.2f} {r['comm_bytes_per_step_per_rank'] / 1e6:>18.3f} "
              f"{r['comm_bytes_per_step_per_rank_small_N'] / 1e6:>20.3f} {r['peak_rss_bytes_per_rank'] / 1e9:>17.2f} "
              f"{max(r['bank_bytes_per_rank']) / 1e9:>19.3f} {r['bank_over_ideal_max']:>15.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "results": results}, fh, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
