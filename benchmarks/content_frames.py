"""Content frames and reconstructions of trained autoencoders: how much fine detail (per-pixel dither) the content
frames carry against the clip's frames, how visible the decoder's patch grid is, PSNR and the motion-swap gap.

    python -m benchmarks.content_frames results/ae/checkpoints/last.pt [more checkpoints ...]

Prints one Markdown row per checkpoint, on held-out clips of the built-in dataset (docs/BENCHMARKS.md, "Demo
quality").
"""
import argparse
import datetime
import platform

import torch

from core.cli import HelpFormatter, positive_int
from core.frozen_autoencoder import load_autoencoder
from datasets import build_dataset
from evals.recon import high_frequency_energy, motion_health, patch_grid_ratio


@torch.no_grad()
def measure(path: str, clips: int) -> dict:
    ae, cfg = load_autoencoder(path, "cpu")
    held_out = build_dataset(cfg.data, split="test", seed=cfg.train.global_seed)
    x = torch.stack([held_out[i]["x"] for i in range(min(clips, len(held_out)))])
    z_c, z_m = ae.encode(x)
    x_hat = ae.decode(z_c, z_m)
    health = {key: float(value.mean()) for key, value in motion_health(ae, x, (z_c, z_m), x_hat).items()}
    frames = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
    return {**health, "detail_ratio": high_frequency_energy(z_c) / high_frequency_energy(frames),
            "grid": patch_grid_ratio(x_hat, ae.patch_size), "grid_real": patch_grid_ratio(x, ae.patch_size)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="train_ae.py checkpoints (pixel mode, built-in dataset)")
    parser.add_argument("--clips", type=positive_int, default=64, help="held-out clips to measure on")
    return parser


def main():
    args = build_parser().parse_args()
    print(f"{datetime.date.today()} | {platform.platform()} | torch {torch.__version__} | {args.clips} held-out clips")
    print("| checkpoint | PSNR (dB) | gain over static (dB) | swap gap (dB) | content detail / frames' | "
          "reconstruction patch grid (real clips) |")
    print("|---|---|---|---|---|---|")
    for path in args.checkpoints:
        r = measure(path, args.clips)
        print(f"| {path} | {r['psnr']:.2f} | {r['gain_over_static']:+.2f} | {r['swap_gap']:.2f} | "
              f"{r['detail_ratio']:.2f} | {r['grid']:.2f} ({r['grid_real']:.2f}) |")


if __name__ == "__main__":
    main()
