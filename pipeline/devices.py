"""Where the network runs: device choice, mixed precision and loader settings."""

from __future__ import annotations

import contextlib
import os

import torch

DEVICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on a GPU (bf16 where supported, else fp16); exact float32 on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device):
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def default_workers() -> int:
    """Leave the model most of the cores: one loader process per two cores, at least one."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def default_batch_size(device: torch.device) -> int:
    """Small batches on the CPU: activations of large ones pass glibc's 32 MiB mmap threshold,
    so every forward pays fresh page faults (measured here: Lite0 at 224 px runs at about twice
    the images/s with batches of 8 as with 32). A GPU wants large batches."""
    return 64 if device.type == "cuda" else 8
