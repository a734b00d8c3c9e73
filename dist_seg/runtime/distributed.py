"""Every torch.distributed call and every torchrun environment variable lives here.

The helpers are no-ops in a single process (plain `python -m dist_seg.train`), so the rest of the code never
asks whether it is distributed.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place in the run: its rank, local rank and device, the number of processes, the backend."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    """This process's rank on its node from torchrun's environment (0 in a plain process); readable before
    any process group starts, e.g. so that one process per node reports a config error."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key train.device=cuda but no CUDA device is available")
    if preference != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_s: int = 600) -> World:
    """Start the process group from torchrun's environment, or describe a single process.

    When torchrun shares its agent store with the workers (its default), the store is namespaced per attempt:
    after a restart, a plain `env://` init can read the previous attempt's gloo addresses and connect to a
    dead worker (docs/design.md §3). launch/multinode.sh turns the sharing off instead (fresh store per
    attempt; README "Preemption, node loss and resize").
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1 and "MASTER_ADDR" not in os.environ:
        return World(0, 0, 1, _pick_device(device_preference, 0), None)
    device = _pick_device(device_preference, local_rank())
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's shared agent store outlives attempts: namespace it per attempt, best effort, since the
        # restart count is per agent and diverges between nodes (a node that joins starts at 0; on a crash one
        # agent restarts via FAILED, +1, its peer via "new nodes", +0: pytorch/pytorch#135712). With
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/multinode.sh) rank 0 hosts a fresh store each attempt,
        # so no prefix is needed, and a diverging one would hang init until the timeout (a rejoin, a crash).
        store = dist.PrefixStore(f"attempt_{restart_count()}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return World(rank, local_rank(), world, device, backend)


def rendezvous_store_server(port: int, timeout_s: int = 60) -> dist.TCPStore:
    """A c10d TCPStore server on every interface at `port`, for torchrun's rendezvous run off the training
    nodes (launch/rdzv_store.py); it serves while the returned object lives."""
    return dist.TCPStore(
        "0.0.0.0",
        port,
        is_master=True,
        multi_tenant=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(t: torch.Tensor) -> None:
    """In-place SUM across ranks (no-op in one process)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def any_rank_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on any rank (one all-reduce): all ranks take the same
    branch afterwards."""
    if not _active():
        return list(flags)
    return any_rank_flags_tensor(torch.tensor(flags, dtype=torch.bool, device=device))


def any_rank_flags_tensor(flags: torch.Tensor) -> list[bool]:
    """any_rank_flags for a bool tensor already on the device (made without reading anything back): one
    all-reduce, then one read-back of the result."""
    t = flags.to(torch.float32)  # MAX over bool is not supported by every backend (gloo)
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def sum_across_ranks(values: torch.Tensor) -> list[float]:
    """Element-wise SUM of a float tensor over ranks in one all-reduce, read back once."""
    t = values.to(torch.float64)
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers_(module: nn.Module, src: int = 0) -> None:
    """Overwrite every rank's buffers (BatchNorm running statistics) with rank `src`'s, in one broadcast per
    dtype. Without SyncBatchNorm each rank's last training forward leaves its own statistics; an evaluation
    (or an EMA copy) must not depend on the rank that runs it."""
    if not _active():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for tensors in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


# ---------------------------------------------------------------------------------------------- SyncBatchNorm
def merge_moments(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The count, mean and (biased) variance of a union of parts, from each part's count [parts, 1], mean and
    centred sum of squares M2 [parts, C] (Chan et al.'s parallel-variance formula; float64 in, float64 out).
    CpuSyncBatchNorm combines its ranks' statistics with it."""
    n = counts.sum()
    mean = (counts * means).sum(0) / n
    # M2 of the union = sum of per-part M2 + sum of n_r * (mean_r - mean)^2: no cancellation
    var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n
    return n, mean, var


class _CpuSyncBNFunction(torch.autograd.Function):
    """Batch norm whose statistics and input gradients span all ranks; the same math as torch's SyncBatchNorm.

    Forward: each rank computes its per-channel count, mean and centred sum of squares (`torch.var_mean`,
    numerically stable), the ranks all-gather them, and the global mean and variance are combined in float64
    with the parallel-variance formula (Chan et al.), as torch's CUDA SyncBatchNorm combines per-rank Welford
    statistics. A one-pass E[x^2] - E[x]^2 from float32 sums cancels catastrophically when a channel's mean
    is large against its spread (fc6/fc7 at 224 px see one value per image: a handful per channel).
    Backward all-reduces the per-channel sums of dy and dy * xhat. Weight/bias gradients stay local: DDP
    averages them like any other parameter.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):  # type: ignore[override]
        dtype = x.dtype
        x32 = x.double() if dtype == torch.float64 else x.float()  # half inputs are normalised in fp32
        c = x32.shape[1]
        dims = [d for d in range(x32.dim()) if d != 1]
        local_n = x32.numel() // c
        local_var, local_mean = torch.var_mean(x32, dim=dims, correction=0)
        mine = torch.cat(
            [
                torch.tensor([float(local_n)], dtype=torch.float64),
                local_mean.double(),
                local_var.double() * local_n,  # centred sum of squares, M2
            ]
        )
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        per_rank = torch.stack(gathered)  # [world, 1 + 2c]
        n, mean, var = merge_moments(per_rank[:, :1], per_rank[:, 1 : 1 + c], per_rank[:, 1 + c :])
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            unbiased = var * n / (n - 1).clamp_min(1)
            running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
        mean32, invstd = mean.to(x32.dtype), torch.rsqrt(var + eps).to(x32.dtype)
        shape = [1, c] + [1] * (x32.dim() - 2)
        xhat = (x32 - mean32.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n = float(n)
        ctx.in_dtype = dtype
        return (xhat * weight.to(x32.dtype).view(shape) + bias.to(x32.dtype).view(shape)).to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xhat, invstd, weight = ctx.saved_tensors
        dy = grad_out.to(xhat.dtype)
        c = dy.shape[1]
        dims = [d for d in range(dy.dim()) if d != 1]
        shape = [1, c] + [1] * (dy.dim() - 2)
        local_sum_dy = dy.sum(dims)
        local_sum_dy_xhat = (dy * xhat).sum(dims)
        grad_weight, grad_bias = local_sum_dy_xhat.to(weight.dtype), local_sum_dy.to(weight.dtype)
        sums = torch.cat([local_sum_dy, local_sum_dy_xhat])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        mean_dy, mean_dy_xhat = (sums[:c] / ctx.n).view(shape), (sums[c:] / ctx.n).view(shape)
        scale = (weight.to(xhat.dtype) * invstd).view(shape)
        grad_in = scale * (dy - mean_dy - xhat * mean_dy_xhat)
        return grad_in.to(ctx.in_dtype), grad_weight, grad_bias, None, None, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm for CPU process groups (torch's module refuses CPU tensors). Eval mode = plain BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        if self.momentum is None or not self.affine or not self.track_running_stats:
            raise ValueError(
                "CpuSyncBatchNorm needs affine=True, track_running_stats=True and a fixed momentum"
            )
        self.num_batches_tracked.add_(1)
        return _CpuSyncBNFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum
        )


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm: torch's on accelerators, CpuSyncBatchNorm on CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        new = CpuSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


def prepare_model(
    model: nn.Module,
    world: World,
    sync_bn: bool = False,
    channels_last: bool = False,
    torch_compile: bool = False,
    grad_compression: str = "none",
    powersgd: tuple[int, int] = (1, 1000),
) -> nn.Module:
    """The one place a model becomes trainable here: SyncBN, channels_last, DDP, torch.compile, in that order.

    Call it before building the optimizer and build the optimizer from what it returns: the CPU SyncBN
    converter creates new BatchNorm Parameters, so an optimizer built earlier would silently hold the
    replaced ones and never update the BN weights (on CPU only; torch's converter reuses them). SyncBN and
    DDP apply only when world_size > 1. The model must already be on world.device.
    """
    if sync_bn and world.world_size > 1:
        model = convert_sync_batchnorm(model, world.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world.world_size > 1:
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        bucket_mb = None
        if grad_compression == "powersgd" and world.device.type == "cpu":
            # gloo runs a future's callbacks on its own threads, so PowerSGD's second and third all-reduce of
            # one bucket could be enqueued in a different order than the next bucket's first on another
            # rank (a collective mismatch, measured). One bucket has no next bucket. (NCCL runs the
            # callbacks in the enqueuing thread, in order, and keeps DDP's buckets.)
            bucket_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_mb)
        register_grad_compression(model, grad_compression, *powersgd)
    if torch_compile:
        model = torch.compile(model)
    return model


def register_grad_compression(
    model: nn.parallel.DistributedDataParallel, kind: str, rank: int = 1, start_step: int = 1000
) -> None:
    """train.grad_compression: one of torch's DDP communication hooks on the gradient all-reduce.

    fp16/bf16 cast each bucket before the all-reduce and back after (half the bytes, the sum rounded to
    8 or 11 significant bits); powersgd (Vogels et al. 2019) sends low-rank factors of each gradient matrix
    with error feedback after `start_step` plain all-reduces.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if kind == "none":
        return
    if kind == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif kind == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif kind == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=start_step
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        raise ValueError(f"train.grad_compression={kind!r}: expected none, fp16, bf16 or powersgd")


def no_sync_if(model: nn.Module, skip_sync: bool) -> Any:
    """DDP's no_sync() for the non-final micro-steps of gradient accumulation; a null context otherwise."""
    import contextlib

    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    if skip_sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
