"""Latent mode: clips go through a pretrained image VAE (Stable Diffusion's AutoencoderKL) frame by frame.

The paper's main setting (docs/METHOD.md): frames are encoded one by one by SD's VAE (4 channels, 8x smaller per
side, scaled by its scaling factor) and the CMD autoencoder works on the latent clip, so its content frame is a
latent image. Here:

- `FrameVAE` wraps a diffusers AutoencoderKL: pixel clips (B, 3, T, H, W) in [-1, 1] <-> latent clips
  (B, c, T, H/f, W/f), c = latent_channels, f = 2 ** (number of blocks - 1). Encoding takes the posterior mean
  (deterministic, so a latent cache is a function of the clip), then (z - shift) * scale as SD does.
- `PixelFrames` is the identity of pixel mode, so the training code runs one path for both.
- `LatentModeAutoencoder` is the frozen CMD autoencoder seen from the diffusion stages and sample.py in latent
  mode: encode takes pixel clips, decode returns them, the latents in between are the CMD autoencoder's.

diffusers is imported when a VAE is loaded, not with this module: pixel mode never pays its import (~5 s).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from models.weights_file import weights_only_refusal


class VAELoadError(ValueError):
    """A VAE path or id that does not load; the message is one line that names it."""


class PixelFrames(nn.Module):
    """Pixel mode: clips are what the CMD autoencoder sees."""

    downsample = 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class FrameVAE(nn.Module):
    """A frozen image VAE applied to every frame of a clip, `chunk` frames at a time (memory at 512x1024)."""

    def __init__(self, vae: nn.Module, chunk: int = 8):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scale = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)
        self.chunk = int(chunk)
        # Which weights these are (core.frozen_autoencoder.vae_fingerprint, set once when the VAE loads): what
        # latent-mode checkpoints and latent caches record, and what they are checked against.
        self.fingerprint = None

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: no dropout or norm statistics ever change

    def _per_frame(self, fn, clips: torch.Tensor) -> torch.Tensor:
        b, _, t = clips.shape[:3]
        frames = clips.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        out = torch.cat([fn(part) for part in frames.split(self.chunk)])
        return out.unflatten(0, (b, t)).transpose(1, 2)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel clips (B, 3, T, H, W) in [-1, 1] -> scaled latent clips (B, c, T, H/f, W/f)."""
        return self._per_frame(lambda f: (self.vae.encode(f).latent_dist.mean - self.shift) * self.scale, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent clips (B, c, T, h, w) -> pixel clips (B, 3, T, h*f, w*f), about [-1, 1]."""
        return self._per_frame(lambda f: self.vae.decode(f / self.scale + self.shift).sample, z)


def looks_like_hub_id(source: str) -> bool:
    """'owner/name' (a Hugging Face hub id) rather than a path: one slash, no leading '/', '.' or '~'."""
    return source.count("/") == 1 and not source.startswith(("/", ".", "~")) and "\\" not in source


MODEL_FILES = ("config.json",)  # what marks a model's folder for from_pretrained


def from_pretrained(model_class, source: str, subfolder: str, what: str, error: type, files=MODEL_FILES, **kwargs):
    """`model_class.from_pretrained` of a local folder (the model's own, or a pipeline folder holding `subfolder`/)
    or of a hub id (its `subfolder`, else its root); any failure is one `error` line naming `what` and `source`.
    A local folder is the first of the two holding one of `files` (a tokenizer's differ from a model's config.json);
    a diffusers config.json there must name `model_class`. Shared by the VAE, the pretrained content UNet and the
    text encoder with its tokenizer; `kwargs` go to model_class.from_pretrained."""
    name = model_class.__name__
    if issubclass(model_class, torch.nn.Module):  # weights as plain CPU tensors, not initialised on the meta device
        kwargs = {"low_cpu_mem_usage": False, **kwargs}
    path, folder = Path(source).expanduser(), None
    if not path.exists() and not looks_like_hub_id(source):
        raise error(f"{what} {source}: no such folder")
    try:
        if not path.exists():
            try:
                return model_class.from_pretrained(source, subfolder=subfolder, **kwargs)
            except (OSError, ValueError):
                return model_class.from_pretrained(source, **kwargs)
        folder = next((f for f in (path, path / subfolder) if any((f / file).is_file() for file in files)), None)
        if folder is None:
            raise error(f"{what} {source}: no {' or '.join(files)} in it or in its {subfolder}/ subfolder; expected a "
                        f"{name} folder (e.g. stable-diffusion-2-1-base/{subfolder})")
        config = folder / "config.json"
        found = json.loads(config.read_text()).get("_class_name", name) if config.is_file() else name
        if found != name:
            raise error(f"{what} {folder}: its config.json describes {found}, not {name}")
        return model_class.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, TypeError, json.JSONDecodeError, pickle.UnpicklingError) as exc:
        if isinstance(exc, error):
            raise
        refusal = weights_only_refusal(exc)
        if refusal is not None:  # a .bin weights file: transformers and diffusers load those weights-only
            local = folder if path.exists() and folder is not None else None
            bins = sorted(local.glob("*.bin")) if local is not None else []
            where = f"{what} {bins[0]}" if len(bins) == 1 else f"{what} {source}: a weights file in it"
            raise error(f"{where} is not a plain weights file: {refusal}; weights are loaded weights-only and "
                        f"never run code") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what} {source}: does not load as a {name} ({first})") from None


def load_frame_vae(source: str, device="cpu", chunk: int = 8) -> FrameVAE:
    """The frozen VAE from a local folder (an AutoencoderKL's, or a Stable Diffusion pipeline folder holding vae/)
    or a hub id (its vae/ subfolder when it is a pipeline, e.g. stabilityai/stable-diffusion-2-1-base)."""
    from diffusers import AutoencoderKL

    if not source:
        raise VAELoadError("config key 'vae' is empty: latent mode needs a Stable Diffusion VAE folder or hub id "
                           "(--vae)")
    return FrameVAE(from_pretrained(AutoencoderKL, source, "vae", "vae", VAELoadError), chunk).to(device)


class LatentModeAutoencoder(nn.Module):
    """The frozen CMD autoencoder of a latent-mode run behind the pixel interface: encode(pixel clips) ->
    (z_c, z_m), decode(z_c, z_m) -> pixel clips. content_shape / motion_shape are the CMD autoencoder's latents,
    the ones the diffusion models generate; clip_shape is the pixel clip's."""

    content_bound = None  # a content frame of VAE latents has no fixed range: the samplers do not clip it

    def __init__(self, frames: FrameVAE, cmd: nn.Module):
        super().__init__()
        self.frames, self.cmd = frames, cmd
        self.content_shape, self.motion_shape = cmd.content_shape, cmd.motion_shape
        f = frames.downsample
        self.clip_shape = (3, cmd.n_frames, cmd.height * f, cmd.width * f)

    def state_dict(self, *args, **kwargs):
        """The CMD autoencoder's weights alone: the VAE is pretrained and named by the config, and the weights'
        fingerprint (recorded by the diffusion runs) is that of the autoencoder checkpoint."""
        return self.cmd.state_dict(*args, **kwargs)

    def encode(self, x: torch.Tensor):
        return self.cmd.encode(self.frames.encode(x))

    def decode(self, z_c: torch.Tensor, z_m: torch.Tensor) -> torch.Tensor:
        return self.frames.decode(self.cmd.decode(z_c, z_m))

    def decode_content(self, z_c: torch.Tensor) -> torch.Tensor:
        """Content frames (B, c, h, w) -> images (B, 3, H, W)."""
        return self.frames.decode(z_c.unsqueeze(2)).squeeze(2)

    def encode_content(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latent images, to stand in for generated content frames."""
        return self.frames.encode(image.unsqueeze(2)).squeeze(2)

    def forward(self, x: torch.Tensor):
        z_c, z_m = self.encode(x)
        return self.decode(z_c, z_m), z_c, z_m


def pixel_interface(frames: nn.Module, cmd: nn.Module) -> nn.Module:
    """The CMD autoencoder `cmd` on pixel clips: itself in pixel mode, behind the VAE in latent mode."""
    return cmd if isinstance(frames, PixelFrames) else LatentModeAutoencoder(frames, cmd)
