"""The trained autoencoder as the later stages use it, frozen: its checkpoint found and rebuilt with the VAE it
recorded (latent mode), and clips encoded into its latents."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from models.autoencoder import build_autoencoder
from models.vae import PixelFrames, load_frame_vae, pixel_interface
from core.checkpoint import (
    CheckpointError,
    build_fitting,
    load_checkpoint,
    load_for_sampling,
    load_weights,
    model_weights,
    resolve_resume,
    weights_fingerprint,
)
from core.config import ConfigError, config_from_dict

logger = logging.getLogger(__name__)


def resolve_ae_ckpt(ae_ckpt: str, results_dir) -> Path:
    """`ae_ckpt` itself, or for 'auto' the newest autoencoder checkpoint under results_dir (how NVlabs/CMD's commands
    chain the stages)."""
    if ae_ckpt != "auto":
        return Path(ae_ckpt)
    found = resolve_resume("auto", results_dir, "autoencoder")
    if found is None:
        raise CheckpointError(f"ae_ckpt=auto: no autoencoder checkpoint under {results_dir}; train one with "
                              f"train_ae.py --results-dir {results_dir} or pass --ae-ckpt")
    # The step file rather than last.pt, which moves on while the autoencoder run goes on: the path recorded in the
    # diffusion run then keeps naming the weights it was trained with.
    step_file = found.with_name(f"{int(load_checkpoint(found, mmap=True)['step']):07d}.pt")
    return step_file if found.name == "last.pt" and step_file.is_file() else found


def vae_fingerprint(frames) -> Optional[str]:
    """The fingerprint of a latent-mode VAE's weights (core.checkpoint.weights_fingerprint), computed once per
    loaded VAE; None in pixel mode. It names the VAE whatever folder or hub id it was loaded from."""
    if isinstance(frames, PixelFrames):
        return None
    if frames.fingerprint is None:
        frames.fingerprint = weights_fingerprint(frames.vae.state_dict())
    return frames.fingerprint


def load_frames(cfg, device):
    """What the CMD autoencoder of an autoencoder config sees of a clip: the frames (pixel mode) or their latents
    under the frozen VAE the config names (latent mode), its fingerprint computed."""
    if cfg.mode != "latent":
        return PixelFrames()
    frames = load_frame_vae(cfg.vae, device)
    if frames.latent_channels != cfg.model.channels:
        raise ConfigError(f"config key 'model.channels' is {cfg.model.channels} but the VAE {cfg.vae} makes "
                          f"{frames.latent_channels}-channel latents")
    vae_fingerprint(frames)
    return frames


def check_vae(recorded: Optional[str], recorded_vae, frames, given_vae, owner) -> None:
    """Refuses, in one line naming both, a VAE whose weights are not those `owner` (a checkpoint or a latent cache)
    recorded; an owner that recorded none (written before VAEs were fingerprinted) is accepted with a warning."""
    if isinstance(frames, PixelFrames):
        return
    if not recorded:
        logger.warning(f"warning: {owner} records no VAE fingerprint (written before VAEs were recorded): the VAE "
                       f"{given_vae} ({vae_fingerprint(frames)}) is used unchecked")
        return
    given = vae_fingerprint(frames)
    if given != recorded:
        raise CheckpointError(f"{owner} was made with the VAE {recorded_vae} (weights {recorded}), but the VAE "
                              f"{given_vae} has weights {given}: pass the VAE it was made with (--vae)")


def load_autoencoder(path, device, data_cfg=None, mode: Optional[str] = None, vae: Optional[str] = None):
    """(frozen EMA autoencoder in eval mode, its config) from a train_ae.py checkpoint alone.

    With `data_cfg`, a clip size that differs from the one the autoencoder was trained on is refused, and with
    `mode` a mode other than the one it was trained in. `path` may be a .pt checkpoint or weights exported by
    training/export.py. A latent-mode autoencoder comes with the VAE it recorded (or `vae`, the same weights
    elsewhere; other weights are refused, check_vae): a models.vae.LatentModeAutoencoder that encodes and decodes
    pixel clips.
    """
    ckpt = load_for_sampling(path, "autoencoder")  # mmap'ed, EMA weights only: no rank reads the optimizer state
    ae_cfg = config_from_dict("autoencoder", ckpt["config"])
    if data_cfg is not None:
        want = (int(data_cfg.n_frames), *map(int, data_cfg.resolution))
        have = (int(ae_cfg.data.n_frames), *map(int, ae_cfg.data.resolution))
        if want != have:
            raise CheckpointError(f"autoencoder {path} was trained on clips of {have[0]}x{have[1]}x{have[2]} "
                                  f"(frames x H x W) but the data config asks for {want[0]}x{want[1]}x{want[2]}")
    if mode is not None and mode != ae_cfg.mode:
        raise CheckpointError(f"config key 'mode' is '{mode}' but the autoencoder {path} was trained in "
                              f"{ae_cfg.mode} mode")
    recorded_vae = ae_cfg.vae
    if vae:
        ae_cfg.vae = vae
    frames = load_frames(ae_cfg, device)
    check_vae(ae_cfg.vae_fingerprint, recorded_vae, frames, ae_cfg.vae, f"autoencoder {path}")
    ae_cfg.vae_fingerprint = vae_fingerprint(frames)
    weights = model_weights(ckpt, prefer_ema=True)
    model = build_fitting(lambda: build_autoencoder(ae_cfg.model, ae_cfg.data, frames.downsample), weights, path,
                          "autoencoder weights", f"data.resolution {list(ae_cfg.data.resolution)}, data.n_frames "
                          f"{ae_cfg.data.n_frames}, model.hidden_size {ae_cfg.model.hidden_size}")
    load_weights(model, weights, path, "autoencoder weights")
    model.to(device).eval().requires_grad_(False)
    return pixel_interface(frames, model), ae_cfg


@torch.no_grad()
def encode(ae, x: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (B, C, T, H, W) -> float32 (z_c (B, C, H, W), z_m (B, D, T, H'+W'))."""
    with autocast:
        z_c, z_m = ae.encode(x)
    return z_c.float(), z_m.float()
