"""Autoencoder training losses: L1 and/or MSE + LPIPS on random frames, an optional per-frame PatchGAN (hinge) and an
optional penalty on content frames with more fine detail than their clip's frames."""

from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from models.weights_file import load_weights_file

__all__ = [
    "AutoencoderLoss",
    "PatchDiscriminator",
    "build_ae_loss",
    "build_lpips",
    "content_detail_excess",
    "fine_detail",
    "lpips_backbone_weights_path",
]

# LPIPS trunk name -> (torchvision weights enum, torchvision constructor name). The lpips package
# builds its trunk as `torchvision.models.<constructor>(pretrained=True)`, i.e. the IMAGENET1K_V1
# weights, which is also what `weights='DEFAULT'` resolves to for these three models. Names, not the
# objects: lpips and torchvision are imported only where LPIPS is used, since importing them adds
# about 2.5 s to the start of every script that imports this module.
_LPIPS_BACKBONES = {
    "vgg": ("VGG16_Weights", "vgg16"),
    "alex": ("AlexNet_Weights", "alexnet"),
    "squeeze": ("SqueezeNet1_1_Weights", "squeezenet1_1"),
}


def _check_net(net: str) -> None:
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS network {net!r}; choose one of {sorted(_LPIPS_BACKBONES)}")


def lpips_backbone_weights_path(net: str = "vgg") -> str:
    """Where torchvision caches the ImageNet weights of an LPIPS trunk: <torch hub dir>/checkpoints/<file>."""
    import torchvision

    _check_net(net)
    url = getattr(torchvision.models, _LPIPS_BACKBONES[net][0]).IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _new_lpips(net: str) -> nn.Module:
    """LPIPS with its calibrated linear heads (shipped in the package) and a randomly initialised trunk."""
    import lpips

    # pnet_rand=True keeps torchvision from downloading the trunk; the lpips package still passes the
    # deprecated `pretrained=` argument to torchvision, whose warnings would only be noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models")
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)


def _load_backbone(model: nn.Module, weights_path: str) -> None:
    """Copy torchvision `features.<i>.*` tensors into lpips' trunk, which keeps layer i as `slice<k>.<i>.*`."""
    state = load_weights_file(weights_path, "LPIPS backbone weights file")
    if not isinstance(state, dict):
        raise ValueError(f"LPIPS backbone weights file {weights_path} does not hold a state dict")
    trunk = model.net
    mapped = {}
    for key, target in trunk.state_dict().items():
        _, layer_key = key.split(".", 1)  # "slice2.5.weight" -> "5.weight" (the torchvision layer index)
        source = f"features.{layer_key}"
        if source not in state:
            raise ValueError(f"LPIPS backbone weights file {weights_path} lacks {source!r}; is it a torchvision "
                             f"{model.pnet_type} state dict?")
        if state[source].shape != target.shape:
            raise ValueError(f"LPIPS backbone weights file {weights_path} has {source!r} of shape "
                             f"{tuple(state[source].shape)}, {model.pnet_type} needs {tuple(target.shape)}")
        mapped[key] = state[source]
    trunk.load_state_dict(mapped, strict=True)


def build_lpips(net: str = "vgg", weights_path: Optional[str] = None, random_backbone: bool = False) -> nn.Module:
    """Frozen LPIPS in eval mode, its trunk loaded from a local torchvision weights file (never downloaded).

    random_backbone=True keeps a randomly initialised trunk of the same layout (tests only: the
    distance is then meaningless as a perceptual measure, but has the right shapes and gradients).
    """
    _check_net(net)
    model = _new_lpips(net)
    if not random_backbone:
        path = os.path.expanduser(weights_path) if weights_path else lpips_backbone_weights_path(net)
        if not os.path.isfile(path):
            constructor = _LPIPS_BACKBONES[net][1]
            raise FileNotFoundError(
                f"LPIPS {net} backbone weights not found at {path}: on a machine with internet run "
                f"python -c \"import torchvision; torchvision.models.{constructor}(weights='DEFAULT')\" and copy "
                f"the file from its torch hub checkpoints folder, or set loss.lpips_weights=PATH, "
                f"or set loss.perceptual_weight=0"
            )
        _load_backbone(model, path)
    model.requires_grad_(False)
    return model.eval()


class PatchDiscriminator(nn.Module):
    """Per-frame PatchGAN: (N, C, H, W) frames -> (N, 1, h, w) real/fake logits, one per receptive-field patch.

    Spectral norm instead of batch norm: it keeps the discriminator Lipschitz-bounded without batch
    statistics, so scoring real and fake frames in one batch does not mix them and DDP needs no synced BN.
    """

    def __init__(self, channels: int = 3, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [spectral_norm(nn.Conv2d(channels, base_channels, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        width = base_channels
        for index in range(1, n_layers):
            next_width = base_channels * min(2 ** index, 8)
            # Two stride-2 stages in all, so that 16x16 frames still leave a patch grid.
            stride = 2 if index < 2 else 1
            layers += [spectral_norm(nn.Conv2d(width, next_width, 4, stride=stride, padding=1)), nn.LeakyReLU(0.2)]
            width = next_width
        layers.append(spectral_norm(nn.Conv2d(width, 1, 3, stride=1, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames)


def _frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W)."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def fine_detail(images: torch.Tensor) -> torch.Tensor:
    """Per image (N,): the mean squared difference between images (N, C, H, W) and their 3 x 3 box blur, the energy
    of the finest detail (a per-pixel dither scores high, a smooth image low). Differentiable."""
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (images - blurred).pow(2).mean(dim=(1, 2, 3))


def content_detail_excess(x: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
    """Per clip (B,): how far the content frame's fine detail (fine_detail) exceeds the mean of its
    frames', or 0. Clips x (B, C, T, H, W), content frames z_c (B, C, H, W), in the same units (pixels or latents).

    Per-pixel softmax weights can pick a different frame at neighbouring pixels, which leaves a dither along the
    object's path: detail no frame has. The frames' own detail is the allowance, so edges and texture that the clip
    holds cost nothing; the excess is in squared data units, as the MSE is.
    """
    b, _, t = x.shape[:3]
    frames_detail = fine_detail(_frames(x)).reshape(b, t).mean(dim=1)
    return F.relu(fine_detail(z_c) - frames_detail.to(z_c.dtype))


class AutoencoderLoss(nn.Module):
    """Reconstruction loss of the CMD autoencoder; holds the frozen LPIPS and, if enabled, the discriminator.

    Checkpoint `loss.discriminator` (its optimizer is the caller's), not this whole module: the
    frozen LPIPS weights are rebuilt from their file and need not be saved with every step. Under
    DDP, wrap `loss.discriminator` itself and pass the unwrapped autoencoder's `last_layer()`.
    """

    def __init__(
        self,
        l1_weight: float,
        perceptual_weight: float,
        perceptual_frames: int,
        lpips_module: Optional[nn.Module] = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        channels: int = 3,
        mse_weight: float = 0.0,
        content_detail_weight: float = 0.0,
    ):
        super().__init__()
        if content_detail_weight < 0:
            raise ValueError(f"loss.content_detail_weight={content_detail_weight} must be >= 0")
        if l1_weight < 0 or mse_weight < 0 or l1_weight + mse_weight <= 0:
            raise ValueError(f"loss.l1_weight={l1_weight} and loss.mse_weight={mse_weight}: both must be >= 0 "
                             f"and at least one > 0")
        if perceptual_weight > 0 and lpips_module is None:
            raise ValueError(f"perceptual_weight={perceptual_weight} needs an lpips_module (see build_lpips)")
        if perceptual_weight > 0 and channels != 3:
            raise ValueError(f"LPIPS needs 3-channel frames, got channels={channels}; set loss.perceptual_weight=0")
        if perceptual_weight > 0 and perceptual_frames < 1:
            raise ValueError(f"perceptual_frames must be >= 1, got {perceptual_frames}")
        self.l1_weight = float(l1_weight)
        self.mse_weight = float(mse_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.content_detail_weight = float(content_detail_weight)
        self.perceptual_frames = int(perceptual_frames)
        self.lpips = lpips_module if perceptual_weight > 0 else None
        self.disc_weight = float(disc_weight)
        self.disc_start = int(disc_start)
        self.discriminator = PatchDiscriminator(channels) if disc_weight > 0 else None

    def train(self, mode: bool = True) -> "AutoencoderLoss":
        super().train(mode)
        # LPIPS' linear heads contain dropout layers; the metric must stay deterministic while training.
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms are on at this optimizer step."""
        return self.discriminator is not None and step >= self.disc_start

    def perceptual_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS over `perceptual_frames` frames per clip, drawn without replacement (torch RNG)."""
        b, c, t, h, w = x.shape
        if self.perceptual_frames > t:
            raise ValueError(f"perceptual_frames={self.perceptual_frames} exceeds the clip's {t} frames")
        # Draw on the CPU generator so the choice is the same on any device for a given seed.
        frame_index = torch.rand(b, t).argsort(dim=1)[:, : self.perceptual_frames].to(x.device)  # (B, k)
        gather_index = frame_index[:, None, :, None, None].expand(b, c, self.perceptual_frames, h, w)
        real = _frames(torch.gather(x, 2, gather_index))
        fake = _frames(torch.gather(x_hat, 2, gather_index))
        return self.lpips(fake, real).mean()

    def _adaptive_weight(self, rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer) -> torch.Tensor:
        """VQGAN's balance: ||d rec / d W_last|| / ||d gan / d W_last||, so neither term swamps the other."""
        if last_layer is None or not torch.is_grad_enabled() or not rec_loss.requires_grad:
            return torch.ones((), device=rec_loss.device)
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
        weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach()

    def forward(
        self, x: torch.Tensor, x_hat: torch.Tensor, step: int, last_layer: Optional[torch.Tensor] = None,
        content: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Generator-side loss of clips x and reconstructions x_hat (B, C, T, H, W) -> (loss, detached logs).

        `content`: the content frames z_c (B, C, H, W) that encoded x; needed when content_detail_weight > 0.
        """
        if x.shape != x_hat.shape:
            raise ValueError(f"reconstruction of size {tuple(x_hat.shape)} does not match clip {tuple(x.shape)}")
        if self.content_detail_weight > 0 and content is None:
            raise ValueError("loss.content_detail_weight > 0 needs the content frames: pass content=z_c")
        error = x_hat - x
        l1 = error.abs().mean()
        mse = error.pow(2).mean()
        # Without LPIPS, L1 alone favours the per-pixel median over time, i.e. the static background: a
        # moving object covers any one pixel only in a few frames. MSE rewards placing it (the paper's
        # latent mode uses MSE too), so the tiny CPU configs, which have no VGG weights, weight it.
        rec_loss = self.l1_weight * l1 + self.mse_weight * mse
        logs = {"l1": l1.detach(), "mse": mse.detach()}
        if self.lpips is not None:
            perceptual = self.perceptual_loss(x, x_hat)
            rec_loss = rec_loss + self.perceptual_weight * perceptual
            logs["lpips"] = perceptual.detach()
        loss = rec_loss
        if self.content_detail_weight > 0:
            # Not part of rec_loss: it reaches only the encoder's content weights, never the decoder's last layer
            # that the GAN balance compares against.
            detail = content_detail_excess(x, content).mean()
            logs["content_detail"] = detail.detach()
            loss = loss + self.content_detail_weight * detail
        if self.discriminator_active(step):
            gan_loss = -self.discriminator(_frames(x_hat)).mean()
            weight = self._adaptive_weight(rec_loss, gan_loss, last_layer) * self.disc_weight
            loss = loss + weight * gan_loss
            logs["gan"] = gan_loss.detach()
            logs["gan_weight"] = weight.detach()
        logs["rec"] = rec_loss.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor,
                           step: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Hinge loss of the discriminator on real clips x and (detached) reconstructions x_hat.

        Before disc_start (or without a discriminator) it is a constant 0 with no graph: check
        `discriminator_active(step)` before calling backward on it. The generator loss also leaves
        gradients on the discriminator, so zero its grads before this backward.
        """
        if not self.discriminator_active(step):
            zero = torch.zeros((), device=x.device)
            return zero, {"disc_loss": zero}
        # One call on real and fake frames together: a DDP-wrapped discriminator allows one forward
        # per backward, and spectral norm then takes one power-iteration step per update.
        real_frames, fake_frames = _frames(x.detach()), _frames(x_hat.detach().to(x.dtype))
        logits_real, logits_fake = self.discriminator(torch.cat([real_frames, fake_frames])).chunk(2)
        loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        logs = {
            "disc_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs


def build_ae_loss(loss_cfg, channels: int, random_lpips_backbone: bool = False) -> AutoencoderLoss:
    """AutoencoderLoss from an AutoencoderLossConfig (dataclass or DictConfig); LPIPS only when weighted."""
    perceptual_weight = float(loss_cfg.perceptual_weight)
    lpips_module = None
    if perceptual_weight > 0:
        lpips_module = build_lpips(loss_cfg.lpips_net, loss_cfg.lpips_weights, random_backbone=random_lpips_backbone)
    return AutoencoderLoss(
        l1_weight=float(loss_cfg.l1_weight),
        mse_weight=float(loss_cfg.mse_weight),
        perceptual_weight=perceptual_weight,
        perceptual_frames=int(loss_cfg.perceptual_frames),
        lpips_module=lpips_module,
        disc_weight=float(loss_cfg.disc_weight),
        disc_start=int(loss_cfg.disc_start),
        channels=channels,
        content_detail_weight=float(loss_cfg.content_detail_weight),
    )
