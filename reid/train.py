"""The training loop: one `main(cfg)` for a single process, torchrun and SLURM (DESIGN §3-4).

Read top to bottom: set-up (distributed env, data, camera shards, model, memory bank, optimizer, resume),
then per epoch: memory fill/refresh, `train_one_epoch`, evaluation points, checkpoint; then the final report.
World-size invariance (DESIGN §4): the global batch, every image's augmentation and the BatchNorm statistics
do not depend on the number of ranks, so 1, 2 or 8 ranks train the same model.
"""
from __future__ import annotations

import functools
import inspect
import os
import time

import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from reid import dist
from reid.batchnorm import convert_batchnorm, merge_running_stats
from reid.checkpoint import check_output_dir, checkpoint_bytes, load_for_resume, save_checkpoint, unwrap
from reid.config import Config, config_from_dict, save_config
from reid.data.gpu_decode import make_gpu_pipeline
from reid.data.images import TrainBatch, TrainImages, eval_transform, train_transform
from reid.data.readers import load_dataset
from reid.data.sampler import GlobalBatchSampler, partition_cameras, shard_imbalance
from reid.data.synthetic import ensure_synthetic
from reid.errors import ReidError
from reid.features import extract_features, make_loader
from reid.memory import MemoryBank
from reid.meters import TrainMeter
from reid.model import build_model
from reid.report import embed_for_evaluation, save_evaluation_pictures, score, write_report
from reid.losses import sharded_ctacl_loss

TRAIN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def memory_dtype(cfg: Config) -> torch.dtype:
    """Memory rows: bf16 when asked, float64 with a float64 model (the exactness checks), else fp32."""
    if cfg.train.dtype == "float64":
        return torch.float64
    return torch.bfloat16 if cfg.memory.dtype == "bfloat16" else torch.float32


def fast_path(cfg: Config, env) -> dict:
    """The GPU fast-path switches as decided for this device ("auto" = on CUDA only): channels_last, fused SGD."""
    cuda = env.device.type == "cuda"

    def on(value: str) -> bool:
        return cuda if value == "auto" else value == "true"

    return {"channels_last": on(cfg.train.channels_last), "fused_optimizer": on(cfg.train.fused_optimizer)}


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
    """Full feature pass over this rank's rows (eval transforms, no grad) → memory rows: the camera shards already
    split the fill over ranks."""
    rows = bank.global_ids.cpu().numpy()
    feats = extract_features(model, [train.paths[i] for i in rows], eval_transform(cfg.data.height, cfg.data.width),
                             batch_size=cfg.eval.batch_size, device=env.device, workers=cfg.data.workers,
                             skip_corrupt=cfg.data.skip_corrupt, progress="memory" if dist.is_main() else None,
                             amp=cfg.train.amp)
    bank.fill(bank.global_ids, feats)


def train_one_epoch(model, loader, bank: MemoryBank, optimizer, cfg: Config, env, epoch: int, warmup: bool,
                    meter: TrainMeter, start_step: int = 0, save_step=None, augment=None) -> dict:
    """One pass over the epoch's global batches (from ``start_step`` when resuming mid-epoch); this rank loads and
    embeds its cameras' part of each. ``save_step(step=, meter_state=)`` writes a mid-epoch checkpoint when one is
    due (train.checkpoint_every_steps / _min). ``augment``: with ``data.decode=gpu`` the loader gives file bytes and
    this turns them into the batch on the device (reid.data.gpu_decode)."""
    model.train()
    lc = cfg.loss
    dtype = TRAIN_DTYPES[cfg.train.dtype]
    amp = cfg.train.amp and env.device.type == "cuda" and dtype == torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)
    layout = torch.channels_last if fast_path(cfg, env)["channels_last"] else torch.contiguous_format
    last_save, end = time.time(), start_step + len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not dist.is_main(), leave=False)
    try:
        for step, (images, cams, tracklets, rows) in enumerate(bar, start=start_step):
            if augment is not None:
                images = augment(images)
            images = images.to(env.device, dtype, non_blocking=True).contiguous(memory_format=layout)
            cams, tracklets, rows = (t.to(env.device, non_blocking=True) for t in (cams, tracklets, rows))
            with autocast:
                features = model(images)
            parts = sharded_ctacl_loss(
                features.to(dtype), cams, tracklets, rows, bank, temperature=lc.temperature, topk=lc.topk,
                grey_zone=lc.grey_zone, cam_weight=lc.cam_weight, warmup=warmup, check=False, variant=lc.variant,
                hard_topk=lc.topk if lc.hard_positives else 0, easy_topk=lc.topk if lc.easy_positives else 0)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            minutes = cfg.train.checkpoint_every_min
            bad, missing, time_due = step_flags(parts["loss"], parts["missing"],
                                                minutes > 0 and time.time() - last_save >= 60 * minutes)
            if missing:
                raise ReidError(f"epoch {epoch} step {step}: anchors on rank(s) {missing} have no memory row of "
                                "their own camera and tracklet, expected each anchor's own row in its rank's shard")
            if bad:  # the same answer on every rank, so all stop or all skip together
                if not cfg.train.skip_nonfinite:
                    raise ReidError(nonfinite_message(cfg, epoch, step, bad, parts))
                meter.skipped += 1  # no optimizer step, no memory update: the step never happened
                continue
            optimizer.step()
            bank.update(rows, features.detach().to(dtype), check=False)  # after the loss, never before it (DESIGN §3)
            total = parts["intra"] if warmup else parts["inter"] + lc.cam_weight * parts["cam"]
            shown = meter.update(step, parts, total, rows, warmup)
            if shown is not None:
                bar.set_postfix(loss=shown)
            every = cfg.train.checkpoint_every_steps
            due = time_due or (every > 0 and (step + 1) % every == 0)
            if save_step is not None and due and step + 1 < end:  # the epoch's end writes its own checkpoint
                save_step(step=step + 1, meter_state=meter.state())
                last_save = time.time()
    finally:
        bar.close()  # also on errors, so an error message starts its own line
    return meter.summary()


def step_flags(loss: torch.Tensor, missing: torch.Tensor, save_due: bool) -> tuple[list[int], list[int], bool]:
    """The step's one host synchronisation: one small all-reduce, the same answer on every rank. Returns the ranks
    whose loss is NaN or infinite, the ranks with an anchor that has no memory row of its own tracklet (``missing``:
    0-dim bool from the loss), and whether rank 0's clock says a mid-epoch checkpoint is due."""
    world, rank = dist.world_size(), dist.rank()
    flags = torch.zeros(2 * world + 1, device=loss.device)
    flags[rank] = (~torch.isfinite(loss.detach())).float()
    flags[world + rank] = missing.float()
    flags[-1] = float(save_due and dist.is_main())
    flags = dist.sum_across_ranks(flags).tolist()
    return ([r for r in range(world) if flags[r] > 0], [r for r in range(world) if flags[world + r] > 0],
            flags[-1] > 0)


def nonfinite_message(cfg: Config, epoch: int, step: int, ranks: list[int], parts: dict) -> str:
    values = ", ".join(f"{k} {float(parts[k]):.4g}" for k in ("intra", "inter", "cam"))
    return (f"non-finite loss at epoch {epoch} step {step} on rank(s) {ranks} ({values}; this rank's loss "
            f"{float(parts['loss'].detach()):.4g}): training stopped; the last complete checkpoint in "
            f"{cfg.output_dir} is intact. Expected finite losses (lower train.lr?), or train.skip_nonfinite=true "
            "to skip such steps")


def same_batchnorm_statistics(model, cfg: Config, env, own_images: int) -> None:
    """Make every rank's BatchNorm running statistics the same before a memory fill, an evaluation or a save.

    With BatchNorm over all cameras they already are (every rank normalised the union batch). With per-rank
    BatchNorm each rank's statistics describe its cameras only: merge them, weighted by the images each rank
    owns, so that no stored model carries one shard's statistics.
    """
    if env.world_size > 1 and cfg.model.batchnorm == "per_rank":
        merge_running_stats(unwrap(model), float(own_images))


def evaluation_point(name: str, epoch: int, model, dataset, cfg: Config, env, metrics: dict, writer,
                     features: dict | None = None) -> None:
    """Every rank embeds a share of query and gallery; rank 0 scores them and records the result under
    ``metrics[name]``, in TensorBoard at ``epoch`` (scalars, the retrieval grid, the per-camera mAP chart) and as
    pictures under ``output_dir/pictures``. ``features`` receives the embeddings."""
    features = {} if features is None else features
    features.update(embed_for_evaluation(unwrap(model), dataset, cfg, env.device))
    if dist.is_main():
        result = score(features, cfg)
        for key, value in result.items():
            writer.add_scalar(f"eval/{key}", value, epoch)
        pictures, result["camera_mAP"] = save_evaluation_pictures(features, dataset, cfg, name)
        for kind, path in pictures.items():
            with Image.open(path) as image:
                writer.add_image(f"eval/{kind}", np.asarray(image.convert("RGB")), epoch, dataformats="HWC")
        metrics[name] = result
        log(f"[{name}] mAP {100 * result['mAP']:.1f}  R1 {100 * result['rank1']:.1f}")
    dist.barrier()


# BatchNorm buffers are made equal by the BatchNorm itself (or merged, per_rank), not copied from rank 0 at every
# forward. Newer torch names the switch forward_sync_buffers (broadcast_buffers is deprecated there).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})




def main(cfg: Config) -> dict:
    env = dist.init_distributed(cfg.device)
    try:
        return _run(cfg, env)
    finally:
        dist.destroy()


def _run(cfg: Config, env) -> dict:
    if cfg.data.protocol == "all":
        raise ReidError("config key 'data.protocol': all is for `reid evaluate` (the three VeRi-Wild protocols "
                        "from one embedding pass); expected small, medium or large for training")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    check_output_dir(cfg.output_dir, 0)  # creatable and writable before the data is even read
    dataset = prepare_dataset(cfg)
    train = dataset.train
    num_cameras = len(dataset.camera_names)
    images_per_camera = np.bincount(train.cams, minlength=num_cameras)
    shards = partition_cameras(images_per_camera, env.world_size)
    own = np.flatnonzero(np.isin(train.cams, shards[env.rank]))
    records = train.training_view()  # no identities on the training side
    # The global batch of every step is drawn without knowing the world size; this rank loads its cameras' part.
    sampler = GlobalBatchSampler(records.cams, cfg.train.batch_size, cfg.seed, shard_cams=shards[env.rank],
                                 max_steps=cfg.train.steps_per_epoch)
    steps = len(sampler)
    per_rank = sampler.rank_counts(0, shards)
    log(f"{dataset.name}: {len(train)} training images, {num_cameras} cameras, "
        f"{len(np.unique(train.tracklets))} tracklets; {env.world_size} rank(s) on {env.device}, "
        f"camera-shard imbalance {shard_imbalance(images_per_camera, shards):.3f} (max/mean images per rank)")
    log(f"global batch {cfg.train.batch_size} images, {steps} steps/epoch; images per rank per step (epoch 0): "
        + ", ".join(f"rank {r} {per_rank[:, r].min()}-{per_rank[:, r].max()} (mean {per_rank[:, r].mean():.1f})"
                    for r in range(env.world_size)))
    if env.world_size > 1 and cfg.model.batchnorm == "per_rank":
        fewest = sampler.fewest_per_rank(shards, cfg.train.epochs)
        if fewest < 2:
            raise ReidError(f"model.batchnorm=per_rank: a rank gets {fewest} image(s) at some step of the global "
                            f"batch {cfg.train.batch_size}, expected at least 2 per rank for per-rank BatchNorm "
                            "(raise train.batch_size or use model.batchnorm=all_cameras)")

    fast = fast_path(cfg, env)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    model = build_model(cfg.model).to(env.device, TRAIN_DTYPES[cfg.train.dtype])
    if fast["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if env.world_size > 1:
        if cfg.model.batchnorm == "all_cameras":  # the union batch's statistics, identical on every rank
            model = convert_batchnorm(model)
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None, **_NO_BUFFER_SYNC)
    bank = MemoryBank(torch.as_tensor(own), torch.as_tensor(train.cams[own]), torch.as_tensor(train.tracklets[own]),
                      dim=unwrap(model).dim, num_cameras=num_cameras, device=env.device,
                      dtype=memory_dtype(cfg))
    optimizer = torch.optim.SGD(unwrap(model).parameter_groups(cfg.train.lr, cfg.train.backbone_lr),
                                lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay,
                                nesterov=True, **({"fused": True} if fast["fused_optimizer"] else {"foreach": True}))
    # The loss and its collectives stay eager; only the network is compiled. Checkpoints hold the plain model.
    step_model = torch.compile(model, backend=cfg.train.compile_backend) if cfg.train.compile else model

    # Before any training: a folder that cannot take one checkpoint is a one-line error, not a lost run.
    check_output_dir(cfg.output_dir, checkpoint_bytes(unwrap(model), 1, len(train), bank.dim,
                                                      bank.rows.element_size()))
    resume = load_for_resume(cfg, model, optimizer, bank, log)
    start_epoch, metrics = resume.epoch, resume.metrics
    if dist.is_main():
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    writer = SummaryWriter(os.path.join(cfg.output_dir, "tb")) if dist.is_main() else None

    if cfg.data.decode == "gpu":  # workers read file bytes; the training device decodes and augments
        dataset_images, collate, augment = make_gpu_pipeline(cfg, records.paths, records.cams, records.tracklets,
                                                             env.device)
    else:
        dataset_images = TrainImages(records.paths, records.cams, records.tracklets,
                                     train_transform(cfg.data.height, cfg.data.width, **vars(cfg.augment)),
                                     skip_corrupt=cfg.data.skip_corrupt)
        collate, augment = TrainBatch(cfg.data.height, cfg.data.width), None
    # Workers persist over epochs and keep batches prefetched; the batch sampler runs here, so epochs still differ.
    loader = make_loader(dataset_images, None, cfg.data.workers, batch_sampler=sampler, collate_fn=collate,
                         pin_memory=env.device.type == "cuda" and augment is None,
                         persistent_workers=cfg.data.workers > 0,
                         **({"prefetch_factor": 4} if cfg.data.workers > 0 else {}))
    labelled = cfg.eval.diagnostics and (train.pids >= 0).all()

    if start_epoch == 0 and "untrained" not in metrics:
        evaluation_point("untrained", 0, model, dataset, cfg, env, metrics, writer)
    for epoch in range(start_epoch, cfg.train.epochs):
        # Per-epoch seeds (no rank term) make a resumed run retrace an uninterrupted one at any world size.
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101)
        mid_epoch = epoch == start_epoch and resume.step > 0  # resumed from a mid-epoch checkpoint
        sampler.set_epoch(epoch, resume.step if mid_epoch else 0)
        if mid_epoch and resume.torch_rng is not None:
            torch.set_rng_state(resume.torch_rng)
        if epoch % cfg.memory.refresh_every == 0 and not mid_epoch:  # else the saved memory continues
            fill_memory(unwrap(model), bank, train, cfg, env)
        lr, backbone_lr = learning_rates(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = backbone_lr if group.get("name") == "backbone" else lr
        warmup = epoch < cfg.train.warmup_epochs
        meter = TrainMeter(env.device, train.pids if labelled else None, writer, cfg.train.log_every, epoch * steps)
        if mid_epoch and resume.meters:
            meter.restore(resume.meters, env.rank, env.world_size)
        save_step = functools.partial(save_checkpoint, cfg, model, optimizer, bank, epoch, metrics)
        stats = train_one_epoch(step_model, loader, bank, optimizer, cfg, env, epoch, warmup, meter,
                                resume.step if mid_epoch else 0, save_step, augment)
        same_batchnorm_statistics(model, cfg, env, len(own))
        metrics.setdefault("epochs", []).append({"epoch": epoch, "warmup": warmup, **stats})
        if dist.is_main():
            for key, value in stats.items():
                writer.add_scalar(f"epoch/{key}", value, epoch)
            writer.add_scalar("lr/new_layers", lr, epoch)
            writer.add_scalar("lr/backbone", backbone_lr, epoch)
            extra = "".join(f"  {k} {v:.3f}" for k, v in stats.items() if k.endswith("precision"))
            extra += f"  skipped {stats['skipped_steps']} non-finite step(s)" if "skipped_steps" in stats else ""
            log(f"epoch {epoch} ({'warm-up' if warmup else 'full'}): loss {stats['loss']:.3f} "
                f"intra {stats['intra']:.3f} inter {stats['inter']:.3f} cam {stats['cam']:.3f}  "
                f"{stats['images_per_s_per_rank']:.0f} img/s/rank{extra}")
        if epoch == cfg.train.warmup_epochs - 1 and cfg.train.warmup_epochs < cfg.train.epochs:
            evaluation_point("warmup", epoch + 1, model, dataset, cfg, env, metrics, writer)
        elif cfg.eval.every and (epoch + 1) % cfg.eval.every == 0 and epoch + 1 < cfg.train.epochs:
            evaluation_point(f"epoch{epoch + 1}", epoch + 1, model, dataset, cfg, env, metrics, writer)
        save_checkpoint(cfg, model, optimizer, bank, epoch + 1, metrics)

    final_features: dict = {}
    evaluation_point("final", cfg.train.epochs, model, dataset, cfg, env, metrics, writer, final_features)
    if dist.is_main():
        write_report(unwrap(model), cfg, metrics, final_features)
        writer.close()
    dist.barrier()
    return metrics


def evaluate_checkpoint(path: str, overrides: list[str]) -> dict | None:
    """`reid evaluate`: a checkpoint on its (or an overridden) dataset's query/gallery split; under torchrun every
    rank embeds a share. ``data.protocol=all`` (VeRi-Wild) scores small, medium and large from one embedding pass.
    Returns the result on rank 0, None on the other ranks."""
    from reid.model import load_model_from_checkpoint
    from reid.report import evaluate_veriwild_protocols, format_protocol_table

    model, cfg_dict = load_model_from_checkpoint(path)
    cfg = config_from_dict(cfg_dict, overrides)
    # The GPU when there is one, whatever device the checkpoint was trained on, unless `device=` is given.
    env = dist.init_distributed(cfg.device if any(o.startswith("device=") for o in overrides) else "auto")
    try:
        model = model.to(env.device)
        if cfg.data.protocol == "all":
            results = evaluate_veriwild_protocols(model, cfg, env.device)
            if results is not None:
                print(format_protocol_table(results), flush=True)
            return results
        features = embed_for_evaluation(model, prepare_dataset(cfg), cfg, env.device)
        return score(features, cfg) if dist.is_main() else None
    finally:
        dist.destroy()
