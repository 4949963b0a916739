"""CMD autoencoder: a clip becomes a content frame (softmax-weighted sum of its frames) and a motion latent.

Shapes (B batch, C channels, T frames, H x W pixels, p patch, H' = H / p, W' = W / p, D motion dim):

    x    (B, C, T, H, W)   clip in [-1, 1]
    z_c  (B, C, H, W)      content frame, per pixel and channel a convex combination of the frames
    z_m  (B, D, T, W'+H')  motion latent in (-1, 1); z_m[..., :W'] = z_x (features averaged over
                           height, indexed by width), z_m[..., W':] = z_y (averaged over width,
                           indexed by height)

Encoder and decoder are factorised space-time transformers (TimeSformer-style blocks: attention
over time at every spatial location, then attention over space in every frame, then an MLP).

Motion latent, why it is centred over time: the motion heads see the encoder features averaged over
one spatial axis, *minus their mean over the clip's frames*. Without that, the pooled features are
dominated by a part that is the same for every clip (positions, the static background); the heads'
first Adam steps push that shared part in one consistent direction, tanh saturates within ~50 steps
at lr 2e-3, z_m becomes one constant for all clips and no gradient reaches the heads again; the
decoder then learns to ignore z_m and reconstructs a static clip from the content frame
(docs/BENCHMARKS.md, "Motion latent ablation"). What is static over a clip already reaches the
decoder through the content frame, so removing it from z_m loses nothing the paper's interface
needs: z_m stays bounded by tanh and keeps its D x T x (W'+H') shape, and what is left to it is what
changes over time, the motion.

Positional information: fixed sin-cos embeddings, a 2-D one over the (H', W') token grid plus a
1-D one over the frame index, added to the tokens before the first block of both encoder and
decoder. NVlabs/CMD's autoencoder builds rotary embeddings and never applied them, which left the
encoder blind to frame order (attention is permutation-equivariant). Fixed sin-cos was chosen over
learned tables because it needs no extra parameters, is correct for non-square grids by
construction, and is deterministic, so a checkpoint never depends on how a table was initialised.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from datasets.transforms import parse_resolution
from models.layers import Attention, Mlp, sincos_1d, sincos_2d

__all__ = ["CMDAutoencoder", "SpaceTimeBlock", "build_autoencoder"]

CONTENT_LOGITS = ("pixel", "token", "frame")
OUTPUT_HEADS = ("linear", "conv")
OUTPUT_FEATURES = 16  # channels per pixel that the 'conv' output head's 3x3 convolution mixes into the output


class SpaceTimeBlock(nn.Module):
    """Pre-LayerNorm block on (B, T, N, hidden) tokens: temporal attention, spatial attention, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_time = nn.LayerNorm(hidden_size)
        self.attn_time = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm_space = nn.LayerNorm(hidden_size)
        self.attn_space = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm_mlp = nn.LayerNorm(hidden_size)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, c = x.shape
        # Temporal attention: one sequence of T tokens per (clip, spatial location).
        x_time = x.transpose(1, 2).reshape(b * n, t, c)
        x_time = x_time + self.attn_time(self.norm_time(x_time))
        # Spatial attention: one sequence of N tokens per (clip, frame).
        x_space = x_time.reshape(b, n, t, c).transpose(1, 2).reshape(b * t, n, c)
        x_space = x_space + self.attn_space(self.norm_space(x_space))
        x_space = x_space + self.mlp(self.norm_mlp(x_space))
        return x_space.reshape(b, t, n, c)


class SpaceTimeTransformer(nn.Module):
    """A stack of SpaceTimeBlocks with optional activation checkpointing per block."""

    def __init__(self, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float, grad_checkpointing: bool):
        super().__init__()
        self.blocks = nn.ModuleList([SpaceTimeBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checkpointing only pays off when a backward pass will follow; in eval it would just cost time.
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return x


def _temporal_deviation(pooled: torch.Tensor) -> torch.Tensor:
    """(B, T, N, hidden) pooled features minus their mean over the T frames: only what changes in the clip."""
    return pooled - pooled.mean(dim=1, keepdim=True)


class CMDAutoencoder(nn.Module):
    """Clip (B, C, T, H, W) <-> content frame (B, C, H, W) + motion latent (B, D, T, W'+H')."""

    def __init__(
        self,
        channels: int = 3,
        n_frames: int = 16,
        resolution: Sequence[int] | int = (64, 64),
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        motion_dim: int = 8,
        grad_checkpointing: bool = False,
        motion_centering: bool = True,
        content_logits: str = "pixel",
        output_head: str = "linear",
        output_squash: bool = True,
    ):
        super().__init__()
        height, width = parse_resolution(resolution)
        if height % patch_size != 0 or width % patch_size != 0:
            raise ValueError(f"resolution (H, W) = ({height}, {width}) is not divisible by patch_size {patch_size}")
        self.channels = channels
        self.n_frames = n_frames
        self.height, self.width = height, width
        self.patch_size = patch_size
        self.grid_h, self.grid_w = height // patch_size, width // patch_size
        self.hidden_size = hidden_size
        self.motion_dim = motion_dim
        self.motion_centering = motion_centering  # False only to reproduce the collapse (the ablation)
        if content_logits not in CONTENT_LOGITS:
            raise ValueError(f"content_logits must be one of {CONTENT_LOGITS}, got {content_logits!r}")
        if output_head not in OUTPUT_HEADS:
            raise ValueError(f"output_head must be one of {OUTPUT_HEADS}, got {output_head!r}")
        self.content_logits = content_logits
        self.output_head = output_head
        # tanh on the output for pixel clips in [-1, 1]; latent mode's scaled VAE latents (about unit variance,
        # a third of them beyond +-1) are reconstructed unsquashed.
        self.output_squash = bool(output_squash)
        patch_dim = channels * patch_size * patch_size

        # Fixed positional embeddings (see the module docstring); non-persistent because they are
        # recomputed from the constructor arguments and so need not live in checkpoints.
        spatial = sincos_2d(hidden_size, self.grid_h, self.grid_w)  # (N, hidden)
        temporal = sincos_1d(hidden_size, range(n_frames)).float()  # (T, hidden)
        self.register_buffer("pos_embed", temporal[:, None, :] + spatial[None, :, :], persistent=False)

        # Encoder.
        self.patch_embed = nn.Conv2d(channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.encoder = SpaceTimeTransformer(hidden_size, depth, num_heads, mlp_ratio, grad_checkpointing)
        self.encoder_norm = nn.LayerNorm(hidden_size)
        # Logits over time: per pixel and channel (the paper), per token and channel (upsampled bilinearly to
        # pixels), or one per frame.
        self.content_head = nn.Linear(hidden_size, {"pixel": patch_dim, "token": channels, "frame": 1}[content_logits])
        self.motion_head_x = nn.Linear(hidden_size, motion_dim)  # the 1x1 conv of z_x
        self.motion_head_y = nn.Linear(hidden_size, motion_dim)  # the 1x1 conv of z_y

        # Decoder.
        self.content_embed = nn.Conv2d(channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.motion_embed_x = nn.Linear(motion_dim, hidden_size)
        self.motion_embed_y = nn.Linear(motion_dim, hidden_size)
        self.decoder = SpaceTimeTransformer(hidden_size, depth, num_heads, mlp_ratio, grad_checkpointing)
        self.decoder_norm = nn.LayerNorm(hidden_size)
        if output_head == "linear":
            self.output_proj = nn.Linear(hidden_size, patch_dim)
        else:
            self.output_proj = nn.Linear(hidden_size, OUTPUT_FEATURES * patch_size * patch_size)
            self.output_conv = nn.Conv2d(OUTPUT_FEATURES, channels, kernel_size=3, padding=1)

        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embeddings are linear maps of flattened patches; initialise them like one (as ViT/DiT do).
        for conv in (self.patch_embed, self.content_embed):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        # Zero logits make the softmax uniform, so training starts from the plain temporal mean: a
        # clean, image-like content frame that depends on every frame equally, instead of random
        # per-pixel frame choices. The weight still receives gradient (it multiplies nonzero
        # features), so the head moves away from the mean as soon as that helps reconstruction.
        nn.init.zeros_(self.content_head.weight)
        nn.init.zeros_(self.content_head.bias)
        # A xavier output projection after LayerNorm gives pre-tanh values of std ~1, so much of the
        # output starts in tanh's flat tails; starting from x_hat = 0 (as DiT zero-inits its final
        # layer) avoids that and, on the overfitting test, reaches a given PSNR several times faster.
        if self.output_head == "linear":
            nn.init.zeros_(self.output_proj.weight)
        else:  # the convolution starts at zero instead; zeroing both would leave neither a gradient
            nn.init.zeros_(self.output_conv.weight)
            nn.init.zeros_(self.output_conv.bias)

    @property
    def content_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one content frame."""
        return (self.channels, self.height, self.width)

    @property
    def motion_shape(self) -> Tuple[int, int, int]:
        """(D, T, W'+H') of one motion latent."""
        return (self.motion_dim, self.n_frames, self.grid_w + self.grid_h)

    @property
    def clip_shape(self) -> Tuple[int, int, int, int]:
        """(C, T, H, W) of one clip."""
        return (self.channels, self.n_frames, self.height, self.width)

    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last layer (for the adaptive GAN weight)."""
        return self.output_proj.weight if self.output_head == "linear" else self.output_conv.weight

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, H'*W', C*p*p) per-patch values -> (B, C, T, H, W) (C from the last axis)."""
        b, t = tokens.shape[:2]
        p = self.patch_size
        channels = tokens.shape[-1] // (p * p)
        tokens = tokens.reshape(b, t, self.grid_h, self.grid_w, channels, p, p)
        tokens = tokens.permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, T, H', p, W', p)
        return tokens.reshape(b, channels, t, self.height, self.width)

    @staticmethod
    def _check_shape(name: str, tensor: torch.Tensor, expected: Tuple[int, ...]) -> None:
        if tensor.dim() != len(expected) + 1 or tuple(tensor.shape[1:]) != tuple(expected):
            got = tuple(tensor.shape[1:]) if tensor.dim() == len(expected) + 1 else tuple(tensor.shape)
            raise ValueError(f"{name} of size {got} does not match the autoencoder's {tuple(expected)}")

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clip (B, C, T, H, W) -> normalised encoder features (B, T, H', W', hidden)."""
        self._check_shape("clip", x, self.clip_shape)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        tokens = self.patch_embed(frames).flatten(2).transpose(1, 2)  # (B*T, N, hidden), row-major grid
        tokens = tokens.reshape(b, t, -1, self.hidden_size) + self.pos_embed
        tokens = self.encoder_norm(self.encoder(tokens))
        return tokens.reshape(b, t, self.grid_h, self.grid_w, self.hidden_size)

    def _content_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, T, H', W', hidden) -> content-frame logits (B, C, T, H, W).

        'token' logits vary smoothly inside a patch: the weights cannot form a per-pixel dither pattern, a code
        that a small autoencoder learns to hide frame information in (and that a content DiT then has to generate).
        'frame' gives one logit per frame: the content frame is a blend of whole frames, as smooth as they are.
        """
        b, t = features.shape[:2]
        if self.content_logits == "frame":
            pooled = self.content_head(features.mean(dim=(2, 3)))  # (B, T, 1)
            return pooled.reshape(b, 1, t, 1, 1).expand(b, self.channels, t, self.height, self.width)
        head = self.content_head(features)
        if self.content_logits == "pixel":
            return self._unpatchify(head.reshape(b, t, -1, head.shape[-1]))
        grid = head.permute(0, 1, 4, 2, 3).reshape(b * t, self.channels, self.grid_h, self.grid_w)
        pixels = F.interpolate(grid, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return pixels.reshape(b, t, self.channels, self.height, self.width).transpose(1, 2)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Clip (B, C, T, H, W) -> content frame z_c (B, C, H, W), motion latent z_m (B, D, T, W'+H')."""
        features = self.encode_features(x)
        b, t = features.shape[:2]

        logits = self._content_logits(features)  # (B, C, T, H, W)
        weights = torch.softmax(logits.float(), dim=2).to(x.dtype)  # over time, per pixel and channel
        z_c = (weights * x).sum(dim=2)

        columns, rows = features.mean(dim=2), features.mean(dim=3)  # (B, T, W', hidden), (B, T, H', hidden)
        if self.motion_centering:
            columns, rows = _temporal_deviation(columns), _temporal_deviation(rows)
        z_x = torch.tanh(self.motion_head_x(columns))  # (B, T, W', D)
        z_y = torch.tanh(self.motion_head_y(rows))  # (B, T, H', D)
        z_m = torch.cat([z_x, z_y], dim=2).permute(0, 3, 1, 2)  # (B, D, T, W'+H')
        return z_c, z_m

    def decode(self, z_c: torch.Tensor, z_m: torch.Tensor) -> torch.Tensor:
        """Content frame (B, C, H, W) + motion latent (B, D, T, W'+H') -> clip (B, C, T, H, W), in [-1, 1] with
        output_squash."""
        self._check_shape("content frame", z_c, self.content_shape)
        self._check_shape("motion latent", z_m, self.motion_shape)
        if z_c.shape[0] != z_m.shape[0]:
            raise ValueError(f"content frame batch {z_c.shape[0]} does not match motion latent batch {z_m.shape[0]}")
        b = z_c.shape[0]
        v_c = self.content_embed(z_c).permute(0, 2, 3, 1)  # (B, H', W', hidden)
        motion = z_m.permute(0, 2, 3, 1)  # (B, T, W'+H', D)
        v_x = self.motion_embed_x(motion[:, :, : self.grid_w])  # (B, T, W', hidden)
        v_y = self.motion_embed_y(motion[:, :, self.grid_w :])  # (B, T, H', hidden)
        # v[t, h, w] = v_c[h, w] + v_x[t, w] + v_y[t, h]
        tokens = v_c[:, None] + v_x[:, :, None, :, :] + v_y[:, :, :, None, :]  # (B, T, H', W', hidden)
        tokens = tokens.reshape(b, self.n_frames, -1, self.hidden_size) + self.pos_embed
        tokens = self.output_proj(self.decoder_norm(self.decoder(tokens)))  # (B, T, N, C*p*p)
        out = self._unpatchify(tokens)
        if self.output_head != "linear":
            c = out.shape[1]
            frames = out.transpose(1, 2).reshape(b * self.n_frames, c, self.height, self.width)
            frames = self.output_conv(F.gelu(frames))
            out = frames.reshape(b, self.n_frames, self.channels, self.height, self.width)
            out = out.transpose(1, 2).contiguous()  # (B, C, T, H, W) in memory order, as the linear head gives
        return torch.tanh(out) if self.output_squash else out

    # In pixel mode a content frame is an image; models/vae.LatentModeAutoencoder maps latent ones to and from images.
    content_bound = 1.0  # |z_c| <= 1: a convex combination of frames in [-1, 1] (the samplers clip to it)

    def decode_content(self, z_c: torch.Tensor) -> torch.Tensor:
        """Content frames (B, C, H, W) -> images (B, C, H, W) in [-1, 1]."""
        return z_c

    def encode_content(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> content frames, to stand in for generated ones."""
        return image

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clip (B, C, T, H, W) -> (reconstruction x_hat, content frame z_c, motion latent z_m)."""
        z_c, z_m = self.encode(x)
        return self.decode(z_c, z_m), z_c, z_m


def build_autoencoder(model_cfg, data_cfg, downsample: int = 1) -> CMDAutoencoder:
    """CMDAutoencoder from an AutoencoderModelConfig and a DataConfig (dataclasses or DictConfigs).

    `downsample`: in latent mode the clips it sees are the VAE's, `downsample` times smaller per side than the
    data's resolution (models/vae.py). model.output_squash is resolved by core.config (None: squashed).
    """
    height, width = parse_resolution(data_cfg.resolution)
    if height % downsample or width % downsample:
        raise ValueError(f"data.resolution {[height, width]} is not divisible by the VAE's downsampling {downsample}")
    return CMDAutoencoder(
        channels=int(model_cfg.channels),
        n_frames=int(data_cfg.n_frames),
        resolution=(height // downsample, width // downsample),
        patch_size=int(model_cfg.patch_size),
        hidden_size=int(model_cfg.hidden_size),
        depth=int(model_cfg.depth),
        num_heads=int(model_cfg.num_heads),
        mlp_ratio=float(model_cfg.mlp_ratio),
        motion_dim=int(model_cfg.motion_dim),
        grad_checkpointing=bool(model_cfg.grad_checkpointing),
        motion_centering=bool(model_cfg.motion_centering),
        content_logits=str(model_cfg.content_logits),
        output_head=str(model_cfg.output_head),
        output_squash=True if model_cfg.output_squash is None else bool(model_cfg.output_squash),
    )
