"""Host synchronisations and collectives of one full-mode loss step + memory update, at R gloo ranks, for this tree
or an earlier commit (issue 11's before/after).

Each rank holds the rows of its cameras (cameras dealt round-robin) of a VeRi-Wild-sized memory (N = 277,797,
174 cameras; D = 64 keeps it light: neither count depends on D) and scores B anchors per rank. Counted with
``reid.syncs.count_host_syncs`` (on a CPU: every call that would make a GPU wait) and ``reid.dist.COMM_BYTES``.
With ``--commit`` the commit is checked out in a temporary worktree, given this tree's ``reid/syncs.py``, and
its own loss is run (``reid.sharded_loss`` before the loss had one implementation).

    python benchmarks/step_syncs.py [--commit 88de3e9] [--ranks 2] [--batch 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--worker" not in sys.argv:  # a worker imports reid from the tree being counted (PYTHONPATH), never from here
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import add_json_flag, write_json


def _worker(rank: int, world: int, port: int, rows: int, cameras: int, batch: int, out_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from reid import dist
    from reid.memory import MemoryBank
    from reid.syncs import count_host_syncs
    try:
        from reid.losses import sharded_ctacl_loss
        new = True
    except ImportError:  # before the single loss implementation
        from reid.sharded_loss import sharded_ctacl_loss
        new = False
    dist.init_distributed("cpu")
    g = torch.Generator().manual_seed(0)
    cams = torch.randint(0, cameras, (rows,), generator=g)
    tracklets = torch.arange(rows) // 6
    own = torch.nonzero(cams % world == rank).flatten()
    bank = MemoryBank(own, cams[own], tracklets[own], 64, cameras)
    bank.fill(own, torch.randn(own.numel(), 64, generator=g))
    bank.camera_rows()
    bank.camera_centroids()
    if new:
        bank.shard()
    anchors = own[:batch]
    f = F.normalize(torch.randn(batch, 64, generator=g), dim=1).requires_grad_()
    loss_kw = dict(temperature=0.07, topk=5, grey_zone=0.01, cam_weight=0.2, **({"check": False} if new else {}))
    update_kw = {"check": False} if new else {}
    for _ in range(2):  # the second step is counted
        dist.reset_comm_bytes()
        with count_host_syncs() as syncs:
            sharded_ctacl_loss(f, cams[anchors], tracklets[anchors], anchors, bank, **loss_kw)["loss"].backward()
            bank.update(anchors, f.detach(), **update_kw)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"collectives": dist.COMM_BYTES["calls"], "bytes": dist.COMM_BYTES["bytes"],
                       "host_syncs": syncs.count, "by_call": dict(syncs.calls)}, fh)
    dist.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", default=None, help="count an earlier commit instead of this tree")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="anchors per rank")
    p.add_argument("--rows", type=int, default=277_797)
    p.add_argument("--cameras", type=int, default=174)
    p.add_argument("--worker", nargs=2, metavar=("RESULT", "PORT"), help=argparse.SUPPRESS)
    if "--worker" not in sys.argv:
        add_json_flag(p, "step_syncs")
    args = p.parse_args()
    if args.worker:  # inside the tree to count (PYTHONPATH set by the parent)
        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(args.ranks, int(args.worker[1]), args.rows, args.cameras, args.batch, args.worker[0]),
                 nprocs=args.ranks)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = ROOT
        if args.commit:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.commit], cwd=ROOT, check=True)
            shutil.copy(ROOT / "reid" / "syncs.py", tree / "reid" / "syncs.py")
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            result = Path(tmp) / "result.json"
            env = dict(os.environ, PYTHONPATH=str(tree), OMP_WAIT_POLICY="PASSIVE")
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ranks", str(args.ranks), "--batch",
                            str(args.batch), "--rows", str(args.rows), "--cameras", str(args.cameras),
                            "--worker", str(result), str(port)], cwd=tree, env=env, check=True)
            counts = json.loads(result.read_text())
        finally:
            if args.commit:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    print(f"{args.commit or 'this tree'}: R={args.ranks}, N={args.rows}, {args.cameras} cameras, B={args.batch}/rank: "
          f"{counts['collectives']} collectives, {counts['bytes'] / 1e6:.2f} MB, {counts['host_syncs']} host syncs")
    for call, n in sorted(counts["by_call"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d}  {call}")
    write_json(args.json, {"benchmark": "step_syncs", "commit": args.commit, "ranks": args.ranks, "rows": args.rows,
                           "cameras": args.cameras, "batch_per_rank": args.batch, **counts})


if __name__ == "__main__":
    main()
