"""Class (or caption) -> content frame -> motion latent -> video: the one path sample.py, the training previews and
the sampling benchmark generate with.

    models = load_models(ae_ckpt, motion_ckpt, content_ckpt, device)
    videos, content_frames = generate(models, labels, seed=0, indices=range(len(labels)))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from datasets import build_dataset
from diffusion import create_diffusion
from diffusion.guidance import guided_model
from models.content_unet import build_denoiser
from models.text_encoder import TextEncoder, TextEncoderLoadError, load_text_encoder
from core.checkpoint import (CheckpointError, build_fitting, load_for_sampling, load_weights, model_weights,
                             weights_fingerprint)
from core.cli import GUIDANCE_MAX
from core.config import config_from_dict
from core.frozen_autoencoder import load_autoencoder
from core.latent_stats import LatentScaler


class Sampler(NamedTuple):
    """A respaced diffusion and the method (one of diffusion.SAMPLERS) its sampling loop runs."""
    diffusion: object
    method: str


def make_sampler(diffusion_cfg, learn_sigma: bool, steps: Optional[int] = None,
                 sampler: Optional[str] = None) -> Sampler:
    """A respaced diffusion for sampling with the stage's schedule and prediction type: DDIM's uniform stride for
    ddim, time points evenly spaced in log-SNR for dpm++2m, evenly spaced timesteps for ddpm."""
    sampler = sampler or diffusion_cfg.sampler
    steps = steps or diffusion_cfg.sample_steps
    respacing = {"ddim": f"ddim{steps}", "dpm++2m": f"logsnr{steps}"}.get(sampler, str(steps))
    # A run from before diffusion.prediction_type trained eps.
    prediction_type = diffusion_cfg.get("prediction_type") or "eps"
    return Sampler(create_diffusion(respacing, noise_schedule=diffusion_cfg.noise_schedule, learn_sigma=learn_sigma,
                                    diffusion_steps=diffusion_cfg.diffusion_steps, loss_type=diffusion_cfg.loss_type,
                                    prediction_type=prediction_type), sampler)


@dataclass(frozen=True)
class SamplingOptions:
    """A stage's sampling settings chosen at sampling time; None keeps those of the stage's config."""
    steps: Optional[int] = None
    sampler: Optional[str] = None
    guidance_scale: Optional[float] = None


@dataclass(frozen=True)
class SamplingPreset:
    """A named sampling protocol of sample.py's --preset: each stage's sampler, steps and guidance, the precision
    and how the videos' labels are drawn. None leaves a setting to its flag's default (the checkpoint's guidance,
    --precision auto, every class round-robin); a flag given on the command line overrides the preset."""
    content: SamplingOptions
    motion: SamplingOptions
    precision: Optional[str] = None  # one of PRECISIONS
    labels: Optional[str] = None  # "dataset": drawn by the class frequencies of the motion run's training split
    about: str = ""

    def __getitem__(self, stage: str) -> SamplingOptions:
        return {"content": self.content, "motion": self.motion}[stage]


# Guidance is DiT's convention, eps(null) + s (eps(c) - eps(null)). The paper writes (1 + w) eps(c) - w eps(null) with
# w = 4 for the content model, i.e. s = 5; NVlabs/CMD's evaluation calls the DiT-style forward with 4.0.
PAPER_CONTENT_SCALE, REFERENCE_CONTENT_SCALE = 5.0, 4.0
SAMPLING_PRESETS = {
    # The smallest step counts whose quality stayed within the spread over seeds of DDIM 50/100 on the built-in
    # data (benchmarks/sampler_quality.py, docs/BENCHMARKS.md); not validated on UCF-101.
    "fast": SamplingPreset(SamplingOptions(steps=15, sampler="dpm++2m"), SamplingOptions(steps=15, sampler="dpm++2m"),
                           about="DPM-Solver++(2M) 15/15 steps, guidance of the checkpoints, --precision auto"),
    "ddim": SamplingPreset(SamplingOptions(steps=50, sampler="ddim"), SamplingOptions(steps=100, sampler="ddim"),
                           about="DDIM 50 content / 100 motion steps, guidance of the checkpoints, --precision auto"),
    # The protocol the paper states for its numbers: DDIM (eta 0) 50 content / 100 motion steps, the content model
    # guided with w = 4, the motion model unguided, fp32, labels by class frequency.
    "paper": SamplingPreset(SamplingOptions(steps=50, sampler="ddim", guidance_scale=PAPER_CONTENT_SCALE),
                            SamplingOptions(steps=100, sampler="ddim", guidance_scale=1.0), precision="fp32",
                            labels="dataset",
                            about="the paper's protocol: DDIM (eta 0) 50 content / 100 motion steps, content guidance "
                                  "w = 4 (s = 5), motion unguided, fp32, labels by class frequency"),
    # What NVlabs/CMD's evaluation code runs: ancestral DDPM on the process respaced to 50 steps for both stages,
    # content guidance 4.0 in DiT's convention, motion unguided, fp32, labels of training batches.
    "reference": SamplingPreset(SamplingOptions(steps=50, sampler="ddpm", guidance_scale=REFERENCE_CONTENT_SCALE),
                                SamplingOptions(steps=50, sampler="ddpm", guidance_scale=1.0), precision="fp32",
                                labels="dataset",
                                about="NVlabs/CMD's evaluation: ancestral DDPM 50/50 respaced steps, content "
                                      "guidance s = 4, motion unguided, fp32, labels by class frequency"),
}


@dataclass
class Denoiser:
    """A stage's denoiser with what sampling it takes: its run's config and latent statistics, its sampler and its
    guidance scale."""
    model: torch.nn.Module
    cfg: object
    scaler: LatentScaler
    sampler: Sampler
    guidance_scale: float

    @classmethod
    def from_config(cls, model, cfg, scaler: LatentScaler, options: SamplingOptions = SamplingOptions()) -> "Denoiser":
        sampler = make_sampler(cfg.diffusion, cfg.model.learn_sigma, options.steps, options.sampler)
        guidance_scale = cfg.diffusion.cfg_scale if options.guidance_scale is None else options.guidance_scale
        if not 0.0 <= float(guidance_scale) <= GUIDANCE_MAX:  # NaN fails too; scales beyond overflow into NaN samples
            raise ValueError(f"the {cfg.stage} model's guidance scale {guidance_scale} is not in 0..{GUIDANCE_MAX:g}"
                             + (" (its checkpoint's diffusion.cfg_scale)" if options.guidance_scale is None else ""))
        return cls(model, cfg, scaler, sampler, float(guidance_scale))

    def with_options(self, options: SamplingOptions) -> "Denoiser":
        """The same model, config and statistics with other sampling settings (nothing is reloaded)."""
        return Denoiser.from_config(self.model, self.cfg, self.scaler, options)


@dataclass
class CMDModels:
    """The three models of CMD. `content` is None where the content frames are given (an image, real clips);
    `motion` is None in the content stage's training previews, which only sample content frames."""
    ae: torch.nn.Module
    motion: Optional[Denoiser]
    content: Optional[Denoiser] = None
    ae_cfg: object = None  # its run's config, where it was loaded from a checkpoint
    bf16: bool = False  # run the models under bf16 autocast (CUDA only; the diffusion arithmetic stays fp32)
    text: Optional[TextEncoder] = None  # the text encoder of caption-conditioned denoisers (None: classes)

    @property
    def num_classes(self) -> int:
        return (self.motion or self.content).model.num_classes

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L, D) text tokens of `prompts`, the condition of caption-conditioned denoisers."""
        if self.text is None:
            raise ValueError("these models are class-conditional: they take classes, not prompts")
        return self.text(list(prompts))

    def autocast(self, device):
        """bf16 autocast for the model calls when `bf16` is set and `device` is CUDA; else a no-op context."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16 and torch.device(device).type == "cuda")


PRECISIONS = ("auto", "bf16", "tf32", "fp32")


def set_precision(models: CMDModels, precision: str, device) -> tuple[bool, bool]:
    """Sets how the models run on a CUDA `device`: (bf16 autocast, TF32 matmuls), returned and applied.

    'auto' follows the motion run's config (train.mixed_precision, train.tf32), as it trained; 'bf16' is bf16
    autocast with TF32 for what stays fp32; 'tf32' fp32 with TF32 matmuls; 'fp32' strict fp32. On the CPU every
    choice runs fp32 (bf16 autocast on CPU is slower than fp32 for these models) and nothing global is changed.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "auto":
        train = models.motion.cfg.train
        bf16, tf32 = train.mixed_precision == "bf16", bool(train.tf32)
    else:
        bf16, tf32 = precision == "bf16", precision in ("bf16", "tf32")
    if torch.device(device).type != "cuda":
        return False, False
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    models.bf16 = bf16
    return bf16, tf32


def compile_models(models: CMDModels) -> None:
    """torch.compile the denoisers and the decoder in place; batch sizes vary (the last batch, the guided doubled
    batch), so shapes are compiled as dynamic once they change."""
    for denoiser in (models.motion, models.content):
        if denoiser is not None:
            denoiser.model = torch.compile(denoiser.model)
    models.ae.decode = torch.compile(models.ae.decode)


def load_models(ae_ckpt, motion_ckpt, content_ckpt=None, device="cpu", allow_ae_mismatch: bool = False,
                motion_options: SamplingOptions = SamplingOptions(),
                content_options: SamplingOptions = SamplingOptions(), vae: Optional[str] = None,
                text_encoder: Optional[str] = None) -> CMDModels:
    """The frozen autoencoder and the EMA denoisers of the given checkpoints (no content denoiser without
    `content_ckpt`), each denoiser with the latent statistics of its own run and its sampling settings, and the
    text encoder of caption-conditioned ones. `vae` and `text_encoder`: a latent-mode autoencoder's VAE, the
    denoisers' text encoder, when they are no longer where the runs recorded them."""
    ae, ae_cfg = load_autoencoder(ae_ckpt, device, vae=vae)
    motion = Denoiser.from_config(*load_denoiser(motion_ckpt, "motion", ae, device, allow_ae_mismatch), motion_options)
    models = CMDModels(ae, motion, ae_cfg=ae_cfg)
    if content_ckpt is not None:
        content = Denoiser.from_config(*load_denoiser(content_ckpt, "content", ae, device, allow_ae_mismatch),
                                       content_options)
        if content.model.num_classes != motion.model.num_classes:
            raise CheckpointError(f"{content_ckpt} knows {content.model.num_classes} classes but "
                                  f"{motion_ckpt} knows {motion.model.num_classes}")
        if content.cfg.text.fingerprint != motion.cfg.text.fingerprint:
            conditions = {d.cfg.text.fingerprint is None for d in (content, motion)}
            raise CheckpointError(
                f"{content_ckpt} and {motion_ckpt} were trained with different text encoders ("
                f"{content.cfg.text.encoder}, {motion.cfg.text.encoder})" if conditions == {False} else
                f"{content_ckpt} and {motion_ckpt}: one is conditioned on captions, the other on classes")
        models.content = content
    if motion.cfg.text.encoder:
        models.text = load_recorded_text_encoder(motion.cfg, motion_ckpt, device, text_encoder)
    return models


def load_recorded_text_encoder(cfg, ckpt_path, device, moved_to: Optional[str] = None) -> TextEncoder:
    """The text encoder a caption-conditioned run recorded (or `moved_to`, the same weights elsewhere), checked
    against the fingerprint of the weights it trained with."""
    source = moved_to or cfg.text.encoder
    try:
        encoder = load_text_encoder(source, device)
    except TextEncoderLoadError as exc:
        hint = "" if moved_to else " (if it moved, pass --text-encoder)"
        raise TextEncoderLoadError(f"{ckpt_path} was trained with this text encoder, which does not load: {exc}{hint}"
                                   ) from None
    found = weights_fingerprint(encoder.model.state_dict())
    if found != cfg.text.fingerprint or encoder.shape != (cfg.text.tokens, cfg.text.dim):
        raise CheckpointError(f"text encoder {source}: its weights ({found}) are not those {ckpt_path} was trained "
                              f"with ({cfg.text.fingerprint}, {cfg.text.encoder})")
    return encoder


def video_generators(seed: Optional[int], indices: Sequence[int], stream: int, device) -> Optional[list]:
    """One generator per video index and stage, so a video never depends on its batch or its rank; None (torch's
    global generator) without a seed."""
    if seed is None:
        return None
    # Modulo 2**64, the generator's seed range: any seed sample.py accepts (0..2**64-1) and any video index work.
    return [torch.Generator(device).manual_seed((seed * 1_000_003 + index * 2 + stream) % 2**64) for index in indices]


@torch.no_grad()
def generate_content_frames(models: CMDModels, labels: torch.Tensor, seed: Optional[int] = None,
                            indices: Optional[Sequence[int]] = None, progress: bool = False) -> torch.Tensor:
    """Content frames (B, C, H, W) in the autoencoder's units for the classes `labels` (B,); `seed` and `indices`
    as for generate."""
    content = models.content
    indices = range(len(labels)) if indices is None else indices
    with models.autocast(labels.device):
        return sample_latents(content.model, content.sampler.diffusion, content.sampler.method, "content",
                              tuple(models.ae.content_shape), labels, content.guidance_scale, content.scaler,
                              progress=progress, generator=video_generators(seed, indices, 0, labels.device),
                              bound=models.ae.content_bound)


@torch.no_grad()
def generate(models: CMDModels, labels: torch.Tensor, seed: Optional[int] = None,
             indices: Optional[Sequence[int]] = None, content: Optional[torch.Tensor] = None,
             progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos of the classes `labels` (B,), or of captions given as their text tokens (B, L, D)
    (models.encode_prompts): (videos (B, C, T, H, W) in [-1, 1], their content frames (B, C, H, W) in the
    autoencoder's units), both float32 on the labels' device.

    With `seed`, the noise of the video at `indices[i]` (default: 0..B-1) comes from generators seeded by the seed
    and that index alone, so a video is the same whatever batch or rank makes it; without, from torch's global RNG.
    `content` (B, C, H, W) in the autoencoder's units (a given image, encoded real clips) stands in for sampled
    content frames.
    """
    indices = range(len(labels)) if indices is None else indices
    with models.autocast(labels.device):
        if content is None:
            content = generate_content_frames(models, labels, seed, indices, progress)
        motion = models.motion
        z_m = sample_latents(motion.model, motion.sampler.diffusion, motion.sampler.method, "motion",
                             tuple(models.ae.motion_shape), labels, motion.guidance_scale, motion.scaler,
                             content=content, generator=video_generators(seed, indices, 1, labels.device),
                             progress=progress)
        return models.ae.decode(content, z_m).float(), content


@torch.no_grad()
def sample_latents(model, sampling, sampler: str, stage: str, shape, y: torch.Tensor, guidance_scale: float,
                   scaler: LatentScaler, content: Optional[torch.Tensor] = None, generator=None,
                   progress: bool = False, eta: float = 0.0, bound: Optional[float] = 1.0) -> torch.Tensor:
    """Samples the `stage` latent (B, *shape) in the autoencoder's units with classifier-free guidance (scale 1 = none).

    The denoiser lives in the standardised space of `scaler` (the statistics of its own training run): the motion
    stage's condition `content` (B, C, H, W), given in the autoencoder's units, is standardised for it, and the
    sample is denormalised on return. Predicted x0 is clipped at every step to the image of [-bound, bound] per
    channel: content frames of pixel mode (convex combinations of frames in [-1, 1]) and motion latents (tanh
    outputs) live in [-1, 1]; latent mode's content frames (of VAE latents) have no bound (None: no clipping).
    """
    cond = {"content": scaler.normalize("content", content)} if stage == "motion" else {}
    model_fn = model if guidance_scale == 1.0 else guided_model(model, guidance_scale, model.y_embedder.null_like(y))
    bounds = False if bound is None else scaler.bounds(stage, len(shape) + 1, y.device, bound)
    # A self-conditioned content DiT reads the guided x0 estimate of the step before (GaussianDiffusion.sample).
    z = sampling.sample(model_fn, (len(y), *shape), sampler=sampler, model_kwargs={"y": y, **cond},
                        self_condition=getattr(model, "self_condition", False),
                        device=y.device, progress=progress, eta=eta, generator=generator, clip_denoised=bounds)
    z = scaler.denormalize(stage, z)
    # Clipped x0 maps back into the bounds; the clamp only absorbs the rounding of the affine map.
    return z if bound is None else z.clamp(-bound, bound)


def dataset_labels(dataset) -> np.ndarray:
    """The label of every item of `dataset`, read without decoding a clip where the dataset allows it."""
    if hasattr(dataset, "label_of"):
        return np.array([dataset.label_of(index) for index in range(len(dataset))], dtype=np.int64)
    if hasattr(dataset, "entries"):  # datasets.video_folder: one entry per video, its label known from the listing
        return np.array([entry.label for entry in dataset.entries], dtype=np.int64)
    return np.array([int(dataset[index]["y"]) for index in range(len(dataset))], dtype=np.int64)


def real_content_frames(ae, data_cfg, seed: int, labels, device) -> torch.Tensor:
    """(N, C, H, W) content frames of held-out real clips, encoded by `ae`: video i gets the next clip of its class.

    The paper's motion-only evaluation (real content frames, generated motion): the held-out split of the motion
    run's data (data.eval_split), taken in index order so that the frames do not depend on batch or rank.
    """
    dataset = build_dataset(data_cfg, split=data_cfg.eval_split, seed=seed)
    available = dataset_labels(dataset)
    wanted = {label: labels.count(label) for label in set(labels)}
    by_class = {label: np.flatnonzero(available == label)[:count].tolist() for label, count in wanted.items()}
    short = [k for k in wanted if len(by_class[k]) < wanted[k]]
    if short:
        raise ValueError(f"--real-content: the {data_cfg.eval_split} split has only {len(by_class[short[0]])} clips of "
                         f"class {short[0]}, {wanted[short[0]]} are needed")
    taken = {label: iter(indices) for label, indices in by_class.items()}
    clips = torch.stack([dataset[next(taken[label])]["x"] for label in labels]).to(device)
    return torch.cat([ae.encode(chunk)[0] for chunk in clips.split(64)])


def load_denoiser(path, stage: str, ae, device, allow_ae_mismatch: bool = False):
    """(EMA denoiser in eval mode, its config, its LatentScaler) rebuilt from a diffusion checkpoint and the
    autoencoder's shapes; a checkpoint older than the latent statistics gets identity ones (mean 0, std 1).

    A denoiser learned the latent space of one autoencoder: one trained with other weights (the run records their
    fingerprint) is refused unless `allow_ae_mismatch`, since its samples would decode to something else.
    """
    ckpt = load_for_sampling(path, stage)  # mmap'ed, EMA weights only: no rank reads the optimizer state
    cfg = config_from_dict(stage, ckpt["config"])
    if cfg.data.num_classes is None:
        raise CheckpointError(f"{path} does not record data.num_classes; it was not written by a finished run")
    if cfg.ae_fingerprint and not allow_ae_mismatch:
        given = weights_fingerprint(ae.state_dict())
        if given != cfg.ae_fingerprint:
            raise CheckpointError(f"{path} was trained with the autoencoder {cfg.ae_ckpt} (weights "
                                  f"{cfg.ae_fingerprint}), but the given autoencoder's weights are {given}: pass the "
                                  f"one it was trained with (or --allow-ae-mismatch)")
    frames = getattr(ae, "frames", None)  # latent mode: the VAE, its fingerprint computed when it loaded
    vae = getattr(frames, "fingerprint", None)
    if cfg.vae_fingerprint and vae and vae != cfg.vae_fingerprint:
        raise CheckpointError(f"{path} was trained on the latents of the VAE with weights {cfg.vae_fingerprint}, but "
                              f"the given VAE has weights {vae}: pass the VAE it was trained with (--vae)")
    text_shape = (int(cfg.text.tokens), int(cfg.text.dim)) if cfg.text.encoder else None
    try:
        weights = model_weights(ckpt, prefer_ema=True)
        model = build_fitting(lambda: build_denoiser(stage, cfg.model, int(cfg.data.num_classes), ae.content_shape,
                                                     ae.motion_shape, text_shape=text_shape),
                              weights, path, f"{stage} denoiser weights",
                              f"model.name {cfg.model.name}, data.num_classes {cfg.data.num_classes}")
        load_weights(model, weights, path, f"{stage} denoiser weights")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (latent shapes from the autoencoder: content {tuple(ae.content_shape)}, "
                              f"motion {tuple(ae.motion_shape)}; was it trained on another autoencoder?)") from None
    scaler = LatentScaler.from_checkpoint(ckpt, path, ae).to(device)
    return model.to(device).eval().requires_grad_(False), cfg, scaler
