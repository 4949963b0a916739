"""Where a rank computes: its share of the batch, TF32, autocast, and the model wrapped for DDP and torch.compile."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from core.cli import RunError
from core.distributed import DistInfo


def batch_size_per_rank(global_batch_size: int, dist: DistInfo) -> int:
    """train.global_batch_size split over the ranks."""
    if global_batch_size % dist.world_size != 0:
        raise RunError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                       f"world size {dist.world_size}")
    return global_batch_size // dist.world_size


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls and convolutions on CUDA as train.tf32 says; set by the run, never at import."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def wrap(model: nn.Module, dist: DistInfo, compile_model: bool) -> nn.Module:
    """Moves nothing; wraps in DDP when distributed, then compiles when asked."""
    wrapped = model
    if dist.distributed:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        wrapped = DDP(model, device_ids=device_ids)
    if compile_model:
        wrapped = torch.compile(wrapped)
    return wrapped


def autocast(device: torch.device, mixed_precision: str):
    if device.type == "cuda" and mixed_precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
