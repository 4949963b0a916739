"""Stage configs: OmegaConf YAML checked against dataclass schemas, and the training scripts' command line."""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datasets.build import DATASET_NAMES
from diffusion.gaussian_diffusion import PREDICTION_TYPES, SAMPLERS, check_loss_type
from models.content_unet import PRETRAINED_UNET, validate_denoiser_name
from models.dit import ContentDiT_models
from core.cli import GUIDANCE_MAX, HelpFormatter, positive_int
from core.distributed import LAUNCHER_FLAGS, relaunch_with_torchrun_if_asked

STAGES = ("autoencoder", "motion", "content")
MODES = ("pixel", "latent")
LR_DECAYS = ("none", "linear", "cosine")
# A command line that names no config (as NVlabs/CMD's do) gets the paper-scale UCF-101 settings.
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "ucf101"


class ConfigError(ValueError):
    """A config problem; the message is one line that names the key, value or file."""


@dataclass
class DataConfig:
    dataset_name: str = "synthetic"  # synthetic | UCF101 | folder | captions (text-to-video, e.g. WebVid)
    data_path: Optional[str] = None
    # dataset "captions": a CSV or JSONL of path, caption (or WebVid's videoid, page_dir, name)
    captions: Optional[str] = None
    resolution: List[int] = field(default_factory=lambda: [64, 64])  # (H, W)
    n_frames: int = 16
    frame_stride: int = 1
    split: str = "train"  # train | test | all
    eval_split: str = "test"  # held-out clips for evaluation (synthetic: a disjoint seed range)
    fold: int = 1  # UCF-101 split list 1..3
    num_classes: Optional[int] = None  # filled from the dataset; synthetic: how many classes to use
    synthetic_size: int = 4096  # clips per synthetic epoch
    num_workers: int = 2
    index_cache_dir: Optional[str] = None  # default: <data_path>/.cmd_index_cache


@dataclass
class AutoencoderModelConfig:
    name: str = "CMD-AE"
    channels: int = 3
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    motion_dim: int = 8  # D
    grad_checkpointing: bool = False
    motion_centering: bool = True  # z_m from features minus their temporal mean; false collapses z_m (ablation)
    # pixel (the paper) | token: content weights per token, bilinearly upsampled | frame: one weight per frame
    content_logits: str = "pixel"
    output_head: str = "linear"  # linear un-patchify (the paper) | conv: a 3x3 convolution after it, no patch grid
    # tanh on the decoder's output: pixel clips live in [-1, 1], scaled VAE latents do not. None: true in pixel mode,
    # false in latent mode (resolved when the config is loaded; checkpoints without the key squashed).
    output_squash: Optional[bool] = None


@dataclass
class AutoencoderLossConfig:
    l1_weight: float = 4.0
    mse_weight: float = 0.0  # the paper's pixel mode: L1 + LPIPS; the tiny configs (no LPIPS) use MSE
    perceptual_weight: float = 4.0
    perceptual_frames: int = 1  # random frames per clip that LPIPS sees
    lpips_net: str = "vgg"
    lpips_weights: Optional[str] = None  # backbone weights file; default: the torch hub cache
    disc_weight: float = 0.0  # 0 = no discriminator
    disc_start: int = 0
    disc_lr: Optional[float] = None  # default: optim.lr
    # Penalty on a content frame's fine detail above its frames' (models/ae_losses.content_detail_excess); 0 = off
    content_detail_weight: float = 0.0


@dataclass
class DiTModelConfig:
    name: str = "ContentDiT-S/2"
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    key_patch_size: int = 4  # motion stage: patch size of the content-frame tokens
    grad_checkpointing: bool = False
    # Content DiTs: feed the model its own previous estimate of the clean frame (self-conditioning; training costs
    # a forward pass without gradient on half the batch)
    self_condition: bool = False
    # Content stage, model.name UNet2DCondition: the pretrained diffusers UNet folder (or SD pipeline folder / hub
    # id) it starts from; the run records the UNet's config JSON in unet_config (models/content_unet.py).
    pretrained: Optional[str] = None
    unet_config: Optional[str] = None


@dataclass
class DiffusionConfig:
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    loss_type: str = "hybrid"  # hybrid (MSE + VLB, learned sigma) | mse
    sampler: str = "ddim"  # ddim | ddpm | dpm++2m  (the training previews' sampler; sample.py has its own presets)
    sample_steps: int = 50
    # Guidance scale s in DiT's convention, eps = eps(null) + s (eps(c) - eps(null)); 1 = unguided. The paper writes
    # (1 + w) eps(c) - w eps(null), so s = 1 + w. 4.0 is what NVlabs/CMD's evaluation code runs for the UCF-101
    # content model (the paper's "w = 4.0" is that argument, i.e. w = 3 in its own formula; docs/METHOD.md).
    cfg_scale: float = 4.0
    latent_cache: bool = False
    latent_cache_clips_per_video: int = 4
    # What the denoiser predicts: eps | v. None: eps for a DiT; a pretrained UNet's from its scheduler config. The run
    # records the value it trained with; sampling reads it from the checkpoint.
    prediction_type: Optional[str] = None
    snr_gamma: Optional[float] = None  # Min-SNR-gamma weighting of the MSE loss (Hang et al. 2023: 5); None or 0: off
    # Standardise latents per channel by statistics measured on the training data. None: yes, except the content
    # stage of a pretrained UNet, which sees raw scaled VAE latents as it was pretrained. Recorded by the run.
    standardize_latents: Optional[bool] = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    fused: bool = False  # fused AdamW (CUDA and CPU)
    # Learning-rate schedule, a function of the step alone (resumes continue it): linear warm-up over warmup_steps,
    # then constant, or decayed ("linear" | "cosine") over the last decay_fraction of train.max_steps (never into
    # the warm-up; 1: all steps after it) down to min_lr_ratio * lr. Applies to every optimiser of the run.
    warmup_steps: int = 0
    decay: str = "none"  # none | linear | cosine
    decay_fraction: float = 1.0
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    results_dir: str = "results"
    exp_name: Optional[str] = None
    resume: Optional[str] = None  # checkpoint file, run folder, or "auto"
    global_batch_size: int = 256
    global_seed: int = 0
    max_steps: int = 400_000
    log_every: int = 100
    ckpt_every: int = 20_000
    keep_last: int = 0  # keep only the newest N step checkpoints (0 = keep all)
    eval_every: int = 5_000
    sample_every: int = 5_000
    num_eval_videos: int = 8
    # Autoencoder reconstruction FVD: held-out clips spread over the eval split (at most all of it), sharded over
    # ranks. Separate from num_eval_videos (the fixed batch of the other metrics), since FVD over a few dozen clips
    # is dominated by its estimation bias and is not comparable with the paper's 7.72.
    fvd_eval_videos: int = 2048
    ema_decay: float = 0.9999
    mixed_precision: str = "bf16"  # bf16 | no  (bf16 autocast on CUDA only; CPU stays fp32)
    tf32: bool = True
    compile: bool = False
    max_nonfinite_steps: int = 10  # consecutive NaN/inf losses before the run stops
    fvd_detector: Optional[str] = None  # I3D file for reconstruction FVD during AE evaluation
    wandb_project: Optional[str] = None  # also log to Weights & Biases (pip install wandb); off by default
    wandb_entity: Optional[str] = None  # W&B team or user; default: wandb's own default


@dataclass
class AutoencoderStageConfig:
    stage: str = "autoencoder"
    mode: str = "pixel"  # pixel | latent: frames first encoded by a Stable Diffusion VAE (models/vae.py)
    vae: Optional[str] = None  # latent mode: an AutoencoderKL folder (or SD pipeline folder with vae/) or hub id
    vae_fingerprint: Optional[str] = None  # recorded by the run: the VAE's weights (checked on resume and by its users)
    latent_cache: bool = False  # latent mode: VAE-encode the dataset once (clips_per_video clips each), train from it
    latent_cache_clips_per_video: int = 4
    data: DataConfig = field(default_factory=DataConfig)
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, betas=[0.5, 0.9], grad_clip=0.0))
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class TextConfig:
    """Text-to-video: the diffusion stages conditioned on captions (the dataset's) instead of classes."""
    # A CLIP text encoder: a Stable Diffusion pipeline folder (text_encoder/ + tokenizer/; the one whose UNet the
    # content model starts from), a folder holding both, or a hub id. None: class-conditional.
    encoder: Optional[str] = None
    # Encode every training caption once when the run starts (and keep them with the latent cache); false encodes
    # each batch's captions as it comes (for caption sets too large to hold: WebVid's 10M at 77 x 1024 floats each).
    cache: bool = True
    # Recorded by the run: the encoder's tokens per caption and their width, and its weights' fingerprint.
    tokens: Optional[int] = None
    dim: Optional[int] = None
    fingerprint: Optional[str] = None


@dataclass
class DiffusionStageConfig:
    stage: str = "motion"
    mode: str = "pixel"  # must match the autoencoder's (its checkpoint records mode and vae)
    vae: Optional[str] = None  # latent mode: overrides the VAE the autoencoder recorded (the same weights, moved)
    vae_fingerprint: Optional[str] = None  # recorded by the run: the VAE's weights, those its autoencoder recorded
    ae_ckpt: str = "auto"  # a train_ae.py checkpoint, or auto: the newest autoencoder run in train.results_dir
    ae_fingerprint: Optional[str] = None  # recorded: its autoencoder's weights (checked on resume and by sample.py)
    data: DataConfig = field(default_factory=DataConfig)
    model: DiTModelConfig = field(default_factory=DiTModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SCHEMAS = {"autoencoder": AutoencoderStageConfig, "motion": DiffusionStageConfig, "content": DiffusionStageConfig}


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"config key '{key}': {msg}" if key else msg


def _schema(stage: str):
    schema = SCHEMAS[stage](stage=stage)
    if stage == "motion":
        schema.model.name = "MotionDiT-S/2"
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    return cfg


def load_config(stage: str, config_file: Optional[str] = None, overrides: Optional[list] = None):
    """Schema defaults <- YAML file <- dot-list overrides; validated; returns a struct-mode DictConfig."""
    if stage not in SCHEMAS:
        raise ConfigError(f"unknown stage '{stage}', expected one of {STAGES}")
    cfg = _schema(stage)
    try:
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            bad = [item for item in overrides if "=" not in item]
            if bad:
                raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        where = f" (in {config_file})" if config_file else ""
        raise ConfigError(_one_line(exc) + where) from None
    if stage == "autoencoder" and cfg.model.output_squash is None:
        cfg.model.output_squash = cfg.mode == "pixel"
    if cfg.train.mixed_precision in ("False", "false"):
        # YAML 1.1 reads a bare `no` (file or key=value override) as the boolean false, which the str field
        # stores as "False": it is the documented "no".
        cfg.train.mixed_precision = "no"
    validate_config(cfg, stage)
    return cfg


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_config(cfg, stage: str) -> None:
    """Checks that a merged config can build a run; every failure names its key."""
    _require(cfg.stage == stage, f"config key 'stage' is '{cfg.stage}' but this script trains the '{stage}' stage")
    data = cfg.data
    _require(data.dataset_name.lower() in (name.lower() for name in DATASET_NAMES),
             f"config key 'data.dataset_name': '{data.dataset_name}' is not one of {list(DATASET_NAMES)}")
    if data.dataset_name.lower() != "synthetic":
        _require(bool(data.data_path),
                 f"config key 'data.data_path' is required for dataset '{data.dataset_name}' (--data-path)")
    _require(len(data.resolution) == 2 and min(data.resolution) > 0,
             f"config key 'data.resolution' must be [H, W] with positive sizes, got {list(data.resolution)}")
    _require(data.n_frames > 0, f"config key 'data.n_frames' must be positive, got {data.n_frames}")
    _require(data.split in ("train", "test", "all"), f"config key 'data.split': '{data.split}' is not train|test|all")
    _require(cfg.mode in MODES, f"config key 'mode': '{cfg.mode}' is not {'|'.join(MODES)}")
    train = cfg.train
    _require(train.global_batch_size > 0,
             f"config key 'train.global_batch_size' must be positive, got {train.global_batch_size}")
    _require(train.mixed_precision in ("bf16", "no"),
             f"config key 'train.mixed_precision': '{train.mixed_precision}' is not bf16|no")
    for key in ("max_steps", "log_every", "ckpt_every"):
        _require(train[key] > 0, f"config key 'train.{key}' must be positive, got {train[key]}")
    optim = cfg.optim
    _require(optim.decay in LR_DECAYS, f"config key 'optim.decay': '{optim.decay}' is not {'|'.join(LR_DECAYS)}")
    _require(optim.warmup_steps >= 0, f"config key 'optim.warmup_steps' must be non-negative, got {optim.warmup_steps}")
    for key in ("decay_fraction", "min_lr_ratio"):
        _require(0.0 <= optim[key] <= 1.0, f"config key 'optim.{key}' must be in [0, 1], got {optim[key]}")
    _require(0.0 <= train.ema_decay < 1.0, f"config key 'train.ema_decay' must be in [0, 1), got {train.ema_decay}")
    if train.wandb_project:
        _require(importlib.util.find_spec("wandb") is not None,
                 f"config key 'train.wandb_project' is set ('{train.wandb_project}') but wandb is not installed: "
                 f"pip install wandb")
    if stage == "autoencoder":
        _require(cfg.loss.perceptual_frames > 0, "config key 'loss.perceptual_frames' must be positive")
        _require(cfg.loss.content_detail_weight >= 0,
                 f"config key 'loss.content_detail_weight' must be non-negative, got {cfg.loss.content_detail_weight}")
        _require(not cfg.latent_cache or cfg.mode == "latent",
                 "config key 'latent_cache' caches VAE latents: it needs mode latent "
                 "(pixel clips have nothing to cache)")
        _require(cfg.latent_cache_clips_per_video > 0, "config key 'latent_cache_clips_per_video' must be positive")
        if cfg.mode == "latent":
            _require(bool(cfg.vae), "config key 'vae' is required in latent mode: "
                     "a Stable Diffusion VAE folder or hub id (--vae)")
            _require(cfg.loss.perceptual_weight == 0, "config key 'loss.perceptual_weight' must be 0 in latent mode: "
                     "LPIPS compares images, the latent-mode autoencoder reconstructs VAE latents (the paper uses MSE)")
    else:
        if stage == "content" and cfg.model.name == PRETRAINED_UNET:
            _require(bool(cfg.model.pretrained or cfg.model.unet_config),
                     f"config key 'model.pretrained' is required with model.name {PRETRAINED_UNET}: a diffusers UNet "
                     f"folder, a Stable Diffusion folder holding unet/, or a hub id")
            _require(not cfg.model.learn_sigma, f"config key 'model.learn_sigma' must be false with model.name "
                     f"{PRETRAINED_UNET}: the pretrained UNet predicts eps or v alone, no variance")
        else:
            try:
                validate_denoiser_name(stage, cfg.model.name)
            except ValueError as exc:
                raise ConfigError(f"config key 'model.name': {exc}") from None
        _require(not cfg.model.self_condition or (stage == "content" and cfg.model.name in ContentDiT_models),
                 f"config key 'model.self_condition' is for content DiTs (ContentDiT-*), not {stage} model "
                 f"{cfg.model.name}")
        _require(bool(cfg.ae_ckpt),
                 "config key 'ae_ckpt' is empty: pass the autoencoder checkpoint with --ae-ckpt (or auto)")
        _require(math.isfinite(cfg.diffusion.cfg_scale) and 0.0 <= cfg.diffusion.cfg_scale <= GUIDANCE_MAX,
                 f"config key 'diffusion.cfg_scale' must be a guidance scale in 0..{GUIDANCE_MAX:g}, "
                 f"got {cfg.diffusion.cfg_scale}")
        _require(cfg.diffusion.prediction_type in (None, *PREDICTION_TYPES),
                 f"config key 'diffusion.prediction_type': '{cfg.diffusion.prediction_type}' is not "
                 f"{'|'.join(PREDICTION_TYPES)}")
        _require(cfg.diffusion.snr_gamma is None or cfg.diffusion.snr_gamma >= 0,
                 f"config key 'diffusion.snr_gamma' must be non-negative (0 or null: off), got "
                 f"{cfg.diffusion.snr_gamma}")
        _require(cfg.diffusion.sampler in SAMPLERS,
                 f"config key 'diffusion.sampler': '{cfg.diffusion.sampler}' is not {'|'.join(SAMPLERS)}")
        try:
            check_loss_type(cfg.diffusion.loss_type, cfg.model.learn_sigma)
        except ValueError as exc:
            raise ConfigError(f"config key 'diffusion.loss_type': {exc}") from None


# The command-line flags of the original NVlabs/CMD scripts (github.com/NVlabs/CMD), mapped onto config keys; the
# config's own keys are set with key=value overrides.
FLAG_KEYS = {
    "dataset_name": "data.dataset_name",
    "data_path": "data.data_path",
    "global_batch_size": "train.global_batch_size",
    "results_dir": "train.results_dir",
    "exp_name": "train.exp_name",
    "mode": "mode",
    "vae": "vae",
    "ckpt_every": "train.ckpt_every",
    "log_every": "train.log_every",
    "max_steps": "train.max_steps",
    "resume": "train.resume",
    "global_seed": "train.global_seed",
    "model": "model.name",
    "ae_ckpt": "ae_ckpt",
    "text_encoder": "text.encoder",
}

# What --help lists under the flags: the config keys most runs change, by stage ("diffusion" = motion and content).
COMMON_KEYS = (
    ("all", "train.mixed_precision=bf16|no", "bf16 autocast on CUDA, or fp32 (the CPU always runs fp32)"),
    ("all", "train.tf32=true|false", "TF32 matmuls on CUDA"),
    ("all", "model.grad_checkpointing=true", "recompute activations in the backward pass: less memory, slower steps"),
    ("all", "train.compile=true", "torch.compile the model"),
    ("all", "train.keep_last=N", "keep only the newest N step checkpoints (0 = all; last.pt is always kept)"),
    ("all", "train.wandb_project=NAME", "also log to Weights & Biases (pip install wandb; train.wandb_entity=TEAM)"),
    ("all", "optim.lr=X", "learning rate (optim.warmup_steps, optim.decay=linear|cosine: the schedule)"),
    ("all", "data.num_workers=N", "loader processes per rank"),
    ("autoencoder", "latent_cache=true", "latent mode: VAE-encode the clips once and train from the cache"),
    ("autoencoder", "train.fvd_detector=I3D.pt", "reconstruction FVD at every evaluation"),
    ("diffusion", "diffusion.latent_cache=true", "encode the clips with the frozen autoencoder once, train from them"),
    ("diffusion", "diffusion.cfg_scale=S", "guidance scale of the training previews and the default of sample.py"),
)


def _config_epilog(stage: str) -> str:
    kind = "autoencoder" if stage == "autoencoder" else "diffusion"
    rows = [(key, what) for where, key, what in COMMON_KEYS if where in ("all", kind)]
    width = max(len(key) for key, _ in rows) + 2
    lines = [f"  {key:<{width}}{what}" for key, what in rows]
    return "\n".join([
        "Any config key is set by a key=value argument (after the flags or between them); overrides win over flags,",
        "flags over --config, --config over the built-in defaults. Common keys:", *lines,
        "--print-config prints every key with its resolved value."])


def _default_config(stage: str):
    """The stage's default config file merged onto the schema, unvalidated: the values --help quotes."""
    try:
        return OmegaConf.merge(_schema(stage), OmegaConf.load(DEFAULT_CONFIG_DIR / f"{stage}.yaml"))
    except (OSError, OmegaConfBaseException):
        return None


class _ConfigHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults after their help, the epilog's table as written."""


def build_arg_parser(stage: str, description: str) -> argparse.ArgumentParser:
    defaults = _default_config(stage)
    default_file = f"configs/ucf101/{stage}.yaml"

    def key_default(flag: str) -> str:
        key = FLAG_KEYS[flag]
        if defaults is None:
            return f"(default: the config's {key})"
        value = OmegaConf.select(defaults, key)
        return f"(default: the config's {key}; {default_file}: {'unset' if value is None else value})"

    parser = argparse.ArgumentParser(description=description, epilog=_config_epilog(stage),
                                     formatter_class=_ConfigHelpFormatter)
    parser.add_argument("--config", default=None, metavar="YAML",
                        help=f"the stage's config file (default: {default_file}, the paper's UCF-101 settings; "
                        f"configs/tiny/{stage}.yaml runs on a CPU in minutes)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, with the flags and overrides applied) and exit; "
                        "creates no run folder")
    parser.add_argument("--dataset-name", default=None, metavar="NAME",
                        help="synthetic (built-in moving shapes, no download), UCF101 (the UCF-101 tree with its "
                        "ucfTrainTestlist split files), folder (one sub-folder of videos per class) or captions "
                        "(videos with a CSV/JSONL of captions in data.captions, for text-to-video); any case "
                        + key_default("dataset_name"))
    parser.add_argument("--data-path", default=None, metavar="DIR",
                        help="the dataset's root folder; required for every dataset but synthetic "
                        + key_default("data_path"))
    parser.add_argument("--global-batch-size", type=positive_int, default=None, metavar="N",
                        help="clips per optimizer step summed over all ranks (GPUs): each of W ranks loads N / W, "
                        "so N must be divisible by W " + key_default("global_batch_size"))
    parser.add_argument("--results-dir", default=None, metavar="DIR",
                        help="where run folders are created " + key_default("results_dir"))
    parser.add_argument("--exp-name", default=None, metavar="NAME",
                        help="the run folder, RESULTS_DIR/NAME; without it the next free <NNN>-<stage> (000-"
                        f"{stage}, ...). Give it to refer to the run's checkpoints by a fixed path "
                        + key_default("exp_name"))
    parser.add_argument("--mode", default=None, choices=MODES,
                        help="pixel: the autoencoder reads frames; latent: it reads Stable Diffusion VAE latents of "
                        "the frames (set --vae) " + key_default("mode"))
    parser.add_argument("--vae", default=None, metavar="PATH",
                        help="latent mode: the Stable Diffusion VAE folder or hub id " + key_default("vae"))
    parser.add_argument("--ckpt-every", type=positive_int, default=None, metavar="N",
                        help="write a checkpoint every N optimizer steps (and at the last step) "
                        + key_default("ckpt_every"))
    parser.add_argument("--log-every", type=positive_int, default=None, metavar="N",
                        help="log the training losses every N optimizer steps " + key_default("log_every"))
    parser.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                        help="stop after N optimizer steps, with a checkpoint " + key_default("max_steps"))
    parser.add_argument("--global-seed", type=int, default=None, metavar="SEED",
                        help="the run's seed (rank r of W seeds with SEED * W + r; the data order follows it) "
                        + key_default("global_seed"))
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue from a checkpoint file, a run folder (its newest checkpoint), or 'auto': the "
                        "newest run of this stage with the same settings (only --exp-name's when given), else a new "
                        "run " + key_default("resume"))
    # The original NVlabs/CMD commands pass torchrun's own flags to the script; we accept them and relaunch under
    # torchrun (core.distributed). Hidden from --help: they are torchrun's.
    for name, spellings, kind in LAUNCHER_FLAGS:
        parser.add_argument(*spellings, dest=name, type=kind, default=None, help=argparse.SUPPRESS)
    if stage != "autoencoder":
        parser.add_argument("--ae-ckpt", default=None, metavar="PATH",
                            help="the frozen autoencoder: a train_ae.py checkpoint (RUN/checkpoints/last.pt), or "
                            "'auto' for the newest autoencoder run in --results-dir " + key_default("ae_ckpt"))
        parser.add_argument("--model", default=None, metavar="NAME",
                            help=f"the denoiser, a DiT registry name such as {stage.capitalize()}DiT-L/2 "
                            + key_default("model"))
        parser.add_argument("--text-encoder", default=None, metavar="PATH",
                            help="condition on captions instead of classes: a CLIP text encoder folder or hub id "
                            + key_default("text_encoder"))
        parser.add_argument("--motion-model-config", default=None, metavar="NAME",
                            help="the NVlabs/CMD spelling of --model: the motion stage reads it as its MotionDiT "
                            "name, the content stage as the ContentDiT size (MotionDiT-L/2 -> ContentDiT-L/2), as "
                            "the original scripts do (default: --model)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=2e-4 train.max_steps=100 (see below)")
    return parser


def config_from_args(stage: str, args: argparse.Namespace):
    """Merges --config, the flags and the key=value overrides (overrides win)."""
    flag_overrides = []
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            flag_overrides.append(f"{key}={value}")
    motion_name = getattr(args, "motion_model_config", None)
    if motion_name is not None:
        if stage == "content":
            # NVlabs/CMD's commands pass the motion DiT name to the content script, which reads it as the DiT size.
            motion_name = motion_name.replace("MotionDiT", "ContentDiT")
        flag_overrides.append(f"model.name={motion_name}")
    config_file = args.config or str(DEFAULT_CONFIG_DIR / f"{stage}.yaml")
    return load_config(stage, config_file, flag_overrides + list(args.overrides))


def parse_config(stage: str, description: str, argv: Optional[list] = None):
    """Entry scripts' argument parsing: a config, or one line on stderr and exit code 2."""

    parser = build_arg_parser(stage, description)
    args = parser.parse_intermixed_args(argv)  # overrides may sit between flags
    if not args.print_config:  # printing the config needs no ranks
        relaunch_with_torchrun_if_asked(args, argv)
    try:
        cfg = config_from_args(stage, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def config_from_dict(stage: str, data: dict[str, Any]):
    """Rebuilds a stage config from the dict stored in a checkpoint (validated against today's schema). An
    autoencoder checkpoint without model.output_squash squashed its output (tanh) in either mode."""
    cfg = _schema(stage)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    if stage == "autoencoder" and cfg.model.output_squash is None:
        cfg.model.output_squash = True
    return cfg
