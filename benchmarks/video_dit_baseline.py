"""The direct video diffusion baseline that CMD's FLOPs are compared with: a factorised space-time DiT on pixel video.

It denoises the whole clip (B, C, T, H, W) at once, the way a video diffusion model without CMD's
decomposition would. Each block is DiT's adaLN-Zero block widened to three sub-layers: attention
over time at every spatial location, attention over space in every frame, then the MLP (the same
factorisation as the CMD autoencoder). Width, depth, heads and patch size are taken from the
content DiT so that the comparison isolates what the decomposition saves, not a model-size choice.

This module exists for FLOP counting (benchmarks/flops.py); it is a working denoiser with the
`forward(x, t, y)` interface, but nothing in the repo trains it.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence, Tuple

import torch
import torch.nn as nn

from models.dit import DIT_SIZES, FinalLayer, LabelEmbedder, TimestepEmbedder, init_dit_weights
from models.layers import Attention, Mlp, modulate, sincos_1d, sincos_2d

__all__ = ["VideoDiT", "VideoDiTBlock", "baseline_size_from_content_name", "build_video_dit_baseline"]


class VideoDiTBlock(nn.Module):
    """adaLN-Zero block on (B, T, N, hidden) tokens: temporal attention, spatial attention, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_time = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn_time = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm_space = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn_space = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm_mlp = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=partial(nn.GELU, approximate="tanh"))
        # Shift, scale and gate for each of the three sub-layers.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, hidden), c (B, hidden) -> (B, T, N, hidden)."""
        b, t, n, hidden = x.shape
        (shift_t, scale_t, gate_t, shift_s, scale_s, gate_s,
         shift_m, scale_m, gate_m) = self.adaLN_modulation(c).chunk(9, dim=1)
        # Temporal attention: the modulation is per clip, so flatten (T, N) for it and split for attention.
        tokens = x.reshape(b, t * n, hidden)
        modulated = modulate(self.norm_time(tokens), shift_t, scale_t).reshape(b, t, n, hidden)
        sequences = modulated.transpose(1, 2).reshape(b * n, t, hidden)  # one sequence per location
        attended = self.attn_time(sequences).reshape(b, n, t, hidden).transpose(1, 2).reshape(b, t * n, hidden)
        tokens = tokens + gate_t.unsqueeze(1) * attended
        # Spatial attention: one sequence of N tokens per frame.
        modulated = modulate(self.norm_space(tokens), shift_s, scale_s).reshape(b * t, n, hidden)
        attended = self.attn_space(modulated).reshape(b, t * n, hidden)
        tokens = tokens + gate_s.unsqueeze(1) * attended
        tokens = tokens + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm_mlp(tokens), shift_m, scale_m))
        return tokens.reshape(b, t, n, hidden)


class VideoDiT(nn.Module):
    """Class-conditional denoiser of whole clips: x (B, C, T, H, W), t (B,), y (B,) -> (B, 2C or C, T, H, W)."""

    def __init__(self, input_size: Sequence[int], in_channels: int, patch_size: int, hidden_size: int, depth: int,
                 num_heads: int, num_classes: int, learn_sigma: bool, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1):
        """Sizes as the content DiT's (build_video_dit_baseline reads them from its registry name); input_size is
        (T, H, W)."""
        super().__init__()
        frames, height, width = (int(v) for v in input_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"frame size ({height}, {width}) is not divisible by patch_size {patch_size}")
        self.input_size = (frames, height, width)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.grid_size = (height // patch_size, width // patch_size)
        self.hidden_size = hidden_size
        self.num_classes = num_classes

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        spatial = sincos_2d(hidden_size, *self.grid_size)  # (N, hidden)
        temporal = sincos_1d(hidden_size, range(frames)).float()  # (T, hidden)
        self.register_buffer("pos_embed", temporal[:, None, :] + spatial[None, :, :], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList(VideoDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        init_dit_weights(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, *self.input_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"video x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        b, c, frames, height, width = x.shape
        patches = self.x_embedder(x.transpose(1, 2).reshape(b * frames, c, height, width))  # (B*T, hidden, gh, gw)
        tokens = patches.flatten(2).transpose(1, 2).reshape(b, frames, -1, self.hidden_size) + self.pos_embed
        cond = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, cond)
        out = self.final_layer(tokens.reshape(b, -1, self.hidden_size), cond)  # (B, T*N, p*p*out)
        gh, gw, p = self.grid_size[0], self.grid_size[1], self.patch_size
        out = out.reshape(b, frames, gh, gw, p, p, self.out_channels)
        out = out.permute(0, 6, 1, 2, 4, 3, 5)  # (B, C_out, T, gh, p, gw, p)
        return out.reshape(b, self.out_channels, frames, height, width)


def baseline_size_from_content_name(content_model_name: str) -> Tuple[int, int, int, int]:
    """'ContentDiT-XL/2' -> (hidden_size, depth, num_heads, patch_size) of that registry entry."""
    try:
        size, patch = content_model_name.split("-", 1)[1].split("/")
        hidden_size, depth, num_heads = DIT_SIZES[size]
        return hidden_size, depth, num_heads, int(patch)
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"content model name {content_model_name!r} is not of the form "
                         "ContentDiT-<size>/<patch>") from None


def build_video_dit_baseline(content_model_name: str, clip_shape: Sequence[int], num_classes: int,
                             learn_sigma: bool = True) -> VideoDiT:
    """The baseline for a content DiT name and a clip shape (C, T, H, W): same width, depth, heads and patch."""
    hidden_size, depth, num_heads, patch_size = baseline_size_from_content_name(content_model_name)
    channels, frames, height, width = (int(v) for v in clip_shape)
    return VideoDiT(input_size=(frames, height, width), in_channels=channels, patch_size=patch_size,
                    hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=num_classes,
                    learn_sigma=learn_sigma)
