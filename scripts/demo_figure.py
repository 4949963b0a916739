"""The README's demo picture: for each class, the first generated video and the first motion-only video of a demo
run, one row each (frames left to right), enlarged without smoothing.

    python scripts/demo_figure.py demo_output docs/demo_samples.png
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def first_video_per_class(npz: Path) -> np.ndarray:
    """(K, T, H, W, 3) uint8: the first video of each class 0..K-1 of a sample.py npz."""
    with np.load(npz, allow_pickle=False) as archive:
        videos, labels = archive["videos"], archive["labels"]
        classes = int(archive["num_classes"]) if "num_classes" in archive.files else int(labels.max()) + 1
    missing = [k for k in range(classes) if not (labels == k).any()]
    if missing:
        raise ValueError(f"{npz}: no video of class {missing[0]}")
    return np.stack([videos[np.flatnonzero(labels == k)[0]] for k in range(classes)])


def demo_figure(demo_dir: Path, scale: int = 2) -> Image.Image:
    rows = np.concatenate([first_video_per_class(demo_dir / "samples" / "samples.npz"),
                           first_video_per_class(demo_dir / "motion_only" / "samples.npz")])  # (R, T, H, W, 3)
    count, frames, height, width, _ = rows.shape
    grid = rows.transpose(0, 2, 1, 3, 4).reshape(count * height, frames * width, 3)
    return Image.fromarray(grid).resize((frames * width * scale, count * height * scale), Image.NEAREST)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("demo_dir", type=Path, help="a finished demo's output folder (demo.sh's $OUT)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--scale", type=int, default=2, help="enlargement factor (nearest neighbour)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    try:
        image = demo_figure(args.demo_dir, args.scale)
    except (OSError, KeyError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
