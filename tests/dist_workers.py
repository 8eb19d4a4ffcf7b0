"""Worker processes for tests/test_distributed.py: R gloo ranks on CPU, float64, tiny sizes.

``run_world(world, outdir, load_from=None, save_to=None)`` spawns the ranks; each writes
``outdir/rank{r}.pt`` with what the tests compare against the single-process computation.
The global problem (memory, cameras, tracklets, features) is rebuilt from ``problem()`` by every
process, so the reference in the test and every rank see the same numbers.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

ROWS, DIM, BATCH, CAMERAS = 160, 12, 6, 7  # camera 6 has no rows (centroids must skip it)
MODES = {
    "warmup": {"warmup": True},
    "full": {},
    "full_k3_wide_grey": {"hard_topk": 3, "easy_topk": 2, "grey_zone": 0.05},
    "full_no_hard_no_cam": {"hard_topk": 0, "cam_weight": 0.0},
    # loss.variant options: camera-local sums and centred mining must stay exact across camera shards
    "center": {"variant": "center", "grey_zone": 0.3},
    "camera_softmax": {"variant": "camera_softmax", "grey_zone": 0.05},
    "center_camera_softmax": {"variant": "center+camera_softmax", "grey_zone": 0.3, "easy_topk": 2},
}
LOSS_ARGS = {"temperature": 0.07, "topk": 5, "grey_zone": 0.01, "cam_weight": 0.2, "warmup": False}


def problem(seed: int = 0, rows: int = ROWS):
    """Global memory (N, D) fp64, cams/tracklets (N,), fixed anchor features for every row (N, D)."""
    g = torch.Generator().manual_seed(seed)
    cams = torch.multinomial(torch.tensor([6.0, 3, 2, 2, 1, 1, 0]), rows, replacement=True, generator=g)
    tracklets = torch.randint(0, 6, (rows,), generator=g) + 10 * cams  # some one-image tracklets
    memory = F.normalize(torch.randn(rows, DIM, generator=g, dtype=torch.float64), dim=1)
    features = F.normalize(memory + 0.4 * torch.randn(rows, DIM, generator=g, dtype=torch.float64), dim=1)
    return memory, cams, tracklets, features


def shard_rows(cams, world: int, rank: int) -> np.ndarray:
    from reid.data.sampler import partition_cameras

    shards = partition_cameras(np.bincount(cams.numpy(), minlength=CAMERAS), world)
    return np.flatnonzero(np.isin(cams.numpy(), shards[rank]))


def anchor_rows(own: np.ndarray, rank: int, world: int = 1) -> torch.Tensor:
    """BATCH anchors of the rank's own rows; the last of 4 ranks gets none (a step may give a rank no images)."""
    size = 0 if world == 4 and rank == 3 else BATCH
    return torch.as_tensor(np.random.default_rng([7, rank]).choice(own, size, replace=False), dtype=torch.long)


def _bank(own, memory, cams, tracklets):
    from reid.memory import MemoryBank

    bank = MemoryBank(torch.as_tensor(own), cams[own], tracklets[own], DIM, CAMERAS, dtype=torch.float64)
    bank.fill(torch.as_tensor(own), memory[own])
    return bank


def _worker(rank: int, world: int, port: int, outdir: str, load_from, save_to):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from reid import dist
    from reid.losses import sharded_ctacl_loss
    from reid.syncs import count_host_syncs

    env = dist.init_distributed("cpu")
    out = {"rank": env.rank, "world": env.world_size}
    memory, cams, tracklets, features = problem()
    own = shard_rows(cams, world, rank)
    bank = _bank(own, memory, cams, tracklets)
    rows = anchor_rows(own, rank, world)
    out["rows"] = rows

    # 1. loss and per-anchor gradient in every mode (fixed features)
    for name, mode in MODES.items():
        f = features[rows].clone().requires_grad_()
        parts = sharded_ctacl_loss(f, cams[rows], tracklets[rows], rows, bank, **{**LOSS_ARGS, **mode})
        parts["loss"].backward()
        out[name] = {"loss": float(parts["loss"].detach()) / world, "grad": f.grad / world,
                     **{k: parts[k] for k in ("intra", "inter", "cam", "hard_ids", "easy_ids")}}

    # 2. one SGD step of a DDP model (no BatchNorm) on the sharded loss
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, DIM, bias=False).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    emb = F.normalize(ddp(features[rows]), dim=1)
    parts = sharded_ctacl_loss(emb, cams[rows], tracklets[rows], rows, bank, **LOSS_ARGS)
    opt.zero_grad()
    parts["loss"].backward()
    opt.step()
    out["ddp_weight"] = model.weight.detach().clone()

    # 3. memory update after the loss, then centroids over all ranks
    bank.update(rows, emb.detach())
    out["bank_ids"], out["bank_rows"] = bank.global_ids.clone(), bank.rows.clone()
    out["centroids"], out["present"] = bank.camera_centroids()
    if save_to:
        bank.save(save_to)
    if load_from:
        fresh = _bank(own, torch.zeros_like(memory), cams, tracklets)
        fresh.load(load_from)
        out["loaded_ids"], out["loaded_rows"] = fresh.global_ids.clone(), fresh.rows.clone()

    # 4. bytes one full-mode step puts into collectives, at two memory sizes (must not grow with N)
    out["comm_bytes"] = {}
    for n in (ROWS, 4 * ROWS):
        memory_n, cams_n, tracklets_n, features_n = problem(seed=1, rows=n)
        own_n = shard_rows(cams_n, world, rank)
        bank_n = _bank(own_n, memory_n, cams_n, tracklets_n)
        rows_n = anchor_rows(own_n, rank, world)
        bank_n.camera_rows()  # once per bank's life, not per step
        bank_n.shard()
        dist.reset_comm_bytes()
        f = features_n[rows_n].clone().requires_grad_()
        with count_host_syncs() as syncs:  # the training step's loss, backward and memory update
            sharded_ctacl_loss(f, cams_n[rows_n], tracklets_n[rows_n], rows_n, bank_n, check=False,
                               **{**LOSS_ARGS, "grey_zone": 0.05})["loss"].backward()
            bank_n.update(rows_n, f.detach(), check=False)
        out["comm_bytes"][n] = dist.COMM_BYTES["bytes"]
        out.setdefault("collectives", {})[n] = dist.COMM_BYTES["calls"]
        out.setdefault("host_syncs", {})[n] = dict(syncs.calls)
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, outdir: str, load_from: str | None = None, save_to: str | None = None) -> list[dict]:
    os.makedirs(outdir, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    mp.spawn(_worker, args=(world, free_port(), outdir, load_from, save_to), nprocs=world, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
