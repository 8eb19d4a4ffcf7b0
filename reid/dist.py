"""Every ``torch.distributed`` call of reid, as small operations named by what they do (DESIGN §4).

With one process (no process group) each operation is the identity, so the single-process path is the
distributed path with world size 1. Every collective adds the bytes this rank contributes to
``COMM_BYTES`` (what benchmarks/distributed_loss.py reports per step).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from reid.errors import ReidError

__all__ = [
    "DistEnv", "select_device",
    "init_distributed", "is_initialized", "rank", "world_size", "is_main", "barrier", "destroy",
    "sum_across_ranks", "max_across_ranks", "gather_anchors", "gather_rows", "gather_candidates", "gather_objects",
    "broadcast_object",
    "COMM_BYTES", "reset_comm_bytes",
]

COMM_BYTES = {"bytes": 0, "calls": 0}  # payload this rank put into collectives since the last reset


def reset_comm_bytes() -> None:
    COMM_BYTES["bytes"] = 0
    COMM_BYTES["calls"] = 0


def _count(t: torch.Tensor) -> None:
    COMM_BYTES["bytes"] += t.numel() * t.element_size()
    COMM_BYTES["calls"] += 1


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None


def _slurm_master() -> str:
    if "MASTER_ADDR" in os.environ:
        return os.environ["MASTER_ADDR"]
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ReidError("SLURM environment: SLURM_JOB_NODELIST is not set and MASTER_ADDR is absent, "
                        "expected one of them to find the master node")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise ReidError(f"SLURM environment: `scontrol show hostnames {nodelist}` failed ({e}), "
                        "expected it to list the nodes (or set MASTER_ADDR)") from None


def _launcher_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) from torchrun's or SLURM's environment; None when neither is set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        world = int(os.environ["SLURM_NTASKS"])
        if world > 1:  # torch.distributed reads these from the environment (init_method="env://")
            os.environ.setdefault("MASTER_ADDR", _slurm_master())
            job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
            os.environ.setdefault("MASTER_PORT", str(15000 + job % 20000))
        return int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0)), world
    return None


def select_device(device: str = "auto", local_rank: int = 0, world: int = 1) -> torch.device:
    """The device of this process: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N" (one process; with
    several ranks each takes its local rank's GPU). ReidError for anything else or for CUDA without a GPU."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ReidError(f"device: '{device}' given, expected auto, cpu, cuda or cuda:N")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ReidError(f"device: '{device}' given but CUDA is not available, expected cpu or auto")
    if not use_cuda:
        return torch.device("cpu")
    index = int(device.split(":")[1]) if ":" in device and world == 1 else local_rank % torch.cuda.device_count()
    if index >= torch.cuda.device_count():
        raise ReidError(f"device: '{device}' given, expected an index below the {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group described by torchrun/SLURM (NCCL with CUDA, gloo otherwise).

    device: see ``select_device``. World size 1 or no launcher environment → no process group at all.
    """
    found = _launcher_env()
    rank_, local_rank, world = found if found else (0, 0, 1)
    dev = select_device(device, local_rank, world)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = None
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ReidError(f"distributed environment: {key} is not set, expected torchrun or SLURM to set it")
        tdist.init_process_group(backend, rank=rank_, world_size=world, timeout=timedelta(minutes=30),
                                 device_id=dev if use_cuda else None)
    elif tdist.is_initialized():
        backend = tdist.get_backend()
    return DistEnv(rank=rank_, local_rank=local_rank, world_size=world, device=dev, backend=backend)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def destroy() -> None:
    if is_initialized():
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------------------- reductions


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor; no gradient). Identity with one process."""
    out = t.detach().clone()
    if is_initialized():
        _count(out)
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def max_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (a new tensor; no gradient)."""
    out = t.detach().clone()
    if is_initialized():
        _count(out)
        tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out


# ----------------------------------------------------------------------------------------- gathers


def _sizes(n: int, device) -> list[int]:
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(t) for _ in range(world_size())]
    _count(t)
    tdist.all_gather(out, t)
    return [int(x) for x in out]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of (n_r, ...) tensors of possibly different n_r (padded: collectives need equal sizes)."""
    top = max(sizes)
    padded = t.new_zeros((top,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    _count(padded)
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherAnchors(torch.autograd.Function):
    """Forward: concatenate every rank's (n_r, D) rows. Backward: each rank's gradient w.r.t. the union
    is summed over ranks and the owner keeps its slice (all-reduce, which gloo and NCCL both have)."""

    @staticmethod
    def forward(ctx, t, sizes):
        ctx.sizes = sizes
        ctx.rank = rank()
        return _gather_padded(t.detach(), sizes)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        _count(total)
        tdist.all_reduce(total, op=tdist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start: start + ctx.sizes[ctx.rank]], None


def gather_anchors(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The union batch: every rank's rows (n_r, ...) concatenated in rank order, differentiable.

    Returns ``(union (Σn_r, ...), sizes [n_0, …])``. Gradients w.r.t. the union are summed over ranks
    and reach each row's owner. Identity (and ``[n]``) with one process.
    """
    if not is_initialized():
        return t, [t.shape[0]]
    sizes = _sizes(t.shape[0], t.device)
    if t.requires_grad:
        return _GatherAnchors.apply(t, sizes), sizes
    return _gather_padded(t, sizes), sizes


def gather_rows(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's (n_r, ...) tensor concatenated in rank order, no gradient (sizes: known n_r, else asked)."""
    if not is_initialized():
        return t
    return _gather_padded(t.detach(), sizes if sizes is not None else _sizes(t.shape[0], t.device))


def gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order (for small metadata and checks, not tensors in a loop)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather_candidates(t: torch.Tensor) -> torch.Tensor:
    """Per-anchor candidates from every rank side by side: (B, K) on each rank → (B, R·K), rank-major blocks.

    Shapes must agree on every rank (pad with -inf/-1). Used to merge local top-K lists into the global one.
    """
    if not is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    _count(t)
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 1)
