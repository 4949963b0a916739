"""Clip loading speed: seek-and-decode-the-clip (datasets/) versus decoding the whole file and slicing."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from datasets.transforms import frames_to_clip
from core.cli import HelpFormatter
from datasets.video_decode import decode_all_frames
from datasets.video_folder import VideoFolderDataset


def write_test_video(path: Path, n_frames: int, height: int, width: int, seed: int) -> None:
    """mpeg4 .avi like UCF-101's: a textured background scrolling under a moving square, so frames really change."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 1_000_000
        stream.codec_context.gop_size = 12  # a keyframe every ~0.5 s, in line with UCF-101's xvid files
        for index in range(n_frames):
            image = np.roll(texture, shift=index, axis=1).copy()
            top, left = (index * 2) % (height - 40), (index * 3) % (width - 40)
            image[top : top + 40, left : left + 40] = (255, 255, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def clips_per_second(load_one, count: int) -> float:
    start = time.perf_counter()
    for number in range(count):
        load_one(number)
    return count / (time.perf_counter() - start)


def main(args) -> None:
    # One thread, as in a DataLoader worker (PyTorch sets this there), so the numbers are per worker.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "videos"
        for number in range(args.videos):
            write_test_video(root / f"class{number % 2}" / f"video{number}.avi", args.frames, 240, 320, seed=number)
        dataset = VideoFolderDataset(
            str(root), split="all", resolution=(64, 64), n_frames=args.clip_frames,
            index_cache_dir=str(Path(folder) / "c"),
        )
        rng = np.random.default_rng(0)
        keys = [(int(rng.integers(0, len(dataset))), int(rng.integers(0, 1_000_000))) for _ in range(args.clips)]

        def seek_decode(number: int) -> torch.Tensor:
            return dataset[keys[number]]["x"]

        def full_decode(number: int) -> torch.Tensor:
            index, epoch = keys[number]
            frames = decode_all_frames(str(dataset.entries[index].path))
            return frames_to_clip(frames[dataset.clip_frame_indices(index, epoch)], dataset.resolution)

        for number in range(min(4, args.clips)):  # the same clips either way: the comparison is fair
            assert torch.equal(seek_decode(number), full_decode(number))
        fast = clips_per_second(seek_decode, args.clips)
        slow = clips_per_second(full_decode, max(4, args.clips // 8))

    print("| date | machine | CPUs | torch | PyAV | videos | clip | seek-decode clips/s | full-decode clips/s | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {datetime.date.today().isoformat()} | {platform.platform()} ({platform.processor() or platform.machine()}) "
        f"| {os.cpu_count()} | {torch.__version__} | {av.__version__} "
        f"| {args.videos} x {args.frames} frames 320x240 mpeg4 | {args.clip_frames} frames -> 64x64 "
        f"| {fast:.1f} | {slow:.1f} | {fast / slow:.1f}x |"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="run from the repository root: python -m benchmarks.bench_loader")
    parser.add_argument("--videos", type=int, default=4, help="test videos written (320x240 mpeg4)")
    parser.add_argument("--frames", type=int, default=300, help="frames per test video")
    parser.add_argument("--clip-frames", type=int, default=16, help="frames per loaded clip")
    parser.add_argument("--clips", type=int, default=80, help="clips loaded by seek-and-decode (full decode: 1/8)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
