"""Builds a tiny, randomly initialised Stable-Diffusion-shaped VAE and UNet and saves them as diffusers folders,
so the latent-mode chain runs offline on a CPU (configs/tiny_latent, the tests). Their weights are random: the
chain runs and trains, but pictures decoded through this VAE mean nothing.

    python scripts/make_tiny_sd.py results/tiny_sd       # writes results/tiny_sd/vae and results/tiny_sd/unet

A real run points `vae` and `model.pretrained` at Stable Diffusion's folders instead (README, "Latent mode").
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

# Same layout as SD's (AutoencoderKL with 4 latent channels; a cross-attention UNet), at a size a CPU trains in
# seconds: 2 blocks, so the VAE downsamples 2x per side instead of SD's 8x.
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=32)
TINY_UNET = dict(in_channels=4, out_channels=4, sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8)


def make_tiny_sd(out_dir, seed: int = 0) -> Path:
    """Writes out_dir/vae and out_dir/unet (diffusers save_pretrained: config.json + safetensors); returns out_dir."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE).save_pretrained(out_dir / "vae")
    UNet2DConditionModel(**TINY_UNET).save_pretrained(out_dir / "unet")
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="results/tiny_sd")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"tiny SD-shaped VAE and UNet written to {make_tiny_sd(args.out_dir, args.seed)}")


if __name__ == "__main__":
    main()
