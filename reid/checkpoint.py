"""Checkpoints of a run: where they go, what they hold, when a resume may use them (DESIGN §4, issue 13).

A checkpoint is ``output_dir/checkpoint.pt`` (model, optimizer, next epoch, metrics, config) pointing at a memory
folder with one file per rank (rows by global id, so any world size can resume). Before training, the output folder
must be creatable, writable and have room for one checkpoint; a resume refuses a checkpoint whose dataset or model
differs from the config's, and logs the harmless differences.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from reid import dist
from reid.config import Config, config_to_dict
from reid.errors import ReidError
from reid.memory import MemoryBank

CHECKPOINT = "checkpoint.pt"
# Keys whose change makes a checkpoint another run's: other data (rows would not match) or another network.
BREAKING = ("data.format", "data.root", "data.protocol", "model.arch", "model.last_stride")
BREAKING_SECTIONS = ("synth.",)  # the synthetic generator's settings define the data


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


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


def config_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(breaking, harmless) differences between a checkpoint's config and ``cfg``, as 'key: old → new' texts."""
    old, new = _flat(saved), _flat(config_to_dict(cfg))
    breaking, harmless = [], []
    for key in sorted(set(old) | set(new)):
        if key in old and key in new and old[key] == new[key]:
            continue
        text = f"{key}: {old.get(key, '(absent)')!r} → {new.get(key, '(absent)')!r}"
        if key in BREAKING or key.startswith(BREAKING_SECTIONS):
            breaking.append(text)
        else:
            harmless.append(text)
    return breaking, harmless


def load_for_resume(cfg: Config, model, optimizer, bank: MemoryBank, log) -> tuple[int, dict]:
    """Resume from ``output_dir/checkpoint.pt`` when it exists (and train.resume): → (next epoch, metrics);
    (0, {}) for a fresh run. A checkpoint of other data or another model is refused naming the keys."""
    path = os.path.join(cfg.output_dir, CHECKPOINT)
    if not (cfg.train.resume and os.path.isfile(path)):
        return 0, {}
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    breaking, harmless = config_changes(ckpt.get("config", {}), cfg)
    if breaking:
        raise ReidError(f"{path}: the checkpoint was trained with other data or another model ({'; '.join(breaking)}), "
                        "expected the same to resume; use another output_dir or train.resume=false")
    if harmless:
        log(f"resuming with a changed config: {'; '.join(harmless)}")
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    bank.load(os.path.join(cfg.output_dir, ckpt["memory_dir"]))
    log(f"resumed from epoch {ckpt['epoch']} ({path})")
    return ckpt["epoch"], ckpt["metrics"]


def save_checkpoint(cfg: Config, model, optimizer, bank: MemoryBank, next_epoch: int, metrics: dict) -> None:
    """Memory shards into a fresh per-epoch folder first, then the checkpoint that points at it (atomic replace):
    a pre-emption at any moment leaves the previous complete checkpoint in place."""
    out = cfg.output_dir
    memory_dir = os.path.join(out, f"memory_e{next_epoch:04d}")
    bank.save(memory_dir)
    dist.barrier()
    if dist.is_main():
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": next_epoch,
                 "memory_dir": os.path.basename(memory_dir), "metrics": metrics, "config": config_to_dict(cfg)}
        tmp = os.path.join(out, CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(out, CHECKPOINT))
        for name in os.listdir(out):
            if name.startswith("memory_e") and name != os.path.basename(memory_dir):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    dist.barrier()
