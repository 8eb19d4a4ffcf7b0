"""`reid bench scaling`: the distributed loss and the full step at 1, 2, 4 ranks (weak scaling, DESIGN §4).

Every rank keeps the same work: B anchors (or images) per rank and about the same memory rows per rank, so the
whole memory grows with R (R × rows_per_rank rows over R × cameras_per_rank cameras, camera shards as in
training). Ranks are spawned processes: gloo on CPU, NCCL when there is one GPU per rank. Per world size:
  loss  ``sharded_ctacl_loss`` forward + backward + ``bank.update`` on random anchors near their rows;
  full  the model (DDP, BatchNorm over all cameras as in training) + the same loss + optimizer step + update.
Reported per step: time (slowest rank's median), bytes and collectives each rank puts into ``reid.dist``
(DDP's gradient all-reduce is separate: the model's gradient bytes), images/s over all ranks, and the weak
scaling efficiency t(1 rank) / t(R ranks) (1.0 is perfect; ranks sharing few CPU cores cannot reach it).
Each rank generates only its own memory rows: no process holds the whole memory.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import tempfile

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from reid.bench_common import LOSS_KW, make_bank, median, memory_layout, sync, timed, usable_cores
from reid.losses import sharded_ctacl_loss


def _ddp(model, device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # BatchNorm buffers are kept equal by AllReduceBatchNorm (as in reid.train); newer torch renames the switch.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def _measure(fn, reps: int, device) -> tuple[float, int, int]:
    """(median seconds, bytes, collectives) of one step, ranks lined up by a barrier before each."""
    from reid import dist

    times, sent, calls = [], [], []
    for rep in range(reps + 1):  # the first step warms up and is not counted
        dist.barrier()
        dist.reset_comm_bytes()
        t, _ = timed(fn, device)
        if rep:
            times.append(t)
            sent.append(dist.COMM_BYTES["bytes"])
            calls.append(dist.COMM_BYTES["calls"])
    return median(times), int(np.median(sent)), int(np.median(calls))


def _worker(rank: int, world: int, port: int, s, device_name: str, outdir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from reid import dist
    from reid.batchnorm import convert_batchnorm
    from reid.bench_step import autocast_for, build_model, random_images
    from reid.data.sampler import partition_cameras
    
    env = dist.init_distributed(device_name)
    device = env.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, usable_cores() // world))
    try:
        torch.manual_seed(s.seed)  # the same initial model on every rank
        model, optimizer = build_model(s.arch, device)
        if world > 1:
            model = _ddp(convert_batchnorm(model), device)
        dim = model.module.dim if world > 1 else model.dim
        cameras = s.cameras_per_rank * world
        cams, tracklets = memory_layout(s.rows_per_rank * world, cameras, s.seed)
        shards = partition_cameras(np.bincount(cams.numpy(), minlength=cameras), world)
        own = torch.as_tensor(np.flatnonzero(np.isin(cams.numpy(), shards[rank])))
        bank = make_bank(own, cams[own], tracklets[own], dim, cameras, s.seed * 1000 + rank, device)
        g = torch.Generator().manual_seed(s.seed * 1000 + rank)
        pick = own[torch.randint(0, own.numel(), (s.batch,), generator=g)].to(device)
        pick_cams, pick_tracklets = bank.cams[bank.local_index(pick)], bank.tracklets[bank.local_index(pick)]
        noise = 0.3 * torch.randn(s.batch, dim, generator=g).to(device)
        images = random_images(s.batch, s.height, s.width, device, s.seed * 1000 + rank)

        def loss_step():
            f = F.normalize(bank.rows[bank.local_index(pick)].float() + noise, dim=1).requires_grad_(True)
            out = sharded_ctacl_loss(f, pick_cams, pick_tracklets, pick, bank, check=False, **LOSS_KW)
            out["loss"].backward()
            bank.update(pick, f.detach(), check=False)

        def full_step():
            with autocast_for(device):
                features = model(images)
            out = sharded_ctacl_loss(features.float(), pick_cams, pick_tracklets, pick, bank, check=False, **LOSS_KW)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            bank.update(pick, features.detach().float(), check=False)

        loss_s, loss_bytes, loss_calls = _measure(loss_step, s.reps, device)
        full_s, full_bytes, full_calls = _measure(full_step, s.reps, device)
        sync(device)
        gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        result = {"rank": rank, "rows": len(bank), "cameras": len(shards[rank]),
                  "loss_step_s": loss_s, "loss_comm_bytes": loss_bytes, "loss_collectives": loss_calls,
                  "full_step_s": full_s, "full_comm_bytes": full_bytes, "full_collectives": full_calls,
                  "ddp_gradient_bytes": gradient_bytes if world > 1 else 0,
                  "bank_bytes": bank.rows.numel() * bank.rows.element_size(), "dim": dim}
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
        dist.barrier()
    finally:
        dist.destroy()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(s, device) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the spawned ranks share the cores: no spinning
    worlds, skipped = [], []
    for world in (int(w) for w in s.worlds.split(",")):
        if device.type == "cuda" and world > torch.cuda.device_count():
            skipped.append(f"{world} ranks: {torch.cuda.device_count()} GPU(s)")
            continue
        with tempfile.TemporaryDirectory(prefix="reid-bench-") as outdir:
            mp.spawn(_worker, args=(world, _free_port(), s, device.type, outdir), nprocs=world, join=True)
            ranks = [json.load(open(os.path.join(outdir, f"rank{r}.json"))) for r in range(world)]
        worlds.append({
            "ranks": world, "backend": "nccl" if device.type == "cuda" else "gloo",
            "rows_per_rank": [r["rows"] for r in ranks], "B_per_rank": s.batch, "D": ranks[0]["dim"],
            "loss_step_s": max(r["loss_step_s"] for r in ranks), "full_step_s": max(r["full_step_s"] for r in ranks),
            "loss_comm_bytes_per_rank": max(r["loss_comm_bytes"] for r in ranks),
            "loss_collectives_per_step": max(r["loss_collectives"] for r in ranks),
            "full_comm_bytes_per_rank": max(r["full_comm_bytes"] for r in ranks),
            "full_collectives_per_step": max(r["full_collectives"] for r in ranks),
            "ddp_gradient_bytes_per_rank": ranks[0]["ddp_gradient_bytes"],
            "bank_bytes_per_rank": max(r["bank_bytes"] for r in ranks),
        })
    for w in worlds:
        w["full_images_per_s"] = w["ranks"] * s.batch / w["full_step_s"]
        w["loss_anchors_per_s"] = w["ranks"] * s.batch / w["loss_step_s"]
        base = next((x for x in worlds if x["ranks"] == 1), None)
        w["loss_efficiency"] = base["loss_step_s"] / w["loss_step_s"] if base else None
        w["full_efficiency"] = base["full_step_s"] / w["full_step_s"] if base else None
    return {"arch": s.arch, "height": s.height, "width": s.width, "cores": usable_cores(), "worlds": worlds,
            "skipped": skipped}


def table(r: dict) -> str:
    head = (f"{'R':>2} {'rows/rank':>9} {'loss s':>7} {'loss eff':>8} {'loss MB/rank':>12} {'coll':>4} "
            f"{'full s':>7} {'full img/s':>10} {'full eff':>8} {'full MB/rank':>12} {'coll':>4} {'+DDP MB':>7}")
    lines = [f"weak scaling, {r['arch']} at {r['height']}×{r['width']}, {r['cores']} CPU cores shared by all ranks"
             if r["worlds"] and r["worlds"][0]["backend"] == "gloo" else f"weak scaling, {r['arch']}", head,
             "-" * len(head)]
    for w in r["worlds"]:
        eff = lambda x: "?" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"{w['ranks']:>2} {max(w['rows_per_rank']):>9} {w['loss_step_s']:>7.3f} "
                     f"{eff(w['loss_efficiency']):>8} {w['loss_comm_bytes_per_rank'] / 1e6:>12.3f} "
                     f"{w['loss_collectives_per_step']:>4} {w['full_step_s']:>7.3f} {w['full_images_per_s']:>10.1f} "
                     f"{eff(w['full_efficiency']):>8} {w['full_comm_bytes_per_rank'] / 1e6:>12.3f} "
                     f"{w['full_collectives_per_step']:>4} {w['ddp_gradient_bytes_per_rank'] / 1e6:>7.1f}")
    lines += [f"skipped: {x}" for x in r["skipped"]]
    return "\n".join(lines)
