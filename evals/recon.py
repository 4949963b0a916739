"""Reconstruction metrics (PSNR, SSIM) and the motion-latent health checks on (B, C, T, H, W) videos in [-1, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ae_losses import fine_detail

# SSIM constants of Wang et al. (2004) for data in [0, 1].
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"expected videos of shape (B, C, T, H, W), got {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"video shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")


def _to_unit_range(x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in float64, clamped so decoder overshoot does not reward or punish twice. Unclamped
    (`clamp` false) for data without a fixed range, such as scaled VAE latents."""
    unit = (x.detach().double() + 1.0) / 2.0
    return unit.clamp(0.0, 1.0) if clamp else unit


def psnr(x: torch.Tensor, y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Per-video PSNR in dB (B,), computed on [0, 1] data (peak 2 in the data's units); identical videos give +inf.
    `clamp` false compares data beyond [-1, 1] (VAE latents) as it is."""
    _check_pair(x, y)
    mse = (_to_unit_range(x, clamp) - _to_unit_range(y, clamp)).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(1.0 / mse)).float()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    weights = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
         clamp: bool = True) -> torch.Tensor:
    """Per-video SSIM (B,): Gaussian-window SSIM of each frame (mean over pixels and channels), averaged over time.

    Statistics use 'valid' windows (no padding) as in the reference implementation; frames smaller than the
    window shrink it to the largest odd size that fits. `clamp`: as for psnr.
    """
    _check_pair(x, y)
    batch, channels, frames, height, width = x.shape
    window_size = min(window_size, height, width)
    if window_size % 2 == 0:
        window_size -= 1
    # (B, C, T, H, W) -> (B*T, C, H, W): every frame is an image; channels are filtered separately.
    first = _to_unit_range(x, clamp).permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    second = _to_unit_range(y, clamp).permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    window = _gaussian_window(window_size, sigma, first.dtype, first.device)

    def blur(image: torch.Tensor) -> torch.Tensor:
        # A separable Gaussian: one pass along the height, one along the width, per channel (groups=C).
        vertical = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
        horizontal = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
        return F.conv2d(F.conv2d(image, vertical, groups=channels), horizontal, groups=channels)

    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mean_x, mean_y = blur(first), blur(second)
    var_x = blur(first * first) - mean_x**2
    var_y = blur(second * second) - mean_y**2
    cov_xy = blur(first * second) - mean_x * mean_y
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    )
    per_frame = ssim_map.flatten(1).mean(dim=1).view(batch, frames)
    return per_frame.mean(dim=1).float()


# A motion latent whose spread across clips is below this (z_m lives in (-1, 1)) carries no information, and
# one whose entries mostly sit in tanh's flat tails passes no gradient back to the encoder's motion heads.
COLLAPSED_SPREAD = 0.01
SATURATED_LEVEL = 0.99
SATURATED_SHARE = 0.5
# Below this swap gap (dB) the decoder barely looks at z_m: the motion comes from the content frame or not at all.
UNUSED_SWAP_GAP_DB = 0.5


@torch.no_grad()
def motion_health(ae, x: torch.Tensor, encoded=None, x_hat=None, clamp: bool = True) -> dict:
    """Does the autoencoder's motion latent carry the motion? Per-clip measures on clips x (B, C, T, H, W), B >= 2.

    - psnr: reconstruction PSNR; psnr_swap: PSNR when each clip is decoded with the next clip's z_m
      (swap_gap = psnr - psnr_swap: 0 dB means the decoder ignores z_m);
    - psnr_temporal_mean: the trivial static baseline, every frame replaced by the clip's temporal mean
      (gain_over_static = psnr - psnr_temporal_mean); psnr_content_frame: the content frame repeated;
    - zm_spread: std of z_m across the clips, averaged over its entries (~0 when z_m is one constant);
      zm_saturated: share of z_m entries with |z_m| > 0.99 (tanh's flat tails).
    Values come back as (B,) tensors (spread and saturated share repeated), so callers can average them over ranks.
    `encoded` = (z_c, z_m) and `x_hat`, when the caller already has them, are not computed again. `clamp` false
    compares clips beyond [-1, 1] (latent mode's VAE latents) unclamped.
    """
    if x.shape[0] < 2:
        raise ValueError(f"motion_health needs at least 2 clips to swap motion latents between, got {x.shape[0]}")
    z_c, z_m = encoded if encoded is not None else ae.encode(x)
    x = x.float()
    x_hat = (x_hat if x_hat is not None else ae.decode(z_c, z_m)).float()
    x_swap = ae.decode(z_c, z_m.roll(1, dims=0)).float()
    z_c, z_m = z_c.float(), z_m.float()
    frames = x.shape[2]
    static = x.mean(dim=2, keepdim=True).expand_as(x)
    measures = {
        "psnr": psnr(x, x_hat, clamp),
        "psnr_swap": psnr(x, x_swap, clamp),
        "psnr_temporal_mean": psnr(x, static, clamp),
        "psnr_content_frame": psnr(x, z_c.unsqueeze(2).expand(-1, -1, frames, -1, -1), clamp),
    }
    measures["swap_gap"] = measures["psnr"] - measures["psnr_swap"]
    measures["gain_over_static"] = measures["psnr"] - measures["psnr_temporal_mean"]
    batch = x.shape[0]
    measures["zm_spread"] = z_m.std(dim=0).mean().expand(batch)
    measures["zm_saturated"] = (z_m.abs() > SATURATED_LEVEL).float().mean().expand(batch)
    return measures


def motion_warning(health: dict) -> "str | None":
    """One line naming the numbers when the motion latent has collapsed or is ignored, else None.

    `health` holds scalars (floats) averaged over clips, as motion_health's values after a mean.
    """
    problems = []
    if health["zm_spread"] < COLLAPSED_SPREAD:
        problems.append(f"z_m is nearly the same for every clip (spread {health['zm_spread']:.4f} "
                        f"< {COLLAPSED_SPREAD})")
    if health["zm_saturated"] > SATURATED_SHARE:
        problems.append(f"{100 * health['zm_saturated']:.0f}% of z_m entries are saturated "
                        f"(|z_m| > {SATURATED_LEVEL})")
    if health["swap_gap"] < UNUSED_SWAP_GAP_DB:
        problems.append(f"the decoder ignores z_m (motion-swap gap {health['swap_gap']:.2f} dB "
                        f"< {UNUSED_SWAP_GAP_DB} dB)")
    if not problems:
        return None
    return (f"motion latent collapsed or unused: {'; '.join(problems)}; reconstruction {health['psnr']:.2f} dB vs "
            f"{health['psnr_temporal_mean']:.2f} dB for the static temporal-mean baseline")


def patch_grid_ratio(images: torch.Tensor, patch_size: int) -> float:
    """How visible a patch grid is in images (..., H, W): the mean absolute difference of neighbouring pixels
    across the boundaries of patch_size x patch_size patches, divided by that of neighbours inside a patch.

    About 1 for natural images and clean renders; a model that draws each patch on its own (an un-patchify with
    no overlap) leaves steps at the boundaries and scores well above 1.
    """
    if images.shape[-1] < 2 * patch_size or images.shape[-2] < 2 * patch_size:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} hold fewer than 2 x 2 patches of {patch_size}")
    images = images.detach().double()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs()  # pairs (x, x + 1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs()
    across_x = torch.arange(dx.shape[-1], device=images.device) % patch_size == patch_size - 1
    across_y = torch.arange(dy.shape[-2], device=images.device) % patch_size == patch_size - 1
    across = torch.cat([dx[..., across_x].flatten(), dy[..., across_y, :].flatten()]).mean()
    inside = torch.cat([dx[..., ~across_x].flatten(), dy[..., ~across_y, :].flatten()]).mean()
    return float(across / inside.clamp_min(1e-12))


def high_frequency_energy(images: torch.Tensor) -> float:
    """models.ae_losses.fine_detail averaged over the images (N, C, H, W), in float64."""
    return float(fine_detail(images.detach().double()).mean())
