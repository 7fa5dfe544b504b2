"""Where the network runs: device choice, mixed precision and loader settings."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from typing import TYPE_CHECKING

from pipeline.core.options import DEVICES

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICES", "autocast", "autocast_dtype", "autocast_name", "default_batch_size",
           "default_workers", "device_type", "keep_freed_memory", "resolve_device"]
# glibc's mallopt parameters (malloc.h) and the size below which freed memory is kept.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def device_type(name: str = "auto") -> str:
    """The type of device ``name`` resolves to, without importing torch where it can be known.

    ``cpu`` is cpu; ``auto`` on a Linux machine with no GPU device files (``/dev/nvidia*`` for
    CUDA, ``/dev/kfd`` for ROCm) is cpu too, since torch could find no GPU there. Anything else
    asks torch. A cache hit on a CPU machine thereby never imports torch.
    """
    if name == "cpu":
        return "cpu"
    gpu_files = glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd")
    if name == "auto" and sys.platform.startswith("linux") and not gpu_files:
        return "cpu"
    return resolve_device(name).type


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on a GPU (bf16 where supported, else fp16); exact float32 on the CPU."""
    if device.type != "cuda":
        return None
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_name(name: str = "auto") -> str | None:
    """``autocast_dtype`` of device ``name`` as the cache key spells it ("bfloat16"), or None."""
    if device_type(name) != "cuda":
        return None
    return str(autocast_dtype(resolve_device(name))).removeprefix("torch.")


def autocast(device: torch.device):
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=dtype)


def default_workers(processes: int = 1) -> int:
    """Loader processes: none on two cores or fewer, else one per two cores (at most 8).

    ``processes`` running on this machine (torchrun's ``LOCAL_WORLD_SIZE``) share its cores.

    On 2 cores a loader process takes a core from torch's two threads; measured here, loading
    in the main process is faster (Lite0, demo set: 155 against 126 images/s; 256 px JPEGs:
    147 against 133).
    """
    cores = (os.cpu_count() or 1) // max(1, processes)
    return 0 if cores <= 2 else min(8, cores // 2)


def default_batch_size(device: torch.device) -> int:
    """8 images on the CPU (with :func:`keep_freed_memory`, 8 to 32 run equally fast there and
    8 holds the least memory); a GPU wants large batches."""
    return 64 if device.type == "cuda" else 8


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back after each batch.

    A forward pass allocates activations of tens of MiB. By default glibc serves such blocks
    with mmap and unmaps them on free, so every batch pays for fresh zeroed pages in the
    kernel. Measured here (2 cores, EfficientNet-Lite0 at 224 px): 75 to 90 images/s by
    default, 185 with these settings. The price: the process stays at its peak memory, which is
    bounded by one batch and does not grow with the data. Process-wide; glibc (Linux) only.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and
                mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
