"""BatchNorm whose training statistics come from the whole global batch of a data-parallel peer, on CPU and GPU.

A peer of M workers sees 1/M of every global batch on each worker. With ``sync_bn`` its BatchNorm layers normalise
with the mean and variance of the whole global batch: each worker's per-channel sums (count, sum, sum of squares)
are summed over the peer's process group, and the backward sums the gradients of those sums the same way, so
every worker back-propagates the global batch's statistics exactly as one worker holding the whole batch would.
With equal shards and the workers' gradients averaged (:class:`kdray.engines.data_parallel.PeerGroup`), a step of
M workers equals a step of one (the equivalence tests hold it in float64).

torch's ``nn.SyncBatchNorm`` does the same on GPUs only (its CPU path raises), hence this module: it subclasses
``nn.BatchNorm2d``, so parameters, buffers and ``state_dict`` keys are unchanged (checkpoints of a peer trained with
one worker load into one trained with several, and back).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _SumOverGroup(torch.autograd.Function):
    """``y = sum over the group's ranks of x``, on every rank; its gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sum_over_group(x: Tensor, group) -> Tensor:
    """The differentiable sum of ``x`` over the ranks of ``group``."""
    return _SumOverGroup.apply(x, group)


class GroupBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with training statistics summed over ``group`` (see the module's docstring)."""

    group = None  # set by convert_batchnorm; a plain attribute, not state

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.group is None:
            return super().forward(x)
        dims = (0, 2, 3)
        local = torch.stack(
            [
                torch.full((x.shape[1],), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device),
                x.sum(dims),
                (x * x).sum(dims),
            ]
        )
        count, total, squares = sum_over_group(local, self.group)
        mean = total / count
        var = squares / count - mean * mean  # biased, as BatchNorm normalises with
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = count[0]
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * n / (n - 1) if n > 1 else var.detach()
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        shape = (1, -1, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_batchnorm(module: nn.Module, group) -> int:
    """Turn every ``nn.BatchNorm2d`` of ``module`` into a :class:`GroupBatchNorm2d` over ``group``, in place
    (parameters and buffers kept, the same objects). Returns how many layers were converted."""
    converted = 0
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GroupBatchNorm2d
            converted += 1
        if isinstance(m, GroupBatchNorm2d):
            m.group = group
    return converted


@contextlib.contextmanager
def unsynced(module: nn.Module | None):
    """Inside the block, ``module``'s :class:`GroupBatchNorm2d` layers normalise with this process's batch alone:
    for a forward that one worker runs by itself (a generator's preview on rank 0), which would otherwise wait
    for the rest of its group forever."""
    norms = [m for m in module.modules() if isinstance(m, GroupBatchNorm2d)] if module is not None else []
    groups = [m.group for m in norms]
    for m in norms:
        m.group = None
    try:
        yield
    finally:
        for m, group in zip(norms, groups):
            m.group = group
