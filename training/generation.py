"""Class -> content frame -> motion latent -> video: the sampling steps shared by sample.py and the training previews."""
from __future__ import annotations

from typing import Optional

import torch

from diffusion import create_diffusion
from diffusion.guidance import guided_model
from training.latents import LatentScaler


def make_sampler(diffusion_cfg, learn_sigma: bool, steps: Optional[int] = None, sampler: Optional[str] = None):
    """A respaced diffusion for sampling with the stage's schedule; DDIM respacing for ddim."""
    sampler = sampler or diffusion_cfg.sampler
    steps = steps or diffusion_cfg.sample_steps
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    return create_diffusion(respacing, noise_schedule=diffusion_cfg.noise_schedule, learn_sigma=learn_sigma,
                            diffusion_steps=diffusion_cfg.diffusion_steps, loss_type=diffusion_cfg.loss_type), sampler


@torch.no_grad()
def sample_latents(model, sampling, sampler: str, stage: str, shape, y: torch.Tensor, cfg_scale: float,
                   scaler: LatentScaler, content: Optional[torch.Tensor] = None, generator=None,
                   progress: bool = False, eta: float = 0.0) -> torch.Tensor:
    """Samples the `stage` latent (B, *shape) in the autoencoder's units with classifier-free guidance (scale 1 = none).

    The denoiser lives in the standardised space of `scaler` (the statistics of its own training run): the motion
    stage's condition `content` (B, C, H, W), given in the autoencoder's units, is standardised for it, and the
    sample is denormalised on return. Predicted x0 is clipped at every step to the image of [-1, 1] per channel:
    content frames (convex combinations of frames in [-1, 1]) and motion latents (tanh outputs) both live there.
    """
    cond = {"content": scaler.normalize("content", content)} if stage == "motion" else {}
    model_fn = model if cfg_scale == 1.0 else guided_model(model, cfg_scale, null_label=model.num_classes)
    bounds = scaler.bounds(stage, len(shape) + 1, y.device)
    z = sampling.sample(model_fn, (len(y), *shape), sampler=sampler, model_kwargs={"y": y, **cond},
                        device=y.device, progress=progress, eta=eta, generator=generator, clip_denoised=bounds)
    # Clipped x0 maps back into [-1, 1]; the clamp only absorbs the rounding of the affine map.
    return scaler.denormalize(stage, z).clamp(-1.0, 1.0)


def load_denoiser(path, stage: str, ae, device, allow_ae_mismatch: bool = False):
    """(EMA denoiser in eval mode, its config, its LatentScaler) rebuilt from a diffusion checkpoint and the
    autoencoder's shapes; a checkpoint older than the latent statistics gets identity ones (mean 0, std 1).

    A denoiser learned the latent space of one autoencoder: one trained with other weights (the run records their
    fingerprint) is refused unless `allow_ae_mismatch`, since its samples would decode to something else.
    """
    from models.dit import build_dit
    from training.checkpoint import CheckpointError, load_for_sampling, load_weights, model_weights, weights_fingerprint
    from training.config import config_from_dict

    ckpt = load_for_sampling(path, stage)  # mmap'ed, EMA weights only: no rank reads the optimizer state
    cfg = config_from_dict(stage, ckpt["config"])
    if cfg.data.num_classes is None:
        raise CheckpointError(f"{path} does not record data.num_classes; it was not written by a finished run")
    if cfg.ae_fingerprint and not allow_ae_mismatch:
        given = weights_fingerprint(ae.state_dict())
        if given != cfg.ae_fingerprint:
            raise CheckpointError(f"{path} was trained with the autoencoder {cfg.ae_ckpt} (weights {cfg.ae_fingerprint}), "
                                  f"but the given autoencoder's weights are {given}: pass the one it was trained with "
                                  f"(or --allow-ae-mismatch)")
    model = build_dit(stage, cfg.model, int(cfg.data.num_classes), ae.content_shape, ae.motion_shape)
    try:
        load_weights(model, model_weights(ckpt, prefer_ema=True), path, f"{stage} denoiser weights")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (latent shapes from the autoencoder: content {tuple(ae.content_shape)}, "
                              f"motion {tuple(ae.motion_shape)}; was it trained on another autoencoder?)") from None
    scaler = LatentScaler.from_checkpoint(ckpt, path, ae).to(device)
    return model.to(device).eval().requires_grad_(False), cfg, scaler
