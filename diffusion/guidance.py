"""Classifier-free guidance: one batched model call, eps = eps(null) + s (eps(y) - eps(null))."""

from typing import Callable, Union

import torch


def cfg_combine(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale: float, eps_channels: int) -> torch.Tensor:
    """Guide the first `eps_channels` channels; later channels (learned variance) come from out_cond.

    scale is s in eps = eps(null) + s (eps(y) - eps(null)); the CFG paper's w is s - 1.
    """
    if out_cond.shape != out_uncond.shape:
        raise ValueError(
            f"conditional output {tuple(out_cond.shape)} and unconditional {tuple(out_uncond.shape)} differ"
        )
    if not 0 < eps_channels <= out_cond.shape[1]:
        raise ValueError(f"eps_channels={eps_channels} outside 1..{out_cond.shape[1]}")
    # Combine in at least fp32: the difference of two bf16 outputs loses most of its bits.
    dtype = torch.promote_types(out_cond.dtype, torch.float32)
    cond_eps = out_cond[:, :eps_channels].to(dtype)
    uncond_eps = out_uncond[:, :eps_channels].to(dtype)
    guided_eps = uncond_eps + scale * (cond_eps - uncond_eps)
    return torch.cat([guided_eps, out_cond[:, eps_channels:].to(dtype)], dim=1)


def guided_model(model: Callable, scale: float, null: Union[int, torch.Tensor]) -> Callable:
    """Wrap `model(x, t, y=..., **cond)` into a classifier-free-guided callable fn(x, t, y, **cond).

    The model runs once on the doubled batch [x; x] with conditions [y; null]: `null` is the null label (an int)
    or the null condition shaped like y (the empty prompt's text tokens); every tensor in cond is duplicated along
    dim 0 (both halves see the same conditioning except y).
    """

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **cond) -> torch.Tensor:
        batch = x.shape[0]
        doubled_cond = {
            name: torch.cat([value, value], dim=0) if torch.is_tensor(value) else value for name, value in cond.items()
        }
        nulls = null.to(y).expand_as(y) if torch.is_tensor(null) else torch.full_like(y, null)
        output = model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), y=torch.cat([y, nulls], dim=0),
                       **doubled_cond)
        return cfg_combine(output[:batch], output[batch:], scale, eps_channels=x.shape[1])

    return guided
