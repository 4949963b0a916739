"""Where a rank computes: its share of the batch, TF32, autocast, and the model wrapped for DDP and torch.compile."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from core.cli import RunError
from core.distributed import DistInfo


def batch_size_per_rank(train_cfg, dist: DistInfo) -> int:
    """train.global_batch_size split over the ranks; sets TF32 on CUDA as train.tf32 says."""
    if train_cfg.global_batch_size % dist.world_size != 0:
        raise RunError(f"train.global_batch_size={train_cfg.global_batch_size} is not divisible by the "
                       f"world size {dist.world_size}")
    if dist.device.type == "cuda":
        # Set here, in the run, never at import: the config decides (no global flags on import).
        torch.backends.cuda.matmul.allow_tf32 = bool(train_cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(train_cfg.tf32)
    return train_cfg.global_batch_size // dist.world_size


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
