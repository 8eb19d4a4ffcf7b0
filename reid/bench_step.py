"""`reid bench step`: images/s of the full training step against the backbone alone, in one run.

  full      model forward + ``sharded_ctacl_loss`` on a ``MemoryBank`` + backward + optimizer step + ``bank.update``
            (what ``reid.train.train_one_epoch`` runs per step, less its one-flag all-reduce and meter);
  backbone  the same model, batch and device: forward + a trivial loss (the embeddings' sum) + backward + step.
The two alternate in every repetition. full/backbone (time) is what the memory and the loss cost on top of the
model. Memories have the sizes of VeRi-776 and VeRi-Wild; on CUDA the model runs under bf16 autocast in
channels_last, as training does. Per full step the collectives (``reid.dist.COMM_BYTES``; none at world size 1)
and host synchronisations (CUDA sync debug mode, or the ``reid.syncs`` hook on CPU) are counted.
"""

from __future__ import annotations

import contextlib

import torch

from reid import dist
from reid.bench_common import LOSS_KW, dataset_bank, draw_batch, median, timed
from reid.losses import sharded_ctacl_loss
from reid.model import ReidNet
from reid.syncs import count_host_syncs
from reid.train import step_flags


def build_model(arch: str, device: torch.device):
    """ResNet (last stride 1) → BNNeck embedding, with training's SGD; on CUDA training's fast path: channels_last,
    fused SGD, cuDNN's autotuner."""
    model = ReidNet(arch, last_stride=1).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameter_groups(1e-3, 1e-4), lr=1e-3, momentum=0.9, weight_decay=5e-4,
                                nesterov=True, **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training's fast path (train.cudnn_benchmark)
    return model, optimizer


def autocast_for(device: torch.device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else contextlib.nullcontext())


def random_images(batch: int, height: int, width: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g).to(device)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def backbone_step(model, optimizer, images, device) -> None:
    with autocast_for(device):
        features = model(images)
    loss = features.float().sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def full_step(model, optimizer, images, bank, rows, cams, tracklets, device) -> None:
    with autocast_for(device):
        features = model(images)
    out = sharded_ctacl_loss(features.float(), cams, tracklets, rows, bank, check=False, **LOSS_KW)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    step_flags(out["loss"], out["missing"], False)  # training's one per-step flag exchange and host sync
    optimizer.step()
    bank.update(rows, features.detach().float(), check=False)  # after the loss, never before it (DESIGN §3)


def run_size(name: str, s, model, optimizer, device) -> dict:
    bank = dataset_bank(name, s.divisor, model.dim, s.seed, device)
    rows, cams, tracklets, _ = draw_batch(bank, s.batch, s.seed + 1)
    images = random_images(s.batch, s.height, s.width, device, s.seed + 2)
    backbone = lambda: backbone_step(model, optimizer, images, device)  # noqa: E731
    full = lambda: full_step(model, optimizer, images, bank, rows, cams, tracklets, device)  # noqa: E731

    backbone()  # warm-up: allocator, kernels, thread pools
    full()
    dist.reset_comm_bytes()
    full()
    comm = dict(dist.COMM_BYTES)
    method = "torch.cuda.set_sync_debug_mode('warn')" if device.type == "cuda" else "reid.syncs proxy (CPU)"
    with count_host_syncs(device) as got:
        full()
    syncs, sync_calls = got.count, dict(got.calls)
    backbones, fulls = [], []
    for _ in range(s.reps):
        backbones.append(timed(backbone, device)[0])
        fulls.append(timed(full, device)[0])
    t_backbone, t_full = median(backbones), median(fulls)
    return {
        "name": name, "N": len(bank), "cameras": bank.num_cameras, "B": s.batch, "D": model.dim,
        "backbone_s": t_backbone, "full_s": t_full,
        "backbone_images_per_s": s.batch / t_backbone, "full_images_per_s": s.batch / t_full,
        "full_over_backbone": median([f / b for f, b in zip(fulls, backbones)]),
        "backbones_s": backbones, "fulls_s": fulls,
        "collectives_per_step": comm["calls"], "comm_bytes_per_step": comm["bytes"],
        "host_syncs_per_step": syncs, "host_sync_calls": sync_calls, "host_sync_method": method,
    }


def run(s, device) -> dict:
    torch.manual_seed(s.seed)
    model, optimizer = build_model(s.arch, device)
    model.train()
    return {"arch": s.arch, "height": s.height, "width": s.width, "world_size": dist.world_size(),
            "autocast": "bf16" if device.type == "cuda" else "none",
            "sizes": [run_size(name, s, model, optimizer, device) for name in s.sizes.split(",")]}


def table(result: dict) -> str:
    head = (f"{'memory':9} {'N':>8} {'cams':>4} {'B':>4} {'D':>5} {'backbone img/s':>14} {'full img/s':>10} "
            f"{'full/backbone':>13} {'collectives':>11} {'host syncs':>10}")
    lines = [f"{result['arch']} at {result['height']}×{result['width']}, autocast {result['autocast']}, "
             f"world size {result['world_size']}", head, "-" * len(head)]
    for r in result["sizes"]:
        syncs = "?" if r["host_syncs_per_step"] is None else str(r["host_syncs_per_step"])
        lines.append(f"{r['name']:9} {r['N']:>8} {r['cameras']:>4} {r['B']:>4} {r['D']:>5} "
                     f"{r['backbone_images_per_s']:>14.1f} {r['full_images_per_s']:>10.1f} "
                     f"{r['full_over_backbone']:>13.2f} {r['collectives_per_step']:>11} {syncs:>10}")
    lines.append(f"host syncs: {result['sizes'][0]['host_sync_method']}")
    return "\n".join(lines)
