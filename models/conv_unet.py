"""A convolutional UNet for content frames, class- or caption-conditional, trained from scratch.

The paper lets any image diffusion model generate the content frame. At small scale a convolutional UNet learns
images faster than a DiT: its 3x3 convolutions start with a locality prior that a patch transformer must learn,
and it draws no patch grid. The layout follows the improved-DDPM / ADM UNets (Nichol & Dhariwal 2021, Dhariwal &
Nichol 2021): residual blocks whose GroupNorm is scaled and shifted by the timestep + condition embedding
("AdaGN"), self-attention at the coarse resolutions, skip connections concatenated on the way up, zero-initialised
residual branches and output. The interface is the content DiT's: forward(x, t, y) with y class labels (B,) or text
tokens (B, L, D), `y_embedder` for guidance's null condition, 2C output channels with a learned variance.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.dit import LabelEmbedder, TextEmbedder, TimestepEmbedder

__all__ = ["ContentConvUNet", "ConvUNet_models", "CONV_UNET_SIZES"]


def _groups(channels: int) -> int:
    return max(1, min(32, channels // 4))


def _zero(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then GroupNorm scaled and shifted by the embedding, SiLU-conv; a residual."""

    def __init__(self, channels_in: int, channels_out: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels_in), channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.embed = nn.Linear(embed_dim, 2 * channels_out)
        self.norm2 = nn.GroupNorm(_groups(channels_out), channels_out)
        self.conv2 = _zero(nn.Conv2d(channels_out, channels_out, 3, padding=1))  # each block starts as the identity
        self.skip = nn.Identity() if channels_in == channels_out else nn.Conv2d(channels_in, channels_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embed(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map; a residual, zero-initialised."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ContentConvUNet(nn.Module):
    """p(z_c | y): a UNet over the content frame z_c (B, C, H, W); H and W divisible by 2^(levels - 1)."""

    def __init__(
        self,
        input_size: Sequence[int] = (64, 64),
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (2, 3),
        num_heads: int = 4,
        num_classes: int = 101,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
        text_shape: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        factor = 2 ** (len(channel_mult) - 1)
        if self.input_size[0] % factor or self.input_size[1] % factor:
            raise ValueError(f"content frame size {self.input_size} is not divisible by {factor}, the downsampling of "
                             f"a UNet with {len(channel_mult)} levels")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        embed_dim = 4 * base_channels
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.y_embedder = (LabelEmbedder(num_classes, embed_dim, class_dropout_prob) if text_shape is None
                           else TextEmbedder(text_shape, class_dropout_prob, embed_dim))

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips: List[int] = [base_channels]
        channels = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(channels, base_channels * mult, embed_dim)])
                channels = base_channels * mult
                if level in attention_levels:
                    block.append(SelfAttention2d(channels, num_heads))
                self.down.append(block)
                skips.append(channels)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(channels, channels, 3, stride=2, padding=1)]))
                skips.append(channels)
        self.middle = nn.ModuleList([ResBlock(channels, channels, embed_dim), SelfAttention2d(channels, num_heads),
                                     ResBlock(channels, channels, embed_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(channels + skips.pop(), base_channels * mult, embed_dim)])
                channels = base_channels * mult
                if level in attention_levels:
                    block.append(SelfAttention2d(channels, num_heads))
                if level > 0 and index == num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(channels, channels, 3, padding=1))
                self.up.append(block)
        self.out_norm = nn.GroupNorm(_groups(channels), channels)
        self.out_conv = _zero(nn.Conv2d(channels, self.out_channels, 3, padding=1))
        if text_shape is None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)  # as DiT initialises its label table

    @staticmethod
    def _forward_block(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, (ResBlock, SelfAttention2d)) else layer(h)
        return h

    def _run(self, block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward_block, block, h, emb, use_reentrant=False)
        return self._forward_block(block, h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) noisy content frame, t (B,), y (B,) labels or (B, L, D) text -> (B, 2C or C, H, W)."""
        expected = (self.in_channels, *self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"content frame x must have shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        emb = self.t_embedder(t) + self.y_embedder(y)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))


# name -> (base_channels, channel_mult, num_res_blocks, attention_levels, num_heads). T is CPU-sized (tests, demo);
# L follows ADM's ImageNet-64 UNet (base 192, multipliers 1-2-3-4, three blocks per level).
CONV_UNET_SIZES: Dict[str, Tuple[int, Tuple[int, ...], int, Tuple[int, ...], int]] = {
    "T": (32, (1, 2, 2), 1, (2,), 4),
    "S": (64, (1, 2, 2), 2, (1, 2), 4),
    "B": (128, (1, 2, 2, 2), 2, (2, 3), 4),
    "L": (192, (1, 2, 3, 4), 3, (1, 2, 3), 4),
}


def _registry_entry(size: str):
    base, mult, blocks, attention, heads = CONV_UNET_SIZES[size]

    def build(**kwargs) -> ContentConvUNet:
        return ContentConvUNet(base_channels=base, channel_mult=mult, num_res_blocks=blocks,
                               attention_levels=attention, num_heads=heads, **kwargs)

    build.__name__ = f"ConvUNet_{size}"
    return build


ConvUNet_models = {f"ConvUNet-{size}": _registry_entry(size) for size in CONV_UNET_SIZES}
