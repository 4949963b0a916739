"""Inception-v1 I3D whose state-dict names and shapes match the public PyTorch I3D port (400 Kinetics classes)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Three stride-2 temporal stages (stem conv, MaxPool3d_4a, MaxPool3d_5a) shrink T to ceil(T / 8), and the final
# average pool needs two time steps of that, so clips shorter than 9 frames cannot be scored.
MIN_FRAMES = 9
INPUT_SIZE = 224  # the spatial size the detector was trained at; the final 7x7 pool assumes it


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow 'SAME' padding for one axis: output length ceil(size / stride), extra pixel at the end."""
    output_size = math.ceil(size / stride)
    total = max((output_size - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Zero-pad a (B, C, T, H, W) tensor so a valid conv/pool behaves like TensorFlow's 'SAME'."""
    pads = []
    # F.pad takes the last axis first: (W_front, W_back, H_front, H_back, T_front, T_back).
    for axis in (2, 1, 0):
        pads.extend(same_padding(x.shape[2 + axis], kernel[axis], stride[axis]))
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d ('SAME' padding, no bias) + BatchNorm + ReLU; the logits layer uses bias and skips BN/ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int] = (1, 1, 1),
        stride: Sequence[int] = (1, 1, 1),
        use_batch_norm: bool = True,
        use_bias: bool = False,
        activation: bool = True,
    ):
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.activation = activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel_size, self.stride, padding=0, bias=use_bias)
        # eps/momentum of the TensorFlow original; eps matters for matching the released weights' outputs.
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if use_batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(pad_same(x, self.kernel_size, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max pooling with TensorFlow 'SAME' padding (zeros are safe: every pool follows a ReLU)."""

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int]):
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(pad_same(x, self.kernel_size, self.stride), self.kernel_size, self.stride)


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->3x3; pool->1x1) concatenated on channels."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        branch0, branch1_reduce, branch1, branch2_reduce, branch2, branch3 = widths
        self.b0 = Unit3D(in_channels, branch0)
        self.b1a = Unit3D(in_channels, branch1_reduce)
        self.b1b = Unit3D(branch1_reduce, branch1, kernel_size=(3, 3, 3))
        self.b2a = Unit3D(in_channels, branch2_reduce)
        self.b2b = Unit3D(branch2_reduce, branch2, kernel_size=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, branch3)
        self.out_channels = branch0 + branch1 + branch2 + branch3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


# Branch widths per Inception block, in the order of the I3D paper / TF release:
# (1x1, 3x3 reduce, 3x3, second 3x3 reduce, second 3x3, pool projection).
INCEPTION_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class InceptionI3d(nn.Module):
    """I3D (Carreira & Zisserman 2017) for (B, 3, T, 224, 224) inputs in [-1, 1]; returns per-clip logits.

    Attribute names follow the widely shared PyTorch port so its checkpoints (e.g. i3d_pretrained_400.pt)
    load with `load_state_dict` unchanged.
    """

    def __init__(self, num_classes: int = 400, in_channels: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = 192
        for name in ("Mixed_3b", "Mixed_3c"):
            channels = self._add_inception(name, channels)
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            channels = self._add_inception(name, channels)
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        for name in ("Mixed_5b", "Mixed_5c"):
            channels = self._add_inception(name, channels)
        # Valid 2x7x7 average pool: at 224 px the spatial map is 7x7, so this leaves one position per time step.
        self.avg_pool = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(channels, num_classes, use_batch_norm=False, use_bias=True, activation=False)

    def _add_inception(self, name: str, in_channels: int) -> int:
        block = InceptionBlock(in_channels, INCEPTION_WIDTHS[name])
        self.add_module(name, block)
        return block.out_channels

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c activations (B, 1024, ceil(T/8), H/32, W/32)."""
        for layer in (
            self.Conv3d_1a_7x7, self.MaxPool3d_2a_3x3, self.Conv3d_2b_1x1, self.Conv3d_2c_3x3,
            self.MaxPool3d_3a_3x3, self.Mixed_3b, self.Mixed_3c, self.MaxPool3d_4a_3x3,
            self.Mixed_4b, self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f,
            self.MaxPool3d_5a_2x2, self.Mixed_5b, self.Mixed_5c,
        ):
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, 224, 224) in [-1, 1] -> logits (B, num_classes) averaged over the remaining time steps."""
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip, got T={x.shape[2]}")
        logits = self.logits(self.dropout(self.avg_pool(self.backbone(x))))
        return logits.mean(dim=(2, 3, 4))


def preprocess_for_i3d(videos: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float (N, 3, T, size, size) in [-1, 1]: shorter side resized, then center crop."""
    num_videos, num_frames, height, width, channels = videos.shape
    frames = videos.reshape(num_videos * num_frames, height, width, channels).permute(0, 3, 1, 2).float()
    scale = size / min(height, width)
    # max() keeps rounding from leaving the longer side a pixel short of the crop.
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    frames = F.interpolate(frames, size=(new_height, new_width), mode="bilinear", align_corners=False)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    frames = frames[:, :, top : top + size, left : left + size]
    frames = frames / 127.5 - 1.0
    return frames.reshape(num_videos, num_frames, channels, size, size).permute(0, 2, 1, 3, 4).contiguous()
