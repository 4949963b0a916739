"""Clip transforms: uint8 RGB frames -> resized, center-cropped float (C, T, H, W) in [-1, 1]."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def parse_resolution(resolution) -> Tuple[int, int]:
    """(H, W) from an int (square) or a two-item sequence; raises ValueError naming the value."""
    if isinstance(resolution, int):
        height = width = resolution
    else:
        values = list(resolution)
        if len(values) != 2:
            raise ValueError(f"resolution must be [H, W] or an int, got {values}")
        height, width = (int(value) for value in values)
    if height <= 0 or width <= 0:
        raise ValueError(f"resolution must be positive, got {[height, width]}")
    return height, width


def resized_size(height: int, width: int, target: Sequence[int]) -> Tuple[int, int]:
    """Size after scaling so the frame just covers target (H, W); for a square target, shorter side = target."""
    target_height, target_width = target
    scale = max(target_height / height, target_width / width)
    return max(target_height, round(height * scale)), max(target_width, round(width * scale))


def frames_to_clip(frames: np.ndarray, resolution: Sequence[int]) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, h, w) in [-1, 1]: cover-resize (bilinear, antialiased), then center crop."""
    target_height, target_width = resolution
    # (T, 3, H, W) view of (T, H, W, 3) memory, i.e. channels-last: the layout torch's fast uint8 resize wants.
    video = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8)).permute(0, 3, 1, 2)
    height, width = video.shape[-2:]
    new_height, new_width = resized_size(height, width, (target_height, target_width))
    top = (new_height - target_height) // 2
    left = (new_width - target_width) // 2
    if (new_height, new_width) != (height, width):
        # antialias matters when shrinking 320x240 to 64x64: plain bilinear would alias fine texture.
        # Resizing uint8 is ~10x faster on CPU than float and differs from it only by rounding (< 1 grey level).
        video = F.interpolate(video, size=(new_height, new_width), mode="bilinear", antialias=True, align_corners=False)
    video = video[:, :, top : top + target_height, left : left + target_width]
    clip = video.permute(1, 0, 2, 3).contiguous().float()  # (3, T, h, w)
    return clip.div_(127.5).sub_(1.0)
