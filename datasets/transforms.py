"""Clip transforms: uint8 RGB frames -> resized, center-cropped float (C, T, H, W) in [-1, 1], and back to uint8;
an image file as a one-frame clip (sample.py --content-frame)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


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


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def rgb8(image: Image.Image, path) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 as a viewer shows it; one line for an image without a known white level.

    PIL's convert("RGB") clips 16- and 32-bit values at 255 (a 16-bit photo turns white) and drops alpha (the
    hidden colour of transparent pixels shows), so those modes are converted here.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        # Mode "I" is how 16-bit PNG/PGM files open in many Pillows: scale by the 16-bit range, as for I;16.
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"--content-frame {path}: a 32-bit integer image with values "
                             f"{values.min()}..{values.max()} has no known white level; "
                             f"save it as an 8- or 16-bit image")
        return np.repeat(np.round(values / 257.0).astype(np.uint8)[..., None], 3, axis=-1)  # 65535 / 255 = 257
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(f"--content-frame {path}: a floating-point image with values {values.min():.4g}.."
                             f"{values.max():.4g}; only values in [0, 1] have a known white level")
        return np.repeat(np.round(values * 255.0).astype(np.uint8)[..., None], 3, axis=-1)
    try:
        if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
            # Transparent parts shown on white, as viewers and web pages do; the model knows no transparency.
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(white, image.convert("RGBA")).convert("RGB"))
        return np.array(image.convert("RGB"))
    except ValueError:  # a mode PIL cannot convert
        raise ValueError(f"--content-frame {path}: cannot convert a {image.mode} image to 8-bit RGB") from None


def load_image(path, resolution, channels: int = 3) -> torch.Tensor:
    """An image file -> (C, H, W) in [-1, 1], resized and center-cropped exactly like the training clips."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--content-frame {path}: no such image")
    try:
        with Image.open(path) as image:
            image.load()
            # A phone photo stores its rotation in EXIF: show it upright, as viewers do.
            image = ImageOps.exif_transpose(image)
    except Exception as exc:  # PIL raises many types for a file that is not an image it can decode
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--content-frame {path}: not an image that can be read ({reason})") from None
    pixels = rgb8(image, path)
    return frames_to_clip(pixels[None], resolution)[:channels, 0]  # a one-frame clip (C, 1, H, W) -> (C, H, W)
