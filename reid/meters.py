"""What one training epoch measured: loss parts, throughput, the identity diagnostics (in the spirit of the
``MetricLogger`` of torchvision's references), so that the loop itself does no bookkeeping.

Loss parts stay tensors on the device and are summed there; they reach the host once per log interval and
once at the end of the epoch, never per step. Identities (``pid``) are read here only as a diagnostic, after the
loss: nothing in this module feeds back into training.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from reid import dist

PARTS = ("loss", "intra", "inter", "cam")


class TrainMeter:
    """Per-epoch meter of one rank.

    device: where the loss parts live; train_pids: (N,) identity of every training row, or None (unlabelled data:
    no precision diagnostic); writer: a SummaryWriter on rank 0 (None elsewhere); log_every: steps per log point;
    step0: the global step of the epoch's first step (TensorBoard's x axis).
    """

    def __init__(self, device, train_pids: np.ndarray | None, writer=None, log_every: int = 20, step0: int = 0):
        self.device, self.writer, self.log_every, self.step0 = device, writer, max(1, log_every), step0
        self.pids = torch.as_tensor(train_pids, device=device) if train_pids is not None else None
        self.sums = torch.zeros(len(PARTS), dtype=torch.float64, device=device)  # over the epoch
        self.window = torch.zeros(len(PARTS), dtype=torch.float64, device=device)  # since the last log point
        self.precision = torch.zeros(4, dtype=torch.float64, device=device)  # hard hits/mined, easy hits/mined
        self.steps = self.window_steps = self.images = 0
        self.skipped = 0  # steps dropped for a non-finite loss (train.skip_nonfinite), the same on every rank
        self.start = time.time()

    def state(self) -> dict:
        """What a mid-epoch checkpoint keeps of this rank's meter (plain Python values)."""
        return {"sums": self.sums.tolist(), "precision": self.precision.tolist(), "steps": self.steps,
                "images": self.images, "skipped": self.skipped}

    def restore(self, states: list, rank: int, world_size: int) -> None:
        """Continue from the states every rank saved (``state()``, in rank order). With the same world size each
        rank takes its own; otherwise rank 0 takes the summed precision counts (they are summed over ranks at the
        end anyway) and every rank the loss sums, which are the same on every rank."""
        mine = states[rank] if len(states) == world_size else dict(states[0], images=0)
        precision = mine["precision"] if len(states) == world_size else (
            [sum(s["precision"][k] for s in states) for k in range(4)] if rank == 0 else [0.0] * 4)
        self.sums = torch.tensor(mine["sums"], dtype=torch.float64, device=self.device)
        self.precision = torch.tensor(precision, dtype=torch.float64, device=self.device)
        self.steps, self.images, self.skipped = mine["steps"], mine["images"], mine["skipped"]

    def update(self, step: int, parts: dict, total: torch.Tensor, rows: torch.Tensor, warmup: bool) -> str | None:
        """Record one step: ``parts`` from the loss (0-dim tensors), ``total`` the logged total (the loss per
        DESIGN §3 without DDP's scaling), ``rows`` (b,) this rank's anchors. At log points (every ``log_every``
        steps) the interval's means are copied to the host once, written to TensorBoard (rank 0) and returned as
        a progress text; otherwise returns None and nothing leaves the device."""
        values = torch.stack([total.detach().double()] + [torch.as_tensor(parts[k], device=self.device).double()
                                                          for k in PARTS[1:]])
        self.sums += values
        self.window += values
        self.steps += 1
        self.window_steps += 1
        self.images += int(rows.shape[0])
        if self.pids is not None and not warmup:
            self._count_true_positives(rows, parts.get("hard_ids"), parts.get("easy_ids"))
        if step % self.log_every:
            return None
        mean = (self.window / self.window_steps).tolist()  # the one host copy per interval
        self.window.zero_()
        self.window_steps = 0
        if self.writer is not None:
            for key, value in zip(PARTS, mean):
                self.writer.add_scalar(f"loss/{'total' if key == 'loss' else key}", value, self.step0 + step)
        return f"{mean[0]:.3f}"

    def _count_true_positives(self, rows, hard_ids, easy_ids) -> None:
        anchor = self.pids[rows][:, None]
        for slot, ids in ((0, hard_ids), (2, easy_ids)):
            if ids is None or ids.numel() == 0:
                continue
            valid = ids >= 0
            same = (self.pids[ids.clamp(min=0)] == anchor) & valid
            self.precision[slot] += same.sum()
            self.precision[slot + 1] += valid.sum()

    def summary(self) -> dict:
        """Epoch means of the loss parts (union-batch means, the same on every rank), images/s of this rank, and
        the share of mined cross-camera positives that truly share the anchor's identity (over all ranks)."""
        elapsed = max(time.time() - self.start, 1e-9)
        means = (self.sums / max(1, self.steps)).tolist()
        out = dict(zip(PARTS, means))
        out["images_per_s_per_rank"] = self.images / elapsed
        if self.skipped:
            out["skipped_steps"] = self.skipped
        precision = dist.sum_across_ranks(self.precision).tolist()
        if precision[1] > 0:
            out["hard_positive_precision"] = precision[0] / precision[1]
        if precision[3] > 0:
            out["easy_positive_precision"] = precision[2] / precision[3]
        return out
