"""Small real video files whose frames say their own index (8 bits as black/white blocks), for the decoding tests."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

HEIGHT, WIDTH = 32, 40  # non-square source frames, like UCF-101's 320x240 but tiny


def pattern_frame(index: int) -> np.ndarray:
    """Frame whose 8 bits of `index` are drawn as 8x8 black/white blocks; red/blue side stripes test the crop."""
    image = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    image[:, :4] = (255, 0, 0)
    image[:, WIDTH - 4 :] = (0, 0, 255)
    for bit in range(8):
        row, column = divmod(bit, 4)
        value = 230 if (index >> bit) & 1 else 25
        image[8 + 8 * row : 16 + 8 * row, 4 + 8 * column : 12 + 8 * column] = value
    return image


def read_pattern_index(frame: np.ndarray, left: int = 4) -> int:
    """Inverse of pattern_frame on an (H, W, 3) image whose block grid starts at column `left`."""
    index = 0
    for bit in range(8):
        row, column = divmod(bit, 4)
        top, start = 8 + 8 * row, left + 8 * column
        if frame[top + 2 : top + 6, start + 2 : start + 6].mean() > 128:
            index |= 1 << bit
    return index


def write_video(path: Path, n_frames: int, rate=25, codec: str = "mpeg4") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = 2_000_000  # high quality, so the bit blocks survive compression
        stream.codec_context.gop_size = 8  # several keyframes, so seeking is really exercised
        for index in range(n_frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(index), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
