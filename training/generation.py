"""Class -> content frame -> motion latent -> video: the sampling steps shared by sample.py and the training previews."""
from __future__ import annotations

from typing import Optional

import torch

from diffusion import create_diffusion
from diffusion.guidance import guided_model


def make_sampler(diffusion_cfg, learn_sigma: bool, steps: Optional[int] = None, sampler: Optional[str] = None):
    """A respaced diffusion for sampling with the stage's schedule; DDIM respacing for ddim."""
    sampler = sampler or diffusion_cfg.sampler
    steps = steps or diffusion_cfg.sample_steps
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    return create_diffusion(respacing, noise_schedule=diffusion_cfg.noise_schedule, learn_sigma=learn_sigma,
                            diffusion_steps=diffusion_cfg.diffusion_steps, loss_type=diffusion_cfg.loss_type), sampler


@torch.no_grad()
def sample_latents(model, sampling, sampler: str, shape, y: torch.Tensor, cfg_scale: float, cond: Optional[dict] = None,
                   generator=None, progress: bool = False, eta: float = 0.0) -> torch.Tensor:
    """Samples (B, *shape) from a class-conditional denoiser with classifier-free guidance (scale 1 = none)."""
    cond = dict(cond or {})
    if cfg_scale == 1.0:
        def model_fn(x, t, y, **kw):
            return model(x, t, y, **kw)
    else:
        model_fn = guided_model(model, cfg_scale, null_label=model.num_classes)
    return sampling.sample(model_fn, (len(y), *shape), sampler=sampler, model_kwargs={"y": y, **cond},
                           device=y.device, progress=progress, eta=eta, generator=generator)
