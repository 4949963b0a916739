"""Transformer building blocks shared by the autoencoder and the DiTs."""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Attention", "Mlp", "sincos_1d", "sincos_2d", "modulate"]


class Mlp(nn.Module):
    """The transformer feed-forward block: (..., in) -> Linear -> activation -> Linear -> (..., out).

    Parameter names and creation order are those of timm's Mlp, which the models used before: checkpoints load
    unchanged and a seed builds the same weights. timm is not imported for it because it pulls in all of
    torchvision, about 2.5 s at the start of every script.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, C) tokens via `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def sincos_1d(embed_dim: int, positions) -> torch.Tensor:
    """Fixed sin-cos embedding (len(positions), embed_dim), float64, as in 'Attention is all you need'.

    Torch ops on the default device, so that a model built under `with torch.device("meta")` (a check of the size
    of what a checkpoint's config describes, core.checkpoint.build_fitting) allocates nothing for its tables."""
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    if isinstance(positions, range):
        positions = torch.arange(positions.start, positions.stop, positions.step, dtype=torch.float64)
    out = torch.outer(torch.as_tensor(positions, dtype=torch.float64).reshape(-1), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (grid_h * grid_w, embed_dim), float32, row-major; any (non-square) grid.

    Half of the channels encode the row, half the column (the MAE/DiT recipe, generalised from
    square grids so that a 16x64 motion latent works).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb_h = sincos_1d(embed_dim // 2, rows)
    emb_w = sincos_1d(embed_dim // 2, cols)
    return torch.cat([emb_h, emb_w], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of (B, N, C) tokens by per-sample (B, C) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
