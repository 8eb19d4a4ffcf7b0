"""Checkpoints of a run: complete or absent, where they go, when a resume may use them (DESIGN §4, issue 13).

Layout under ``output_dir``: ``checkpoints/eNNNN.pt`` (model, optimizer, next epoch, metrics, config; rank 0),
``checkpoints/eNNNN_memory/`` (one file per rank: rows by global id, so any world size can resume) and
``checkpoints/eNNNN.json``, the manifest (world size, epoch, every file with its size and SHA-256), written last.
A checkpoint exists only when its manifest does and every file matches it; each file is written to a temporary
name, fsync'ed, renamed, and its folder fsync'ed, so a crash at any moment leaves the previous checkpoints whole.
``checkpoint.pt`` at the top is a hard link to the newest state file (for tools that read it). The newest
``train.keep_checkpoints`` are kept. A resume takes the newest complete checkpoint, names in one line any newer one
that is truncated or corrupt, and refuses one of other data or another model.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch

from reid import dist
from reid.config import Config, config_to_dict
from reid.errors import ReidError
from reid.memory import MemoryBank

CHECKPOINT = "checkpoint.pt"  # a link to the newest complete state file, for tools
FOLDER = "checkpoints"
# Keys whose change makes a checkpoint another run's: other data (rows would not match) or another network.
BREAKING = ("data.format", "data.root", "data.protocol", "model.arch", "model.last_stride")
BREAKING_SECTIONS = ("synth.",)  # the synthetic generator's settings define the data
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
MID_EPOCH_BREAKING = ("train.batch_size", "train.steps_per_epoch", "seed")  # they define the epoch's batches


def unwrap(model):
    """The plain model inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def checkpoint_bytes(model, optimizer_slots: int, memory_rows: int, memory_dim: int, memory_bytes: int) -> int:
    """Rough size of one checkpoint: parameters and buffers, ``optimizer_slots`` copies of the parameters
    (momentum), and the whole memory bank (all ranks' shards together)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params * (1 + optimizer_slots) + buffers + memory_rows * (memory_dim * memory_bytes + 24)


def check_output_dir(path: str, needed_bytes: int) -> None:
    """One-line ReidError unless ``path`` can be created, written and holds ``needed_bytes`` more (with a 10 %
    margin). Run on every rank before any training step, so all stop alike."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ReidError(f"output_dir '{path}': cannot be created or written ({exc.strerror or exc}), "
                        "expected a writable folder") from None
    free = shutil.disk_usage(path).free
    if free < 1.1 * needed_bytes:
        raise ReidError(f"output_dir '{path}': {free / 2**20:.0f} MiB free, expected room for one checkpoint "
                        f"(about {needed_bytes / 2**20:.0f} MiB: model, optimizer state and memory bank)")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, cfg: Config, mid_epoch: bool = False) -> tuple[list[str], list[str]]:
    """(breaking, harmless) differences between a checkpoint's config and ``cfg``, as 'key: old → new' texts.
    In the middle of an epoch the batch draw must not change either (``MID_EPOCH_BREAKING``)."""
    old, new = _flat(saved), _flat(config_to_dict(cfg))
    breaking, harmless = [], []
    for key in sorted(set(old) | set(new)):
        if key in old and key in new and old[key] == new[key]:
            continue
        text = f"{key}: {old.get(key, '(absent)')!r} → {new.get(key, '(absent)')!r}"
        if key in BREAKING or key.startswith(BREAKING_SECTIONS) or mid_epoch and key in MID_EPOCH_BREAKING:
            breaking.append(text)
        else:
            harmless.append(text)
    return breaking, harmless


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, obj=None, data: bytes | None = None) -> dict:
    """Write ``torch.save(obj)`` (or raw ``data``) to ``path`` so that the name never points at a partial file:
    temporary file, fsync, rename, fsync of the folder. Returns ``{"bytes", "sha256"}`` of what was written."""
    if data is None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifests(folder: str) -> list[str]:
    """Manifest paths in ``folder``, newest checkpoint first."""
    if not os.path.isdir(folder):
        return []
    return sorted((os.path.join(folder, n) for n in os.listdir(folder) if re.fullmatch(r"e\d{4}(s\d{6})?\.json", n)),
                  reverse=True)


def verify(manifest_path: str) -> dict:
    """The manifest of a complete checkpoint, or ReidError naming the first file that is missing, truncated or
    corrupt."""
    folder = os.path.dirname(manifest_path)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReidError(f"checkpoint manifest {manifest_path}: unreadable ({type(exc).__name__})") from None
    for name, expected in files.items():
        path = os.path.join(folder, name)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != expected["bytes"]:
            raise ReidError(f"checkpoint file {path}: {'missing' if size is None else f'{size} bytes'}, "
                            f"expected {expected['bytes']} bytes (truncated or incomplete)")
        if _sha256(path) != expected["sha256"]:
            raise ReidError(f"checkpoint file {path}: checksum mismatch, expected the bytes its manifest names "
                            "(corrupt)")
    return manifest


def newest_complete(folder: str, log) -> dict | None:
    """The manifest of the newest complete checkpoint in ``folder`` (rank 0 reads and checks them); each newer one
    that fails is named in one line. None when there is none."""
    for path in _manifests(folder):
        try:
            manifest = verify(path)
        except ReidError as exc:
            log(f"skipping a damaged checkpoint: {exc}")
            continue
        manifest["path"] = path
        return manifest
    return None


@dataclass
class Resume:
    """Where a run continues: epoch and step (0 = the epoch's start), metrics so far, and for a mid-epoch
    checkpoint every rank's meter and the torch random state."""
    epoch: int = 0
    step: int = 0
    metrics: dict = field(default_factory=dict)
    meters: list | None = None
    torch_rng: torch.Tensor | None = None


def _set_aside(output_dir: str, log) -> None:
    """train.resume=false in a folder that holds checkpoints: move them aside (never delete them, never let a
    later resume mix them with this run's)."""
    folder = os.path.join(output_dir, FOLDER)
    if dist.is_main() and os.path.isdir(folder) and os.listdir(folder):
        aside = f"{folder}_set_aside_{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(folder, aside)
        link = os.path.join(output_dir, CHECKPOINT)
        if os.path.exists(link):
            os.replace(link, os.path.join(aside, CHECKPOINT))
        log(f"train.resume=false: the earlier checkpoints of {output_dir} are kept in {aside}")
    dist.barrier()


def load_for_resume(cfg: Config, model, optimizer, bank: MemoryBank, log) -> Resume:
    """Resume from the newest complete checkpoint of ``output_dir`` (when train.resume); ``Resume()`` for a fresh
    run. A checkpoint of other data or another model is refused naming the keys. Runs written before manifests
    existed resume from their ``checkpoint.pt``."""
    folder = os.path.join(cfg.output_dir, FOLDER)
    if not cfg.train.resume:
        _set_aside(cfg.output_dir, log)
        return Resume()
    manifest = dist.broadcast_object(newest_complete(folder, log) if dist.is_main() else None)
    if manifest is not None:
        path = os.path.join(folder, manifest["state"])
        memory_dir, names = os.path.join(folder, manifest["memory_dir"]), manifest["memory_files"]
    elif _manifests(folder):  # checkpoints exist but none is complete: never restart silently from scratch
        raise ReidError(f"{folder}: no complete checkpoint (each manifest names a damaged file, see above), "
                        "expected at least one to resume; use another output_dir or train.resume=false")
    else:  # a fresh run, or one written before manifests existed (checkpoint.pt + its memory folder)
        path = os.path.join(cfg.output_dir, CHECKPOINT)
        if not os.path.isfile(path):
            return _init_from(cfg, model, optimizer, bank, log) if cfg.train.init_from else Resume()
        memory_dir, names = None, None
    return _load(path, memory_dir, names, cfg, model, optimizer, bank, log)


def _init_from(cfg: Config, model, optimizer, bank: MemoryBank, log) -> Resume:
    """train.init_from: continue from another run's newest complete checkpoint (its folder is only read), as a
    resume would; this run's checkpoints and metrics then go to its own output_dir. The other run's final
    evaluation is not carried over."""
    folder = os.path.join(cfg.train.init_from, FOLDER)
    manifest = dist.broadcast_object(newest_complete(folder, log) if dist.is_main() else None)
    if manifest is None:
        raise ReidError(f"config key 'train.init_from': {cfg.train.init_from} holds no complete checkpoint, "
                        "expected a run folder with checkpoints/eNNNN.json")
    resume = _load(os.path.join(folder, manifest["state"]), os.path.join(folder, manifest["memory_dir"]),
                   manifest["memory_files"], cfg, model, optimizer, bank, log, verb="initialised")
    resume.metrics.pop("final", None)
    metrics_file = os.path.join(cfg.train.init_from, "metrics.json")
    if resume.step == 0 and resume.epoch == cfg.train.warmup_epochs and os.path.isfile(metrics_file):
        with open(metrics_file) as f:  # a finished warm-up run: its final evaluation is this run's warm-up point
            final = json.load(f).get("final")
        if final is not None and "warmup" not in resume.metrics:
            resume.metrics["warmup"] = final
    return resume


def _load(path, memory_dir, names, cfg: Config, model, optimizer, bank: MemoryBank, log,
          verb: str = "resumed") -> Resume:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    step = ckpt.get("step", 0)
    breaking, harmless = config_changes(ckpt.get("config", {}), cfg, mid_epoch=step > 0)
    if breaking:
        raise ReidError(f"{path}: the checkpoint was trained with other data or another model ({'; '.join(breaking)}), "
                        "expected the same to resume; use another output_dir or train.resume=false")
    if harmless:
        log(f"resuming with a changed config: {'; '.join(harmless)}")
    unwrap(model).load_state_dict(ckpt["model"])
    kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, chosen in zip(optimizer.param_groups, kernels):  # the saved groups' kernel choice is not this run's
        group.update(chosen)
    bank.load(memory_dir or os.path.join(cfg.output_dir, ckpt["memory_dir"]), names)
    own_buffers = ckpt.get("rank_buffers")
    if own_buffers and len(own_buffers) == dist.world_size():  # per-rank BatchNorm, saved mid-epoch
        unwrap(model).load_state_dict(own_buffers[dist.rank()], strict=False)
    log(f"{verb} from epoch {ckpt['epoch']}" + (f" step {step}" if step else "") + f" ({path})")
    return Resume(ckpt["epoch"], step, ckpt["metrics"], ckpt.get("meters"), ckpt.get("torch_rng"))


def save_checkpoint(cfg: Config, model, optimizer, bank: MemoryBank, next_epoch: int, metrics: dict,
                    step: int = 0, meter_state: dict | None = None) -> None:
    """Every rank writes its memory rows, rank 0 the state and then the manifest (see the module docstring); the
    newest ``train.keep_checkpoints`` are kept. Every rank must call it.

    step > 0: a mid-epoch checkpoint (``eNNNNsSSSSSS``): training resumes in epoch ``next_epoch`` at ``step``,
    with every rank's meter (``meter_state``) and the random state as they were.
    """
    folder = os.path.join(cfg.output_dir, FOLDER)
    name = f"e{next_epoch:04d}" + (f"s{step:06d}" if step else "")
    meters = dist.gather_objects(meter_state) if step else None
    # Per-rank BatchNorm is merged only at epoch ends: mid-epoch, every rank's own statistics are kept.
    rank_buffers = (dist.gather_objects({k: v.cpu() for k, v in unwrap(model).state_dict().items()
                                         if k.rsplit(".", 1)[-1] in BN_BUFFERS})
                    if step and cfg.model.batchnorm == "per_rank" and dist.world_size() > 1 else None)
    memory_dir = os.path.join(folder, f"{name}_memory")
    if dist.is_main() and os.path.isdir(memory_dir):  # left by an interrupted save: never mix its files in
        shutil.rmtree(memory_dir)
    dist.barrier()
    shards = dist.gather_objects(bank.save(memory_dir))
    if dist.is_main():
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": next_epoch,
                 "step": step, "meters": meters, "rank_buffers": rank_buffers, "torch_rng": torch.get_rng_state(),
                 "memory_dir": os.path.join(FOLDER, f"{name}_memory"), "metrics": metrics,
                 "config": config_to_dict(cfg)}
        files = {f"{name}.pt": write_durably(os.path.join(folder, f"{name}.pt"), state)}
        memory_files = {}
        for shard in shards:
            memory_files.update(shard)
        files.update({f"{name}_memory/{n}": info for n, info in memory_files.items()})
        manifest = {"epoch": next_epoch, "step": step, "world_size": dist.world_size(), "state": f"{name}.pt",
                    "memory_dir": f"{name}_memory", "memory_files": sorted(memory_files), "files": files}
        write_durably(os.path.join(folder, f"{name}.json"), data=json.dumps(manifest, indent=1).encode())
        link = os.path.join(cfg.output_dir, CHECKPOINT)
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(os.path.join(folder, f"{name}.pt"), tmp)
        except OSError:  # a file system without hard links: a copy
            shutil.copyfile(os.path.join(folder, f"{name}.pt"), tmp)
        os.replace(tmp, link)
        _prune(folder, name, cfg.train.keep_checkpoints)
    dist.barrier()


def _prune(folder: str, current: str, keep: int) -> None:
    """Keep the checkpoint just written (``current``) and the ``keep`` - 1 newest before it; delete the rest,
    manifest first (so no manifest ever names a deleted file), including checkpoints *newer* than ``current``:
    they belong to a timeline this run abandoned (it resumed from an older one because they were damaged)."""
    manifests = _manifests(folder)
    names = [os.path.basename(p)[: -len(".json")] for p in manifests]
    older = [n for n in names if n < current]
    kept = {current, *older[: max(0, keep - 1)]}
    for name in names:
        if name not in kept:
            os.remove(os.path.join(folder, f"{name}.json"))
    for entry in os.listdir(folder):  # state files, memory folders and temporaries of every other checkpoint
        stem = re.match(r"e\d{4}(s\d{6})?", entry)
        if stem and stem.group(0) not in kept and not entry.endswith(".json"):
            target = os.path.join(folder, entry)
            if os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                os.remove(target)
