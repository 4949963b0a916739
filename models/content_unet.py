"""The content model started from a pretrained image diffusion UNet (Stable Diffusion's), as the paper does in
latent mode (docs/METHOD.md), and the one builder of either denoiser kind.

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

from models.conv_unet import ConvUNet_models
from models.dit import LabelEmbedder, TextEmbedder, build_dit, validate_model_name
from models.vae import from_pretrained, looks_like_hub_id

PRETRAINED_UNET = "UNet2DCondition"  # model.name of a content model started from a diffusers UNet


class UNetLoadError(ValueError):
    """A pretrained UNet path that does not load; the message is one line that names it."""


class ContentUNet(nn.Module):
    """eps(x_t, t, y) or v(x_t, t, y) (what the UNet was pretrained to predict) on content frames (B, C, H, W) by a
    diffusers UNet2DConditionModel, class tokens as context."""

    learn_sigma = False  # the UNet predicts eps or v alone; the diffusion uses fixed variances and the MSE loss

    def __init__(self, unet: nn.Module, num_classes: int, class_dropout_prob: float, input_size: Sequence[int],
                 in_channels: int, grad_checkpointing: bool = False, text_shape: Sequence[int] | None = None):
        super().__init__()
        config = unet.config
        if config.in_channels != in_channels or config.out_channels != in_channels:
            raise ValueError(f"the UNet maps {config.in_channels} to {config.out_channels} channels but the content "
                             f"frames have {in_channels}")
        factor = 2 ** (len(config.block_out_channels) - 1)
        if any(int(size) % factor for size in input_size):
            raise ValueError(f"content frames of {tuple(input_size)} are not divisible by the UNet's downsampling "
                             f"{factor}")
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
    or a hub id (its unet/ subfolder). What it predicts: pretrained_prediction_type."""
    from diffusers import UNet2DConditionModel  # here, not at import: pixel-mode runs never pay diffusers' ~5 s

    return from_pretrained(UNet2DConditionModel, source, "unet", "model.pretrained", UNetLoadError)


# diffusers' scheduler prediction types and ours (diffusion.PREDICTION_TYPES); its "sample" (x0) has no counterpart.
SCHEDULER_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def scheduler_config_file(source: str) -> Path | None:
    """The scheduler config that came with a pretrained UNet: <pipeline>/scheduler/ of a pipeline folder, the
    sibling scheduler/ of a path straight to its unet/ folder, or a hub id's scheduler/ in the local Hugging Face
    cache (nothing is downloaded); None when there is none."""
    path = Path(source).expanduser()
    if path.exists():
        candidates = [path / "scheduler"] + ([path.parent / "scheduler"] if (path / "config.json").is_file() else [])
        return next((f / "scheduler_config.json" for f in candidates if (f / "scheduler_config.json").is_file()), None)
    if looks_like_hub_id(source):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "scheduler/scheduler_config.json")
        return Path(found) if isinstance(found, str) else None
    return None


def pretrained_prediction_type(source: str, configured: str | None = None) -> str:
    """What the pretrained UNet at `source` predicts ("eps" or "v"), read from its scheduler config
    (scheduler_config_file; a config without prediction_type is diffusers' default, epsilon). `configured`
    (diffusion.prediction_type) stands in where no scheduler config is found and must agree with one that is; else
    UNetLoadError, one line naming the path and the key."""
    file = scheduler_config_file(source)
    if file is None:
        if configured is None:
            where = "in the local Hugging Face cache" if looks_like_hub_id(source) and not Path(source).exists() \
                else "beside its unet/"
            raise UNetLoadError(f"model.pretrained {source}: no scheduler/scheduler_config.json {where} tells whether "
                                f"the UNet predicts eps or v; set diffusion.prediction_type=eps or "
                                f"diffusion.prediction_type=v")
        return configured
    try:
        found = json.loads(file.read_text()).get("prediction_type") or "epsilon"
    except (OSError, ValueError, AttributeError) as exc:
        raise UNetLoadError(f"model.pretrained {source}: {file} does not read as a scheduler config "
                            f"({type(exc).__name__})") from None
    if found not in SCHEDULER_PREDICTIONS:
        raise UNetLoadError(f"model.pretrained {source}: its scheduler ({file}) says prediction_type {found!r}; only "
                            f"{' and '.join(SCHEDULER_PREDICTIONS)} models are supported")
    ours = SCHEDULER_PREDICTIONS[found]
    if configured is not None and configured != ours:
        raise UNetLoadError(f"model.pretrained {source}: its scheduler ({file}) says the UNet predicts {ours} "
                            f"({found}) but diffusion.prediction_type is {configured}")
    return ours


def unet_from_config(config_json: str) -> nn.Module:
    """The architecture a run recorded in model.unet_config, with fresh weights (a checkpoint's are loaded next)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(json.loads(config_json))


def unet_config_json(unet: nn.Module) -> str:
    """The architecture alone: diffusers' own keys (_name_or_path, _diffusers_version, ...) stay out."""
    return json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}, sort_keys=True)


def validate_denoiser_name(stage: str, name: str) -> str:
    """`name` if it names a denoiser of `stage`: a DiT, or for content also a ConvUNet or the pretrained UNet."""
    if stage == "content" and (name in ConvUNet_models or name == PRETRAINED_UNET):
        return name
    try:
        return validate_model_name(stage, name)
    except ValueError as exc:
        if stage != "content":
            raise
        raise ValueError(f"{exc}, {', '.join(ConvUNet_models)}, {PRETRAINED_UNET}") from None


def build_denoiser(stage: str, model_cfg, num_classes: int, ae_content_shape: Sequence[int],
                   ae_motion_shape: Sequence[int], unet: nn.Module | None = None,
                   text_shape: Sequence[int] | None = None) -> nn.Module:
    """The `stage` denoiser a config names: a DiT (models.dit.build_dit) or, for model.name UNet2DCondition, the
    ContentUNet around `unet` (default: the architecture recorded in model.unet_config). `text_shape` (L, D), a
    text encoder's tokens, conditions it on captions instead of classes."""
    if stage == "content" and model_cfg.name in ConvUNet_models:
        channels, height, width = (int(v) for v in ae_content_shape)
        return ConvUNet_models[model_cfg.name](
            input_size=(height, width), in_channels=channels, num_classes=int(num_classes),
            class_dropout_prob=float(model_cfg.class_dropout_prob), learn_sigma=bool(model_cfg.learn_sigma),
            grad_checkpointing=bool(model_cfg.grad_checkpointing), text_shape=text_shape)
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
