"""The optimizer, its learning-rate schedule, the gradient step that skips non-finite gradients, and the EMA."""
from __future__ import annotations

import math
from copy import deepcopy

import torch
import torch.nn as nn

from core.cli import RunError


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def make_ema(model: nn.Module) -> nn.Module:
    ema = deepcopy(model).eval()
    ema.requires_grad_(False)
    update_ema(ema, model, decay=0.0)
    return ema


def lr_factor(optim_cfg, step: int, max_steps: int) -> float:
    """The multiplier of optim.lr for the update that step `step` (0-based) makes: a linear warm-up from
    1/warmup_steps to 1 over the first warmup_steps updates, then 1, or, with optim.decay, a linear or cosine
    decay over the last decay_fraction of the max_steps updates (at most all after the warm-up) that reaches
    min_lr_ratio at the last one. As a fraction, the decay keeps its shape when --max-steps changes.

    A decay to the end of a short run lets the final weights settle instead of carrying the noise of a constant
    rate (the cosine schedule of Loshchilov & Hutter, SGDR, 2017; the linear one of "warmup-stable-decay" runs).
    """
    factor = 1.0
    warmup = int(optim_cfg.warmup_steps)
    if step < warmup:
        factor = (step + 1) / warmup
    if optim_cfg.decay == "none":
        return factor
    decay_steps = max(min(round(float(optim_cfg.decay_fraction) * max_steps), max_steps - warmup), 1)
    start = max_steps - decay_steps
    if step < start:
        return factor
    progress = min((step - start + 1) / decay_steps, 1.0)  # the last update (step max_steps - 1) has progress 1
    shape = progress if optim_cfg.decay == "linear" else (1.0 - math.cos(math.pi * progress)) / 2.0
    floor = float(optim_cfg.min_lr_ratio)
    return factor * (1.0 - (1.0 - floor) * shape)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Sets every param group's learning rate to its base rate (the rate it was built with, kept as base_lr)
    times `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


def make_optimizer(params, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    fused = bool(optim_cfg.fused) and device.type in ("cuda", "cpu")  # fused kernels exist for both
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                             weight_decay=optim_cfg.weight_decay, fused=fused)


def clip_and_step_if_finite(model: nn.Module, optimizer: torch.optim.Optimizer, clip: float) -> tuple:
    """Clips the gradients to `clip` (0: no clipping) and steps the optimizer unless their norm is non-finite;
    zeroes them. Returns (the grad norm, whether it stepped).

    The finiteness check is the one host sync per step; DDP has already averaged the gradients, so every rank
    takes the same decision.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)
    stepped = bool(torch.isfinite(grad_norm))
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


class NonfiniteSkips:
    """Updates skipped in a row for a non-finite gradient; `limit` of them (train.max_nonfinite_steps) stop the
    run."""

    def __init__(self, limit: int, logger, ckpt_dir):
        self.limit, self.logger, self.ckpt_dir = limit, logger, ckpt_dir
        self.in_a_row = 0

    def count(self, stepped: bool, step: int) -> None:
        """Counts the update of step `step` (1-based), made or skipped; warns of a skipped one."""
        if stepped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.logger.warning(f"step {step}: non-finite loss/gradient, update skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            raise RunError(f"{self.in_a_row} non-finite losses in a row at step {step}; "
                           f"stopping (the last good checkpoint is kept in {self.ckpt_dir})")
