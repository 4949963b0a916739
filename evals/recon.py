"""Reconstruction metrics (PSNR, SSIM) on (B, C, T, H, W) videos in [-1, 1], and conversion to uint8 for FVD."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in float64, clamped so decoder overshoot does not reward or punish twice."""
    return ((x.detach().double() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-video PSNR in dB (B,), computed on [0, 1] data; identical videos give +inf."""
    _check_pair(x, y)
    mse = (_to_unit_range(x) - _to_unit_range(y)).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(1.0 / mse)).float()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    weights = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-video SSIM (B,): Gaussian-window SSIM of each frame (mean over pixels and channels), averaged over time.

    Statistics use 'valid' windows (no padding) as in the reference implementation; frames smaller than the
    window shrink it to the largest odd size that fits.
    """
    _check_pair(x, y)
    batch, channels, frames, height, width = x.shape
    window_size = min(window_size, height, width)
    if window_size % 2 == 0:
        window_size -= 1
    # (B, C, T, H, W) -> (B*T, C, H, W): every frame is an image; channels are filtered separately.
    first = _to_unit_range(x).permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    second = _to_unit_range(y).permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
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


def to_uint8_videos(x: torch.Tensor) -> np.ndarray:
    """(B, C, T, H, W) float in [-1, 1] -> uint8 numpy (B, T, H, W, 3); one channel is repeated to RGB."""
    if x.ndim != 5:
        raise ValueError(f"expected videos of shape (B, C, T, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got C={x.shape[1]}")
    # Same mapping as StyleGAN-V's generator output (x * 127.5 + 128, truncated) = round-half-up of (x + 1) * 127.5.
    pixels = torch.floor(x.detach().float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()
