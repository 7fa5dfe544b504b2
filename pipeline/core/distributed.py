"""Several processes, one job: the ``torch.distributed`` process group that torchrun describes.

``torchrun`` starts one process per GPU (or per CPU share) and tells each who it is through
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). A process started any other way is a world of one, and every
helper here is then a no-op, so the stages run the same code with or without torchrun.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from pipeline.core.errors import DistributedError

if TYPE_CHECKING:
    import numpy as np
    import torch

# A rank that finished its shard waits at a barrier for the slowest one, which after a resume
# may have hours of images left; a crashed rank is caught by torchrun, not by this timeout.
_TIMEOUT = timedelta(minutes=float(os.environ.get("PIPELINE_DIST_TIMEOUT_MIN", 24 * 60)))



@dataclass(frozen=True)
class Context:
    """Who this process is among the processes of one job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its machine: its GPU
    local_world_size: int = 1  # processes on this machine, which share its cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context() -> Context:
    """This process's place in the job, from torchrun's environment (a world of one without)."""
    if _joined():
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Context(rank, world, int(os.environ.get("LOCAL_RANK", rank % local_world)),
                   local_world)


def setup(device: str = "auto") -> tuple[Context, torch.device]:
    """Join the job's process group (once per process) and pick this rank's device.

    NCCL between GPUs, gloo on CPUs; each rank takes the GPU of its ``LOCAL_RANK``.
    """
    import torch
    import torch.distributed as dist

    from pipeline.core.devices import resolve_device

    ctx = context()
    run_on = resolve_device(device)
    if not ctx.distributed:
        return ctx, run_on
    if run_on.type == "cuda":
        run_on = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(run_on)
    if not dist.is_initialized():
        backend = "nccl" if run_on.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=_TIMEOUT,
                                device_id=run_on if run_on.type == "cuda" else None)
    return ctx, run_on


def _joined() -> bool:
    """Whether this process joined a process group; one that never imported torch has not."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if _joined():
        sys.modules["torch.distributed"].destroy_process_group()


def _active() -> bool:
    return _joined() and sys.modules["torch.distributed"].get_world_size() > 1


def barrier() -> None:
    if _active():
        sys.modules["torch.distributed"].barrier()


def shard_indices(n: int, ctx: Context) -> np.ndarray:
    """This rank's share of ``n`` samples: every ``world_size``-th one, starting at its rank.

    Unlike :class:`torch.utils.data.DistributedSampler` nothing is padded: each sample belongs
    to exactly one rank, so no image is decoded twice and no row is written twice. Strided
    rather than contiguous so that each shard gets a fair mix of the classes' image sizes.
    """
    import numpy as np

    return np.arange(ctx.rank, n, ctx.world_size)


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a group)."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_agree(value, what: str) -> None:
    """Stop every rank with one clear line when the ranks disagree about ``value``."""
    values = all_gather(value)
    differ = [rank for rank, v in enumerate(values) if v != values[0]]
    if differ:
        raise DistributedError(f"the processes of this job see different {what}: rank(s) "
                               f"{', '.join(map(str, differ))} differ from rank 0; every rank "
                               "must see the same files at the same path")


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (NCCL reduces on the GPU, gloo on the CPU)."""
    if not _active():
        return list(values)
    import torch
    import torch.distributed as dist

    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=where)
    dist.all_reduce(t)
    return t.tolist()
