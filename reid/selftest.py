"""``torchrun --nproc_per_node=N -m reid selftest [--rows N --dim D --batch B]``: check a cluster before a long job.

Builds a random camera-sharded memory and batch (seeded), runs the sharded loss (reid.losses.sharded_ctacl_loss) in warm-up
and full mode, and compares loss and every anchor's gradient with the single-process ``reid.losses.ctacl_loss``
computed on rank 0 from gathered data (the whole memory on rank 0 is for this check only). Prints the largest
differences and the per-rank memory bytes; exit status 1 on a mismatch. Any backend: gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from reid import dist
from reid.data.sampler import partition_cameras
from reid.errors import ReidError
from reid.losses import ctacl_loss
from reid.memory import MemoryBank
from reid.losses import sharded_ctacl_loss


def _parse(argv):
    p = argparse.ArgumentParser(prog="reid selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000, help="memory rows N over all ranks")
    p.add_argument("--dim", type=int, default=256, help="embedding size D")
    p.add_argument("--batch", type=int, default=32, help="anchors per rank")
    p.add_argument("--cameras", type=int, default=20, help="cameras (at least the world size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", choices=("auto", "float32", "float64"), default="auto",
                   help="auto: float64 on CPU, float32 on GPU")
    p.add_argument("--tolerance", type=float, default=None, help="max relative difference (default 1e-6 fp64, "
                   "1e-3 fp32)")
    args = p.parse_args(argv)
    for name in ("rows", "dim", "batch", "cameras"):
        if getattr(args, name) < 1:
            raise ReidError(f"selftest: --{name} {getattr(args, name)} given, expected >= 1")
    return args


def _rel(a, b) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def main(argv) -> int:
    args = _parse(argv)
    env = dist.init_distributed(args.device)
    try:
        return _run(args, env)
    finally:
        dist.destroy()


def _run(args, env) -> int:
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(
        args.dtype, torch.float64 if env.device.type == "cpu" else torch.float32)
    tolerance = args.tolerance or (1e-6 if dtype == torch.float64 else 1e-3)
    g = torch.Generator().manual_seed(args.seed)
    cams = torch.randint(0, args.cameras, (args.rows,), generator=g)
    tracklets = torch.randint(0, max(1, args.rows // (4 * args.cameras)), (args.rows,), generator=g)
    shards = partition_cameras(np.bincount(cams.numpy(), minlength=args.cameras), env.world_size)
    own = torch.as_tensor(np.flatnonzero(np.isin(cams.numpy(), shards[env.rank])))
    if own.numel() < args.batch:
        raise ReidError(f"selftest: rank {env.rank} holds {own.numel()} rows, fewer than --batch {args.batch}; "
                        "expected more --rows")
    local = torch.Generator().manual_seed(args.seed * 1000 + 1 + env.rank)
    bank = MemoryBank(own, cams[own], tracklets[own], args.dim, args.cameras, env.device, dtype=dtype)
    bank.fill(own, torch.randn(own.numel(), args.dim, generator=local, dtype=dtype).to(env.device))
    pick = own[torch.randperm(own.numel(), generator=local)[: args.batch]]
    noise = torch.randn(args.batch, args.dim, generator=local, dtype=dtype).to(env.device)
    anchors = F.normalize(bank.rows[bank.local_index(pick)] + 0.3 * noise, dim=1)
    rows_dev = pick.to(env.device)
    cams_dev, tracklets_dev = cams[pick].to(env.device), tracklets[pick].to(env.device)

    # The whole memory and union batch on rank 0, for the reference only.
    shards_cpu = dist.gather_objects((bank.global_ids.cpu(), bank.rows.cpu()))
    batches = dist.gather_objects((pick, anchors.cpu()))
    failed, lines = False, []
    for mode, warmup in (("warm-up", True), ("full", False)):
        f = anchors.clone().requires_grad_()
        dist.reset_comm_bytes()
        start = time.perf_counter()
        out = sharded_ctacl_loss(f, cams_dev, tracklets_dev, rows_dev, bank, temperature=0.07, topk=5,
                                 grey_zone=0.01, cam_weight=0.2, warmup=warmup)
        out["loss"].backward()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        sent = dist.COMM_BYTES["bytes"]
        share = float(out["loss"].detach()) / env.world_size  # loss is scaled by R for DDP's averaging
        parts = dist.gather_objects((share, (f.grad / env.world_size).cpu()))
        if dist.is_main():
            memory = torch.empty(args.rows, args.dim, dtype=dtype)
            for ids, rows in shards_cpu:
                memory[ids] = rows.to(dtype)
            rows = torch.cat([b[0] for b in batches])
            ref_f = torch.cat([b[1] for b in batches]).requires_grad_()
            ref = ctacl_loss(ref_f, cams[rows], tracklets[rows], memory, cams, tracklets, temperature=0.07, topk=5,
                             grey_zone=0.01, cam_weight=0.2, warmup=warmup)
            ref.backward()
            loss = sum(p[0] for p in parts)
            ref_value = float(ref.detach())
            loss_rel = abs(loss - ref_value) / max(abs(ref_value), 1e-30)
            grad_rel = _rel(torch.cat([p[1] for p in parts]), ref_f.grad)
            ok = loss_rel <= tolerance and grad_rel <= tolerance
            failed |= not ok
            lines.append(f"{mode:8s} loss {loss:.8f} ref {ref_value:.8f} rel diff {loss_rel:.2e}  "
                         f"grad max rel diff {grad_rel:.2e}  {seconds * 1e3:.1f} ms  "
                         f"{sent / 1e6:.3f} MB sent by rank 0  {'OK' if ok else 'MISMATCH'}")
    nbytes = dist.gather_objects(bank.nbytes())
    if dist.is_main():
        ideal = args.rows / env.world_size * args.dim * torch.finfo(dtype).bits // 8
        print(f"reid selftest: {env.world_size} rank(s), backend {env.backend or 'none'}, device {env.device}, "
              f"N={args.rows} D={args.dim} B={args.batch}/rank {dtype}, tolerance {tolerance:g}")
        for line in lines:
            print("  " + line)
        print("  memory bytes per rank: " + ", ".join(f"{b / 1e6:.2f} MB" for b in nbytes)
              + f"  (N/R×D×{torch.finfo(dtype).bits // 8} = {ideal / 1e6:.2f} MB; ids/cams/tracklets included)")
        print("selftest " + ("FAILED" if failed else "passed"))
    failed = dist.broadcast_object(failed)
    return 1 if failed else 0
