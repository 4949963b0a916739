"""Per-channel latent statistics: float64 sums that ranks all-reduce (LatentMoments), and the standardisation the
denoisers learn in (LatentScaler), saved in every diffusion checkpoint."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch

from core.checkpoint import CheckpointError
from core.distributed import all_reduce_sum

# Floor of a measured std, in the autoencoder's units (pixel mode's latents live in [-1, 1], typical stds 0.1-0.5;
# latent mode's content frames are scaled VAE latents, std about 1).
# A channel spreading less than 1e-3 carries nothing the decoder can show (in the content frame it is an eighth
# of one 8-bit pixel level, 2/255); dividing by its true, possibly zero std would blow float rounding up into
# unit-variance targets for the denoiser, while with the floor its sampled values stay within ~1e-3 of the mean.
STD_FLOOR = 1e-3


class LatentMoments:
    """Float64 per-channel sums (count, sum, sum of squares) of z_c (B, C, H, W) and z_m (B, D, T, H'+W') batches,
    over every axis but the channel axis: sums of rank shares all-reduce into the sums of the whole set."""

    KINDS = ("content", "motion")

    def __init__(self, content_channels: int, motion_channels: int):
        # Kept on the CPU: one small copy per batch is nothing for a measurement done once per run.
        self.sums = {kind: torch.zeros(3, channels, dtype=torch.float64)
                     for kind, channels in zip(self.KINDS, (content_channels, motion_channels))}

    def add(self, z_c: torch.Tensor, z_m: torch.Tensor) -> None:
        for kind, z in zip(self.KINDS, (z_c, z_m)):
            values = z.detach().transpose(0, 1).reshape(z.shape[1], -1).double()
            count = torch.full_like(values[:, 0], values.shape[1])
            self.sums[kind] += torch.stack([count, values.sum(1), values.square().sum(1)]).cpu()

    def all_reduce(self) -> None:
        """Every rank ends with the sums over all ranks."""
        for kind in self.KINDS:
            self.sums[kind] = all_reduce_sum(self.sums[kind])

    def mean_std(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 (channels,) mean and population std (numpy's default, ddof=0)."""
        count, total, squares = self.sums[kind]
        if not count.gt(0).all():
            raise ValueError("latent statistics: no latents were measured")
        mean = total / count
        # In float64 the cancellation in E[z^2] - E[z]^2 is harmless for latents of about unit scale.
        return mean, (squares / count - mean.square()).clamp(min=0.0).sqrt()

    def save(self, path) -> None:
        """Written to a temp file and renamed, so that a concurrent reader never sees half a file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as handle:
            np.savez(handle, **{kind: sums.numpy() for kind, sums in self.sums.items()})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "LatentMoments":
        with np.load(path) as arrays:
            if any(kind not in arrays for kind in cls.KINDS):
                raise CheckpointError(f"{path} lacks the content or motion sums; delete it to have them measured again")
            moments = cls(arrays["content"].shape[1], arrays["motion"].shape[1])
            moments.sums = {kind: torch.from_numpy(arrays[kind]) for kind in cls.KINDS}
        return moments


class LatentScaler:
    """Per-channel standardisation z' = (z - mean) / std of z_c (B, C, H, W) and z_m (B, D, T, H'+W'): both
    denoisers learn and sample standardised latents ('content' and 'motion' name the latent, not the stage).

    Its state_dict, the `latent_stats` entry of every diffusion checkpoint, holds four plain float32 tensors:
    content_mean, content_std (C,) and motion_mean, motion_std (D,).
    """

    KEYS = ("content_mean", "content_std", "motion_mean", "motion_std")

    def __init__(self, content_mean, content_std, motion_mean, motion_std):
        as32 = [torch.as_tensor(t, dtype=torch.float32) for t in (content_mean, content_std, motion_mean, motion_std)]
        self.stats = {"content": tuple(as32[:2]), "motion": tuple(as32[2:])}

    @classmethod
    def identity(cls, ae) -> "LatentScaler":
        """Mean 0, std 1: the latents as the autoencoder `ae` (its content_shape, motion_shape) emits them."""
        c, d = ae.content_shape[0], ae.motion_shape[0]
        return cls(torch.zeros(c), torch.ones(c), torch.zeros(d), torch.ones(d))

    @classmethod
    def from_moments(cls, moments: LatentMoments) -> tuple["LatentScaler", dict]:
        """(scaler, {kind: indices of channels whose std was raised to STD_FLOOR})."""
        stats, floored = [], {}
        for kind in LatentMoments.KINDS:
            mean, std = moments.mean_std(kind)
            floored[kind] = torch.nonzero(std < STD_FLOOR).flatten().tolist()
            stats += [mean, std.clamp(min=STD_FLOOR)]
        return cls(*stats), {kind: idx for kind, idx in floored.items() if idx}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path, ae) -> "LatentScaler":
        """The checkpoint's `latent_stats`, checked against the autoencoder's channel counts.

        A checkpoint without them (written before the latents were standardised) trained on the raw latents:
        identity stats (mean 0, std 1) give its denoiser exactly what it was trained on.
        """
        state = ckpt.get("latent_stats")
        if state is None:
            return cls.identity(ae)
        channels = {"content": ae.content_shape[0], "motion": ae.motion_shape[0]}
        for key in cls.KEYS:
            value = state.get(key) if isinstance(state, dict) else None
            want = channels[key.split("_")[0]]
            if not torch.is_tensor(value) or tuple(value.shape) != (want,):
                raise CheckpointError(f"{path}: latent_stats['{key}'] is not a ({want},) tensor for this autoencoder's "
                                      f"latents; was it trained on another autoencoder?")
        return cls(*(state[key] for key in cls.KEYS))

    def _tensors(self) -> list:
        return [*self.stats["content"], *self.stats["motion"]]  # in KEYS order

    def state_dict(self) -> dict:
        return {key: value.detach().cpu().clone() for key, value in zip(self.KEYS, self._tensors())}

    def to(self, device) -> "LatentScaler":
        """A copy whose statistics live on `device`, so that the training step moves nothing."""
        return LatentScaler(*(t.to(device) for t in self._tensors()))

    def _broadcast(self, kind: str, ndim: int, device=None, dtype=torch.float32):
        """(mean, std) shaped (1, channels, 1, ...) to broadcast against a (B, channels, ...) latent of `ndim` dims."""
        shape = (1, -1) + (1,) * (ndim - 2)
        return tuple(t.to(device=device, dtype=dtype).view(shape) for t in self.stats[kind])

    def normalize(self, kind: str, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._broadcast(kind, z.ndim, z.device, z.dtype)
        return (z - mean) / std

    def denormalize(self, kind: str, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._broadcast(kind, z.ndim, z.device, z.dtype)
        return z * std + mean

    def bounds(self, kind: str, ndim: int, device=None, bound: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The autoencoder's range [-bound, bound] in standardised units, per channel: ((-bound - mean) / std,
        (bound - mean) / std), shaped (1, channels, 1, ...) for a latent of `ndim` dims."""
        mean, std = self._broadcast(kind, ndim, device)
        return (-bound - mean) / std, (bound - mean) / std

    def describe(self) -> str:
        def values(t):
            return "[" + ", ".join(f"{v:.4g}" for v in t.tolist()) + "]"

        return " | ".join(f"{kind} mean {values(mean)} std {values(std)}" for kind, (mean, std) in self.stats.items())
