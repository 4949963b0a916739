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
    """Samples (B, *shape) from a class-conditional denoiser with classifier-free guidance (scale 1 = none).

    Predicted x0 is clipped to [-1, 1] at every step: content frames (convex combinations of frames in
    [-1, 1]) and motion latents (tanh outputs) both live there by construction.
    """
    cond = dict(cond or {})
    model_fn = model if cfg_scale == 1.0 else guided_model(model, cfg_scale, null_label=model.num_classes)
    return sampling.sample(model_fn, (len(y), *shape), sampler=sampler, model_kwargs={"y": y, **cond},
                           device=y.device, progress=progress, eta=eta, generator=generator, clip_denoised=True)


def load_denoiser(path, stage: str, ae, device):
    """(EMA denoiser in eval mode, its config) rebuilt from a diffusion checkpoint and the autoencoder's shapes."""
    from models.dit import build_dit
    from training.checkpoint import CheckpointError, load_stage_checkpoint, model_weights
    from training.config import config_from_dict

    ckpt = load_stage_checkpoint(path, stage)
    cfg = config_from_dict(stage, ckpt["config"])
    if cfg.data.num_classes is None:
        raise CheckpointError(f"{path} does not record data.num_classes; it was not written by a finished run")
    model = build_dit(stage, cfg.model, int(cfg.data.num_classes), ae.content_shape, ae.motion_shape)
    try:
        model.load_state_dict(model_weights(ckpt, prefer_ema=True))
    except RuntimeError:
        raise CheckpointError(f"{path} does not fit the autoencoder's latent shapes (content {tuple(ae.content_shape)}, "
                              f"motion {tuple(ae.motion_shape)}): was it trained on another autoencoder?") from None
    return model.to(device).eval().requires_grad_(False), cfg
