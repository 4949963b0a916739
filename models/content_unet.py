"""The content model started from a pretrained image diffusion UNet (Stable Diffusion's), as the paper does in
latent mode (its main setting), and the one builder of either denoiser kind.

Classes enter where Stable Diffusion's text enters: through the UNet's cross-attention, as a context of one token
per class (plus the null class of guidance), each a learned vector of the UNet's cross_attention_dim. That table,
(K + 1) x d (103k values for UCF-101 with SD 2.1), is the only new parameter; the UNet itself is fine-tuned as it
is, so a content frame is a latent image in the space it was pretrained on. With captions (text-to-video) the
context is the text encoder's tokens instead, as the UNet was pretrained, and nothing is new (the empty prompt's
tokens, guidance's null condition, are a buffer: models.dit.TextEmbedder).

The pretrained weights come from `model.pretrained` (a UNet2DConditionModel folder, or a pipeline folder holding
unet/) when a run starts; the run records the UNet's config (`model.unet_config`), so its checkpoints rebuild the
model without the folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from models.dit import LabelEmbedder, TextEmbedder, build_dit
from models.vae import from_pretrained

PRETRAINED_UNET = "UNet2DCondition"  # model.name of a content model started from a diffusers UNet


class UNetLoadError(ValueError):
    """A pretrained UNet path that does not load; the message is one line that names it."""


class ContentUNet(nn.Module):
    """eps(x_t, t, y) on content frames (B, C, H, W) by a diffusers UNet2DConditionModel, class tokens as context."""

    learn_sigma = False  # the UNet predicts the noise alone; the diffusion uses fixed variances and the MSE loss

    def __init__(self, unet: nn.Module, num_classes: int, class_dropout_prob: float, input_size: Sequence[int],
                 in_channels: int, grad_checkpointing: bool = False, text_shape: Sequence[int] | None = None):
        super().__init__()
        config = unet.config
        if config.in_channels != in_channels or config.out_channels != in_channels:
            raise ValueError(f"the UNet maps {config.in_channels} to {config.out_channels} channels but the content "
                             f"frames have {in_channels}")
        factor = 2 ** (len(config.block_out_channels) - 1)
        if any(int(size) % factor for size in input_size):
            raise ValueError(f"content frames of {tuple(input_size)} are not divisible by the UNet's downsampling {factor}")
        self.unet = unet
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.text_shape = None if text_shape is None else tuple(int(v) for v in text_shape)
        if self.text_shape is None:
            self.y_embedder = LabelEmbedder(num_classes, int(config.cross_attention_dim), class_dropout_prob)
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=1.0)  # the scale of layer-normed text tokens
        elif self.text_shape[1] != int(config.cross_attention_dim):
            raise ValueError(f"the text encoder's tokens are {self.text_shape[1]} wide but the UNet cross-attends to "
                             f"{config.cross_attention_dim}: use the text encoder its pipeline was trained with")
        else:
            self.y_embedder = TextEmbedder(self.text_shape, class_dropout_prob)
        if grad_checkpointing:
            unet.enable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        context = self.y_embedder(y)
        context = (context if self.text_shape else context.unsqueeze(1)).to(x.dtype)  # (B, L, d) text, (B, 1, d) class
        return self.unet(x, t, encoder_hidden_states=context).sample


def load_pretrained_unet(source: str) -> nn.Module:
    """A UNet2DConditionModel with its weights, from a local folder (the UNet's, or a pipeline folder holding unet/)
    or a hub id (its unet/ subfolder). A pipeline whose scheduler says the UNet predicts v is refused: our diffusion
    trains and samples noise predictions."""
    from diffusers import UNet2DConditionModel  # here, not at import: pixel-mode runs never pay diffusers' ~5 s

    scheduler = Path(source).expanduser() / "scheduler" / "scheduler_config.json"
    if scheduler.is_file() and json.loads(scheduler.read_text()).get("prediction_type") == "v_prediction":
        raise UNetLoadError(f"model.pretrained {source}: its scheduler says the UNet predicts v (v_prediction); use an "
                            f"epsilon-prediction model such as stable-diffusion-2-1-base")
    return from_pretrained(UNet2DConditionModel, source, "unet", "model.pretrained", UNetLoadError)


def unet_from_config(config_json: str) -> nn.Module:
    """The architecture a run recorded in model.unet_config, with fresh weights (a checkpoint's are loaded next)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(json.loads(config_json))


def unet_config_json(unet: nn.Module) -> str:
    """The architecture alone: diffusers' own keys (_name_or_path, _diffusers_version, ...) stay out."""
    return json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}, sort_keys=True)


def build_denoiser(stage: str, model_cfg, num_classes: int, ae_content_shape: Sequence[int],
                   ae_motion_shape: Sequence[int], unet: nn.Module | None = None,
                   text_shape: Sequence[int] | None = None) -> nn.Module:
    """The `stage` denoiser a config names: a DiT (models.dit.build_dit) or, for model.name UNet2DCondition, the
    ContentUNet around `unet` (default: the architecture recorded in model.unet_config). `text_shape` (L, D), a
    text encoder's tokens, conditions it on captions instead of classes."""
    if stage != "content" or model_cfg.name != PRETRAINED_UNET:
        return build_dit(stage, model_cfg, num_classes, ae_content_shape, ae_motion_shape, text_shape)
    if unet is None:
        if not model_cfg.get("unet_config"):
            raise UNetLoadError("config key 'model.unet_config' is empty: the run that trained this content model did "
                                "not record its UNet's architecture")
        unet = unet_from_config(model_cfg.unet_config)
    channels, height, width = (int(v) for v in ae_content_shape)
    return ContentUNet(unet, num_classes, float(model_cfg.class_dropout_prob), (height, width), channels,
                       bool(model_cfg.grad_checkpointing), text_shape)
