"""Every ``torch.distributed`` call of reid, as small operations named by what they do (DESIGN §4).

With one process (no process group) each operation is the identity, so the single-process path is the
distributed path with world size 1. Every collective adds the bytes this rank contributes to
``COMM_BYTES`` (what `reid bench scaling` reports per step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from reid.errors import ReidError
from reid.launcher import LauncherEnv, launcher_env

__all__ = [
    "DistEnv", "select_device",
    "init_distributed", "is_initialized", "rank", "world_size", "is_main", "barrier", "destroy",
    "sum_across_ranks", "max_across_ranks", "gather_anchors", "gather_rows", "gather_candidates", "gather_objects",
    "broadcast_object", "Ranks", "ALL_RANKS", "ONE_PROCESS",
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


def _rendezvous_store(found: LauncherEnv, timeout: timedelta):
    """The key-value store the ranks meet in, its keys prefixed by torchrun's restart count.

    Under ``torchrun --max-restarts`` the agent's store outlives a failed attempt, and without a prefix the ranks
    of the next attempt read the dead ranks' addresses from it (gloo: "connectFullMesh failed … Connection
    refused"). Without torchrun's agent, rank 0 hosts the store (SLURM).
    """
    agent = found.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tdist.TCPStore(found.master_addr, found.master_port, found.world_size,
                           is_master=not agent and found.rank == 0, timeout=timeout)
    return tdist.PrefixStore(f"reid/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group described by torchrun/SLURM (NCCL with CUDA, gloo otherwise).

    device: see ``select_device``. World size 1 or no launcher environment → no process group at all.
    """
    found = launcher_env()
    rank_, local_rank, world = (found.rank, found.local_rank, found.world_size) if found else (0, 0, 1)
    dev = select_device(device, local_rank, world)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = None
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        os.environ.update(MASTER_ADDR=found.master_addr, MASTER_PORT=str(found.master_port))
        tdist.init_process_group(backend, store=_rendezvous_store(found, timedelta(minutes=30)), rank=rank_,
                                 world_size=world, timeout=timedelta(minutes=30), device_id=dev if use_cuda else None)
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
    t = torch.full((1,), n, dtype=torch.long, device=device)  # a fill, not a copy from the host
    out = [torch.empty_like(t) for _ in range(world_size())]
    _count(t)
    tdist.all_gather(out, t)
    return torch.cat(out).tolist()  # one host synchronisation, not one per rank


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
    is summed over ranks into its owner's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, t, sizes):
        ctx.sizes = sizes
        ctx.rank = rank()
        return _gather_padded(t.detach(), sizes)

    @staticmethod
    def backward(ctx, grad):
        return _sum_own_slice(grad, ctx.sizes, ctx.rank), None


_REDUCE_SCATTER = {"works": True}


def _sum_own_slice(t: torch.Tensor, sizes: list[int], me: int) -> torch.Tensor:
    """Σ over ranks of each rank's (Σn_r, ...) tensor, of which this rank needs only its own rows: a reduce-scatter
    (every rank's part padded to the largest), half the traffic of an all-reduce. Falls back to the all-reduce on a
    backend without reduce-scatter (the answer is the same)."""
    start = sum(sizes[:me])
    if _REDUCE_SCATTER["works"]:
        top = max(sizes)
        padded = t.new_zeros((len(sizes) * top,) + tuple(t.shape[1:]))
        for r, (begin, n) in enumerate(zip([sum(sizes[:i]) for i in range(len(sizes))], sizes)):
            padded[r * top: r * top + n] = t[begin: begin + n]
        out = t.new_empty((top,) + tuple(t.shape[1:]))
        try:
            (getattr(tdist, "reduce_scatter_single", None) or tdist.reduce_scatter_tensor)(out, padded)
            _count(padded)
            return out[: sizes[me]]
        except (RuntimeError, NotImplementedError):  # raised before any traffic, on every rank alike
            _REDUCE_SCATTER["works"] = False
    total = t.contiguous().clone()
    _count(total)
    tdist.all_reduce(total, op=tdist.ReduceOp.SUM)
    return total[start: start + sizes[me]]


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


# ----------------------------------------------------------------------------------------- the loss's view


class Ranks:
    """The collectives the CTACL loss uses, over every rank of the process group (``ALL_RANKS``) or over this
    process alone (``ONE_PROCESS``: each is the identity, also inside a multi-process job). The loss takes one
    of these, so the single-process loss and the sharded one are the same code (reid.losses)."""

    def __init__(self, local: bool):
        self.local = local

    @property
    def rank(self) -> int:
        return 0 if self.local else rank()

    @property
    def world(self) -> int:
        return 1 if self.local else world_size()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if self.local else sum_across_ranks(t)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if self.local else max_across_ranks(t)

    def gather_anchors(self, t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        return (t, [t.shape[0]]) if self.local else gather_anchors(t)

    def gather_rows(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return t.detach() if self.local else gather_rows(t, sizes)

    def gather_candidates(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.local else gather_candidates(t)


ALL_RANKS = Ranks(local=False)
ONE_PROCESS = Ranks(local=True)
