"""The training loop: one `main(cfg)` for a single process, torchrun and SLURM (DESIGN §3-4).

Read top to bottom: set-up (distributed env, data, camera shards, model, memory bank, optimizer, resume),
then per epoch: memory fill/refresh, `train_one_epoch`, evaluation points, checkpoint; then the final report.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from reid import dist
from reid.config import Config, config_from_dict, config_to_dict, save_config
from reid.data.images import TrainImages, eval_transform, train_transform
from reid.data.readers import load_dataset
from reid.data.sampler import CameraShardSampler, partition_cameras, shard_imbalance
from reid.data.synthetic import ensure_synthetic
from reid.errors import ReidError
from reid.features import extract_features, make_loader
from reid.memory import MemoryBank
from reid.model import build_model
from reid.report import evaluate_model, mined_positive_precision, write_report
from reid.sharded_loss import sharded_ctacl_loss

CHECKPOINT = "checkpoint.pt"


def log(*args) -> None:
    if dist.is_main():
        print(*args, flush=True)


def prepare_dataset(cfg: Config):
    """Read the dataset; the synthetic format is generated (once, by rank 0) if missing."""
    if cfg.data.format == "synthetic":
        if dist.is_main():
            ensure_synthetic(cfg.data.root, cfg.synth)
        dist.barrier()
        return load_dataset("veri776", cfg.data.root, check_images=cfg.data.check_images)
    return load_dataset(cfg.data.format, cfg.data.root, cfg.data.protocol, check_images=cfg.data.check_images)


def learning_rates(cfg: Config, epoch: int) -> tuple[float, float]:
    """Step schedule: ×gamma every `lr_step` epochs, for (new layers, backbone)."""
    factor = cfg.train.lr_gamma ** (epoch // cfg.train.lr_step) if cfg.train.lr_step > 0 else 1.0
    return cfg.train.lr * factor, cfg.train.backbone_lr * factor


def fill_memory(model, bank: MemoryBank, train, cfg: Config, env) -> None:
    """Full feature pass over this rank's rows (eval transforms, no grad) → memory rows."""
    rows = bank.global_ids.cpu().numpy()
    feats = extract_features(model, [train.paths[i] for i in rows], eval_transform(cfg.data.height, cfg.data.width),
                             batch_size=cfg.eval.batch_size, device=env.device, workers=cfg.data.workers,
                             skip_corrupt=cfg.data.skip_corrupt, progress="memory" if dist.is_main() else None)
    bank.fill(bank.global_ids, feats)


def train_one_epoch(model, loader, bank, optimizer, cfg: Config, env, epoch: int, warmup: bool, writer, step0: int,
                    train_pids: np.ndarray | None) -> dict:
    model.train()
    lc = cfg.loss
    totals = {"loss": 0.0, "intra": 0.0, "inter": 0.0, "cam": 0.0}
    precision = np.zeros(4)  # hard hits, hard count, easy hits, easy count (diagnostic: identities never reach the loss)
    seen, start = 0, time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.amp and env.device.type == "cuda")
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not dist.is_main(), leave=False)
    for step, (images, cams, tracklets, rows) in enumerate(bar):
        images = images.to(env.device, non_blocking=True)
        cams, tracklets, rows = (t.to(env.device) for t in (cams, tracklets, rows))
        with autocast:
            features = model(images)
        parts = sharded_ctacl_loss(
            features.float(), cams, tracklets, rows, bank, temperature=lc.temperature, topk=lc.topk,
            grey_zone=lc.grey_zone, cam_weight=lc.cam_weight, warmup=warmup, exact=lc.exact,
            hard_topk=lc.topk if lc.hard_positives else 0, easy_topk=lc.topk if lc.easy_positives else 0)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        bank.update(rows, features.detach().float())  # after the loss, never before it (DESIGN §3)

        total = parts["intra"] if warmup else parts["inter"] + lc.cam_weight * parts["cam"]
        for key, value in (("loss", total), ("intra", parts["intra"]), ("inter", parts["inter"]), ("cam", parts["cam"])):
            totals[key] += float(value)
        if train_pids is not None and not warmup:
            precision += mined_positive_precision(train_pids, rows.cpu().numpy(), parts.get("hard_ids"),
                                                  parts.get("easy_ids"))
        seen += images.shape[0]
        if dist.is_main() and writer is not None and (step % cfg.train.log_every == 0):
            writer.add_scalar("loss/total", float(total), step0 + step)
            for key in ("intra", "inter", "cam"):
                writer.add_scalar(f"loss/{key}", float(parts[key]), step0 + step)
            bar.set_postfix(loss=f"{float(total):.3f}")
    n = max(1, len(loader))
    elapsed = time.time() - start
    out = {k: v / n for k, v in totals.items()}
    out["images_per_s_per_rank"] = seen / max(elapsed, 1e-9)
    precision = dist.sum_across_ranks(torch.tensor(precision, dtype=torch.float64, device=env.device)).cpu().numpy()
    if precision[1] > 0:
        out["hard_positive_precision"] = precision[0] / precision[1]
    if precision[3] > 0:
        out["easy_positive_precision"] = precision[2] / precision[3]
    return out


def save_checkpoint(cfg: Config, model, optimizer, bank: MemoryBank, next_epoch: int, metrics: dict) -> None:
    """Memory shards into a fresh per-epoch folder first, then the checkpoint that points at it (atomic replace):
    a pre-emption at any moment leaves the previous complete checkpoint in place."""
    out = cfg.output_dir
    memory_dir = os.path.join(out, f"memory_e{next_epoch:04d}")
    bank.save(memory_dir)
    dist.barrier()
    if dist.is_main():
        state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": next_epoch,
                 "memory_dir": os.path.basename(memory_dir), "metrics": metrics, "config": config_to_dict(cfg)}
        tmp = os.path.join(out, CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(out, CHECKPOINT))
        for name in os.listdir(out):
            if name.startswith("memory_e") and name != os.path.basename(memory_dir):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    dist.barrier()


def _unwrap(model):
    return model.module if isinstance(model, DDP) else model


def main(cfg: Config) -> dict:
    env = dist.init_distributed(cfg.device)
    try:
        return _run(cfg, env)
    finally:
        dist.destroy()


def _run(cfg: Config, env) -> dict:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    dataset = prepare_dataset(cfg)
    train = dataset.train
    num_cameras = len(dataset.camera_names)
    images_per_camera = np.bincount(train.cams, minlength=num_cameras)
    shards = partition_cameras(images_per_camera, env.world_size)
    own = np.flatnonzero(np.isin(train.cams, shards[env.rank]))
    largest = max(int(images_per_camera[s].sum()) for s in shards)
    steps = cfg.train.steps_per_epoch or max(1, largest // cfg.train.batch_size)
    log(f"{dataset.name}: {len(train)} training images, {num_cameras} cameras, "
        f"{len(np.unique(train.tracklets))} tracklets; {env.world_size} rank(s) on {env.device}, "
        f"camera-shard imbalance {shard_imbalance(images_per_camera, shards):.3f} (max/mean images per rank), "
        f"{steps} steps/epoch of {cfg.train.batch_size} images per rank")

    model = build_model(cfg.model).to(env.device)
    bank = MemoryBank(torch.as_tensor(own), torch.as_tensor(train.cams[own]), torch.as_tensor(train.tracklets[own]),
                      dim=model.dim, num_cameras=num_cameras, device=env.device,
                      dtype=torch.bfloat16 if cfg.memory.dtype == "bfloat16" else torch.float32)
    optimizer = torch.optim.SGD(model.parameter_groups(cfg.train.lr, cfg.train.backbone_lr), lr=cfg.train.lr,
                                momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay, nesterov=True)
    if env.world_size > 1:
        if cfg.model.sync_bn:
            if env.device.type != "cuda":
                raise ReidError("model.sync_bn=true needs CUDA ranks (torch's SyncBatchNorm is GPU-only); "
                                "on CPU ranks use model.sync_bn=false")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    start_epoch, metrics = 0, {}
    ckpt_path = os.path.join(cfg.output_dir, CHECKPOINT)
    if cfg.train.resume and os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        bank.load(os.path.join(cfg.output_dir, ckpt["memory_dir"]))
        start_epoch, metrics = ckpt["epoch"], ckpt["metrics"]
        log(f"resumed from epoch {start_epoch} ({ckpt_path})")
    if dist.is_main():
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    writer = SummaryWriter(os.path.join(cfg.output_dir, "tb")) if dist.is_main() else None

    records = train.training_view()  # no identities on the training side
    dataset_images = TrainImages(records.paths, records.cams, records.tracklets,
                                 train_transform(cfg.data.height, cfg.data.width, **vars(cfg.augment)),
                                 skip_corrupt=cfg.data.skip_corrupt)
    sampler = CameraShardSampler(records.cams, shards[env.rank], cfg.train.batch_size, steps, cfg.seed)
    loader = make_loader(dataset_images, cfg.train.batch_size, cfg.data.workers, sampler=sampler, drop_last=True,
                         generator=torch.Generator(), pin_memory=env.device.type == "cuda")
    labelled = cfg.eval.diagnostics and (train.pids >= 0).all()

    def evaluation_point(name: str, epoch: int, features: dict | None = None) -> None:
        if dist.is_main():
            result = evaluate_model(_unwrap(model), dataset, cfg, env.device, features)
            metrics[name] = result
            for key, value in result.items():
                writer.add_scalar(f"eval/{key}", value, epoch)
            log(f"[{name}] mAP {100 * result['mAP']:.1f}  R1 {100 * result['rank1']:.1f}")
        dist.barrier()

    if start_epoch == 0 and "untrained" not in metrics:
        evaluation_point("untrained", 0)
    for epoch in range(start_epoch, cfg.train.epochs):
        # Per-epoch seeds make an interrupted-and-resumed run retrace an uninterrupted one.
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + env.rank)
        sampler.set_epoch(epoch)
        loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        if epoch % cfg.memory.refresh_every == 0:  # otherwise a resumed run continues with the saved memory
            # Every rank embeds its rows with rank 0's BN statistics — the model a resumed run loads.
            dist.broadcast_buffers(_unwrap(model))
            fill_memory(_unwrap(model), bank, train, cfg, env)
        lr, backbone_lr = learning_rates(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = backbone_lr if group.get("name") == "backbone" else lr
        warmup = epoch < cfg.train.warmup_epochs
        stats = train_one_epoch(model, loader, bank, optimizer, cfg, env, epoch, warmup, writer, epoch * steps,
                                train.pids if labelled else None)
        metrics.setdefault("epochs", []).append({"epoch": epoch, "warmup": warmup, **stats})
        if dist.is_main():
            for key, value in stats.items():
                writer.add_scalar(f"epoch/{key}", value, epoch)
            writer.add_scalar("lr/new_layers", lr, epoch)
            writer.add_scalar("lr/backbone", backbone_lr, epoch)
            extra = "".join(f"  {k} {v:.3f}" for k, v in stats.items() if k.endswith("precision"))
            log(f"epoch {epoch} ({'warm-up' if warmup else 'full'}): loss {stats['loss']:.3f} "
                f"intra {stats['intra']:.3f} inter {stats['inter']:.3f} cam {stats['cam']:.3f}  "
                f"{stats['images_per_s_per_rank']:.0f} img/s/rank{extra}")
        if epoch == cfg.train.warmup_epochs - 1 and cfg.train.warmup_epochs < cfg.train.epochs:
            evaluation_point("warmup", epoch + 1)
        elif cfg.eval.every and (epoch + 1) % cfg.eval.every == 0 and epoch + 1 < cfg.train.epochs:
            evaluation_point(f"epoch{epoch + 1}", epoch + 1)
        save_checkpoint(cfg, model, optimizer, bank, epoch + 1, metrics)

    final_features: dict = {}
    if "final" not in metrics:
        evaluation_point("final", cfg.train.epochs, final_features)
    if dist.is_main():
        write_report(_unwrap(model), dataset, cfg, metrics, env.device, final_features)
        writer.close()
    dist.barrier()
    return metrics


def evaluate_checkpoint(path: str, overrides: list[str]) -> dict:
    """`reid evaluate`: a checkpoint on its (or an overridden) dataset's query/gallery split."""
    from reid.model import load_model_from_checkpoint

    model, cfg_dict = load_model_from_checkpoint(path)
    cfg = config_from_dict(cfg_dict, overrides)
    dataset = prepare_dataset(cfg)
    return evaluate_model(model, dataset, cfg, torch.device("cpu"))

