"""Gaussian diffusion package: factory, schedules, respacing, sampling and guidance."""

from typing import Optional, Sequence, Union

from diffusion.gaussian_diffusion import (
    LOSS_TYPES,
    PREDICTION_TYPES,
    SAMPLERS,
    GaussianDiffusion,
    check_loss_type,
    check_prediction_type,
    check_snr_gamma,
)
from diffusion.guidance import cfg_combine, guided_model
from diffusion.rng import randn_like_per_sample
from diffusion.schedules import NOISE_SCHEDULES, get_beta_schedule, logsnr_timesteps, respace_betas, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "LOSS_TYPES",
    "NOISE_SCHEDULES",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "cfg_combine",
    "check_loss_type",
    "check_prediction_type",
    "check_snr_gamma",
    "create_diffusion",
    "get_beta_schedule",
    "guided_model",
    "logsnr_timesteps",
    "randn_like_per_sample",
    "respace_betas",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing: Optional[Union[str, int, Sequence[int]]] = None,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    loss_type: str = "hybrid",
    prediction_type: str = "eps",
    snr_gamma: Optional[float] = None,
) -> GaussianDiffusion:
    """Build a diffusion over `diffusion_steps` steps, respaced when timestep_respacing is given.

    timestep_respacing: None or "" = all steps; "logsnrN" = N steps evenly spaced in log-SNR (logsnr_timesteps, for
    the dpm++2m sampler); otherwise see space_timesteps ("ddim50", "100", an int, or a list of section counts).
    The respaced process keeps the original alpha_bar at the kept steps and calls the model with the original
    timestep indices. prediction_type and snr_gamma: see GaussianDiffusion.
    """
    options = dict(learn_sigma=learn_sigma, loss_type=loss_type, prediction_type=prediction_type, snr_gamma=snr_gamma)
    betas = get_beta_schedule(noise_schedule, diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas, **options)
    if isinstance(timestep_respacing, str) and timestep_respacing.startswith("logsnr"):
        count = timestep_respacing[len("logsnr"):]
        if not count.isdigit():
            raise ValueError(f"bad timestep_respacing {timestep_respacing!r}")
        kept = logsnr_timesteps(betas, int(count))
    else:
        kept = sorted(space_timesteps(diffusion_steps, timestep_respacing))
    return GaussianDiffusion(respace_betas(betas, kept), timestep_map=kept, **options)
