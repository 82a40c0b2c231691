"""torch.distributed helpers that are no-ops in a single process.

``gather_with_grad`` all-gathers rows from every rank *with* gradient: the backward all-reduces (sums) the
gradient of the gathered tensor and returns this rank's slice, so that each rank's features receive the
gradient of every rank's loss. With DDP averaging parameter gradients over ranks, a loss that averages over the
local rows then gives exactly the gradient of the loss over the concatenated global batch. Ranks may hold
different numbers of rows (e.g. after skipped bad images): rows are padded to the largest count and trimmed.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


class Procs(NamedTuple):
    """This process's place in the run: ``rank`` of ``world`` processes on ``device``; ``started``: the process
    group was started here (and is destroyed by whoever called ``setup_distributed``)."""

    rank: int
    world: int
    device: torch.device
    started: bool


def setup_distributed() -> Procs:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPU, gloo on CPU); one process otherwise.
    The device is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    if dist.is_initialized():
        return Procs(dist.get_rank(), dist.get_world_size(), device, started)
    return Procs(0, 1, device, started)


def finish_distributed(procs: Procs) -> None:
    """Destroy the process group if ``setup_distributed`` started it."""
    if procs.started:
        dist.destroy_process_group()


def any_rank(flag: bool, procs: Procs) -> bool:
    """True on every rank when ``flag`` is true on any."""
    if procs.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=procs.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier(world: int) -> None:
    """``dist.barrier()`` when ``world`` > 1 processes run; nothing otherwise."""
    if world > 1:
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def _sizes(n: int, device) -> List[int]:
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(s) for s in out]


def _gather(x: Tensor) -> Tuple[Tensor, List[int]]:
    sizes = _sizes(x.shape[0], x.device)
    top = max(sizes)
    pad = x if x.shape[0] == top else torch.cat([x, x.new_zeros((top - x.shape[0],) + x.shape[1:])])
    out = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(out, pad.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)]), sizes


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        full, sizes = _gather(x)
        ctx.sizes = sizes
        return full

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: rank()])
        return grad[start : start + ctx.sizes[rank()]]


def gather_with_grad(x: Tensor) -> Tensor:
    """(n_r, ...) on each rank -> (sum n_r, ...) in rank order, differentiable; identity in one process."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """All-gather without gradient (momentum features, ids for the queues); identity in one process."""
    return _gather(x)[0] if world_size() > 1 else x


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without per-forward buffer broadcasts: the ITC queues are filled identically on
    every rank from gathered features, so rank 0 need not overwrite them (``forward_sync_buffers`` in new torch,
    ``broadcast_buffers`` before). Unused parameters are allowed (a zero loss weight, a method's idle parts)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters \
        else {"broadcast_buffers": False}
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=True, **kw)


def wrap_fsdp(module: torch.nn.Module, device: torch.device) -> List[torch.nn.Parameter]:
    """Shard ``module`` in place over all ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``): each
    transformer block (every submodule whose class has ``grad_checkpointing``: ViT, text, fusion and ViLT layers)
    is its own unit, gathered just before it runs and freed after. ALBEF's momentum copies and the encoders and
    projections they follow are units too, so that the EMA update (run inside the forward pass) works on equal
    shards of both sides and is kept. The rest (heads, task heads) is the root unit, so ``module`` must be what
    the training loop calls (``StepModule``). Scalar parameters
    (ALBEF's ``temp``) cannot be sharded: they stay whole on every rank and are returned; call
    ``average_gradients`` on them after each backward pass, before the optimiser step. Gradients of sharded
    parameters are averaged over ranks by FSDP itself, as DDP does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    for m in module.modules():
        if m is not module and hasattr(type(m), "grad_checkpointing"):
            fully_shard(m, mesh=mesh)
    for m in list(module.modules()):  # ALBEF's momentum copies and the encoders they follow: a unit each
        copies = getattr(m, "momentum_encoders", None)
        for name, copy in (copies.items() if isinstance(copies, torch.nn.ModuleDict) else ()):
            fully_shard(copy, mesh=mesh)
            fully_shard(getattr(m, name), mesh=mesh)
    scalars = [p for p in module.parameters() if p.dim() == 0 and not hasattr(p, "device_mesh")]
    fully_shard(module, mesh=mesh, ignored_params=set(scalars))
    return scalars


def average_gradients(params: List[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in place (those ``wrap_fsdp`` left unsharded)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size()


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean over ranks of a (detached) tensor, for logging."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world_size()
