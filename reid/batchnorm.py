"""BatchNorm over all cameras: batch statistics of the union batch of every rank (DESIGN §4, "World-size invariance").

Training is camera-sharded, so a plain BatchNorm would normalise each rank's cameras on their own and the model
would depend on the world size. ``AllReduceBatchNorm`` normalises with the mean and variance of the union batch on
any device and any backend, with uneven or empty local batches (torch's ``SyncBatchNorm`` is CUDA-only and, under
bf16 autocast, mixes dtypes when a rank is empty); ``convert_batchnorm`` puts it in place of every BatchNorm.
``merge_running_stats`` serves the other option, per-rank BatchNorm: it merges the ranks' running statistics once.
With one process everything here equals plain BatchNorm: the collectives of ``reid.dist`` are the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from reid import dist
from reid.errors import ReidError

__all__ = ["AllReduceBatchNorm", "convert_batchnorm", "merge_running_stats"]


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(C,) → (1, C, 1, …) broadcastable against x (N, C, *)."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # never accumulate sums in half precision


def union_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of the union over ranks of x (N_r, C, *); one all-reduce.

    Returns ``(mean (C,), var (C,), count ())`` in float64, count = Σ_r N_r·∏* (values per channel), all on
    x's device: nothing is copied to the host, so a CUDA step does not wait here. Each rank
    fills its row of a (world, 1 + 2C) table with (count, local mean, local Σ squared deviations) and the rows
    are combined with Chan's parallel-variance formula, which unlike Σx² − (Σx)²/n does not cancel.
    An empty x (N_r = 0) contributes a zero row and still joins the collective.
    """
    c = x.shape[1]
    table = torch.zeros(dist.world_size(), 1 + 2 * c, dtype=torch.float64, device=x.device)
    n = x.numel() // c if c else 0
    if n:
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.detach().to(_acc_dtype(x)), dim=dims, correction=0)
        row = table[dist.rank()]
        row[0] = n  # a fill with a Python number: unlike new_tensor([n]) on CUDA, no copy from the host
        row[1:] = torch.cat([mean, var * n]).double()
    table = dist.sum_across_ranks(table)
    counts, means, m2 = table[:, :1], table[:, 1:1 + c], table[:, 1 + c:]
    count = counts.sum()
    mean = (counts * means).sum(0) / count.clamp(min=1.0)
    var = (m2.sum(0) + (counts * (means - mean) ** 2).sum(0)) / count.clamp(min=1.0)
    return mean, var, count


class _UnionBatchNorm(torch.autograd.Function):
    """y = x̂·w + b with x̂ = (x − mean)·invstd of the union batch; backward all-reduces (Σdy, Σdy·x̂) once.

    grad_x = w·invstd·(dy − Σ_union dy / n − x̂·Σ_union dy·x̂ / n), the standard BN backward with its sums taken
    over the union batch of n values per channel. grad_weight = Σ_local dy·x̂, grad_bias = Σ_local dy: local,
    because DDP averages parameter gradients and each rank's loss is scaled so that the average is the union's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count):
        mean, invstd = mean.to(x.dtype), invstd.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.bias_dtype = count, None if bias is None else bias.dtype
        y = (x - _channel_view(mean, x)) * _channel_view(invstd, x)
        if weight is not None:
            y = y * _channel_view(weight, x)
        if bias is not None:
            y = y + _channel_view(bias, x)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        acc = _acc_dtype(x)
        xhat = (x - _channel_view(mean, x)) * _channel_view(invstd, x)
        sum_dy = dy.sum(dims, dtype=acc)
        sum_dy_xhat = (dy * xhat).sum(dims, dtype=acc)
        grad_x = grad_weight = grad_bias = None
        # Only the input gradient needs the union sums; whether x needs one is the same on every rank (same model).
        if ctx.needs_input_grad[0]:
            union = dist.sum_across_ranks(torch.cat([sum_dy, sum_dy_xhat])) / ctx.count
            mean_dy, mean_dy_xhat = union.chunk(2)
            scale = invstd if weight is None else invstd * weight
            grad_x = _channel_view(scale, x) * (dy - _channel_view(mean_dy.to(x.dtype), x)
                                                - xhat * _channel_view(mean_dy_xhat.to(x.dtype), x))
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm of any (N, C, *) input whose training statistics are those of the union batch of all ranks.

    Training: one all-reduce in forward (``union_stats``), one in backward; running statistics get the union's
    mean and unbiased variance exactly as torch's BatchNorm updates them, so they are identical on every rank.
    Eval: plain ``F.batch_norm``, no collective. Every rank must call forward and backward the same number of
    times, an empty local batch (0, C, *) included, or the others wait for it.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ReidError(f"AllReduceBatchNorm: got input of shape {tuple(x.shape)}, expected (N, C, *)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            no_running = self.running_mean is None and self.running_var is None
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                no_running, 0.0, self.eps)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # as autocast runs batch_norm: statistics and normalisation in float32
        mean, var, count = union_stats(x)
        # Every rank sees the same count, so every rank raises and none waits. Checked on the CPU only, where it
        # costs no device-to-host copy; config validation keeps the global batch >= 2 everywhere.
        if x.device.type == "cpu" and count <= 1:
            raise ReidError("AllReduceBatchNorm: expected more than 1 value per channel when training, got "
                            f"{int(count)} over all ranks (input of shape {tuple(x.shape)} on rank {dist.rank()})")
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean, var * count / (count - 1))
        return _UnionBatchNorm.apply(x, self.weight, self.bias, mean, torch.rsqrt(var + self.eps), count)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """torch's rule: momentum, or the cumulative average 1/num_batches_tracked when momentum is None."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm (SyncBatchNorm included) in module → AllReduceBatchNorm, recursively, on any device.

    One implementation on CPU (gloo) and GPU (NCCL): it accepts uneven and empty local batches, also under bf16
    autocast, where torch's SyncBatchNorm lets an empty rank send bf16 statistics while the others send fp32.
    The new layers hold the same Parameter objects (requires_grad flags and optimizer groups stay valid) and the
    same running-statistics buffers, keep training/eval mode, and have the original state_dict keys.
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, device="meta")
        for name in ("weight", "bias"):
            setattr(out, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            out.register_buffer(name, getattr(module, name))
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child))
    return out


@torch.no_grad()
def merge_running_stats(module: torch.nn.Module, weight: float) -> None:
    """Per-rank BatchNorm: replace every layer's running statistics by the weighted mixture over ranks, in place.

    weight: this rank's w_r ≥ 0 (e.g. its number of training images). mean = Σ w_r μ_r / Σ w_r and
    var = Σ w_r (σ²_r + (μ_r − mean)²) / Σ w_r, the mean and variance of the mixture of the ranks' data;
    num_batches_tracked takes the maximum. One all-reduce of a (world, 1 + Σ(2C + 1)) table for all layers;
    the identity with one process.
    """
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if weight < 0:
        raise ReidError(f"merge_running_stats: weight {weight} on rank {dist.rank()}, expected ≥ 0")
    parts = [torch.tensor([float(weight)], dtype=torch.float64)]
    for m in layers:
        nbt = m.num_batches_tracked if m.num_batches_tracked is not None else torch.zeros(())
        parts += [m.running_mean.double().cpu(), m.running_var.double().cpu(), nbt.double().reshape(1).cpu()]
    row = torch.cat(parts)
    device = layers[0].running_mean.device if layers else torch.device("cpu")
    table = torch.zeros(dist.world_size(), row.numel(), dtype=torch.float64, device=device)
    table[dist.rank()] = row.to(device)
    table = dist.sum_across_ranks(table)
    total = float(table[:, 0].sum())
    if total <= 0:
        raise ReidError(f"merge_running_stats: the ranks' weights sum to {total}, expected a positive sum")
    share = table[:, :1] / total  # w_r / Σw: exactly 1 with one process, so the merge is the identity there
    start = 1
    for m in layers:
        c = m.running_mean.numel()
        means, vars_ = table[:, start:start + c], table[:, start + c:start + 2 * c]
        mean = (share * means).sum(0)
        m.running_mean.copy_(mean)
        m.running_var.copy_((share * (vars_ + (means - mean) ** 2)).sum(0))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(int(table[:, start + 2 * c].max()))
        start += 2 * c + 1
