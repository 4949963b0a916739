"""Writing videos and images a person can open: mp4 files, mp4/png grids, TensorBoard images."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from core.files import atomic_path


def _even(frames: np.ndarray) -> np.ndarray:
    """H.264 with yuv420p needs even sizes: pad one row/column of black when needed."""
    t, h, w, c = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    out = np.zeros((t, h + h % 2, w + w % 2, c), dtype=frames.dtype)
    out[:, :h, :w] = frames
    return out


def write_mp4(frames: np.ndarray, path, fps: int = 8) -> Path:
    """Writes uint8 frames (T, H, W, 3) as an H.264 mp4 (mpeg4 when libx264 is missing), atomically: a kill or a
    full disk never leaves a partial mp4 under `path`."""
    path = Path(path)
    frames = _even(np.ascontiguousarray(frames))
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        try:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.options = {"crf": "18"}
        except Exception:  # FFmpeg builds without libx264 raise codec lookup errors of several kinds
            stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_grid(videos: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 videos (N, T, H, W, 3) -> one uint8 video (T, rows*(H+pad)+pad, nrow*(W+pad)+pad, 3)."""
    n, t, h, w, c = videos.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((t, rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = videos[i]
    return grid


def captioned_rows(videos: np.ndarray, captions: list, min_height: int = 64, text_width: int = 320,
                   pad: int = 2) -> np.ndarray:
    """uint8 videos (N, T, H, W, 3) and their captions -> one uint8 image: a row per video, its T frames side by
    side (scaled up by a whole factor to at least `min_height` pixels), its caption written beside them. A grid
    of videos too small to hold a caption (32 x 32 in the tiny configs) stays readable this way."""
    from PIL import ImageDraw, ImageFont

    n, t, h, w, _ = videos.shape
    if len(captions) != n:
        raise ValueError(f"{n} videos but {len(captions)} captions")
    scale = max(1, -(-min_height // h))
    frames_width = t * (w * scale + pad)
    image = Image.new("RGB", (pad + frames_width + text_width, pad + n * (h * scale + pad)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for row, (video, caption) in enumerate(zip(videos, captions)):
        top = pad + row * (h * scale + pad)
        for k, frame in enumerate(video):
            image.paste(Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST),
                        (pad + k * (w * scale + pad), top))
        draw.text((pad + frames_width + 4, top + 2), caption, fill="black", font=font)
    return np.asarray(image)


def write_png(image: np.ndarray, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def save_video_set(videos: np.ndarray, out_dir, name: str, step: int | None = None, writer=None,
                   nrow: int | None = None, fps: int = 8) -> dict:
    """Writes a grid mp4 and a png of its first frame; adds the png to TensorBoard when a writer is given."""
    out_dir = Path(out_dir)
    suffix = "" if step is None else f"_{step:07d}"
    grid = video_grid(videos, nrow)
    paths = {"mp4": write_mp4(grid, out_dir / f"{name}{suffix}.mp4", fps),
             "png": write_png(grid[0], out_dir / f"{name}{suffix}.png")}
    if writer is not None and step is not None:
        writer.add_image(name, grid[0], step, dataformats="HWC")
    return paths
