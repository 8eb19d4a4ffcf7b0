"""Embedding passes: a model and a list of images → (n, D) L2-normalised features, no grad, eval transforms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from reid import dist
from reid.data.images import EvalImages


def _worker_init(_):
    # A forked worker that inherits a parallel OpenMP pool (torch or faiss) can hang: keep workers single-threaded.
    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass


def make_loader(dataset, batch_size: int | None, workers: int, **kwargs) -> DataLoader:
    """A DataLoader with single-threaded workers; ``batch_size=None`` when a ``batch_sampler`` is given."""
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    kwargs.setdefault("persistent_workers", False)
    return DataLoader(dataset, num_workers=workers, worker_init_fn=_worker_init, **kwargs)


@torch.no_grad()
def extract_features(model: torch.nn.Module, paths: list[str], transform, *, batch_size: int = 256,
                     device: torch.device | str = "cpu", workers: int = 0, flip: bool = False,
                     skip_corrupt: bool = False, progress: str | None = None, split_over_ranks: bool = False,
                     amp: bool = False) -> torch.Tensor:
    """Embed `paths` → (n, D) on `device`, L2-normalised, float32 (float64 for a float64 model); `flip` averages
    each image with its mirror.

    split_over_ranks: every rank embeds a contiguous 1/R of `paths` and all ranks receive the (n, D) result in
    the original order (a padded all-gather); every rank must call it. The identity with one process.
    amp: bf16 autocast on CUDA (the features come back in float32).
    """
    world = dist.world_size() if split_over_ranks else 1
    if world > 1:
        lo, hi = len(paths) * dist.rank() // world, len(paths) * (dist.rank() + 1) // world
        mine = extract_features(model, paths[lo:hi], transform, batch_size=batch_size, device=device,
                                workers=workers, flip=flip, skip_corrupt=skip_corrupt, progress=progress, amp=amp)
        if mine.shape[1] == 0:  # an empty slice: the gather needs the embedding width and dtype
            dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
            mine = torch.zeros(0, model.dim, dtype=dtype, device=device)
        return dist.gather_rows(mine)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype  # float32, or float64 for the exactness checks
    out_dtype = torch.promote_types(dtype, torch.float32)
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    loader = make_loader(EvalImages(paths, transform, skip_corrupt=skip_corrupt), batch_size, workers,
                         pin_memory=device.type == "cuda")
    chunks = []
    with tqdm(loader, desc=progress, disable=progress is None, leave=False) as bar:  # closed on errors too
        for images, _ in bar:
            images = images.to(device, dtype, non_blocking=True)
            with autocast:
                feats = model(images).to(out_dtype)
                if flip:
                    feats = feats + model(torch.flip(images, dims=[3])).to(out_dtype)
            chunks.append(F.normalize(feats, dim=1))
    model.train(was_training)
    if not chunks:
        return torch.empty(0, 0, device=device)
    return torch.cat(chunks)
