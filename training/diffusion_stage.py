"""What the two diffusion stages' scripts share: `setup` builds a stage's run, frozen autoencoder, data, denoiser,
EMA, optimizer and latent statistics into a DiffusionStage; each script writes its own training loop with it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from diffusion import create_diffusion
from models.content_unet import (
    PRETRAINED_UNET,
    build_denoiser,
    load_pretrained_unet,
    pretrained_prediction_type,
    unet_config_json,
)
from models.text_encoder import TextEncoder, load_text_encoder
from core.checkpoint import CheckpointError, load_checkpoint, weights_fingerprint
from core.data import fixed_batch
from sampling.generation import Denoiser, Sampler, make_sampler
from core.frozen_autoencoder import encode, load_autoencoder, resolve_ae_ckpt
from core.latent_cache import LatentEncoder
from core.latent_stats import LatentScaler
from core.text_cache import dataset_captions
from training.optim import make_ema, make_optimizer
from training.run import TrainingRun
from training.run_latents import run_caption_table, run_latent_cache, run_latent_stats


@dataclass
class DiffusionStage:
    """What a diffusion stage's training step works with. `setup` builds it for the scripts; benchmarks/throughput.py
    builds one without data (no `source`, `eval_latents` or previews' `sampler`) and with identity latent statistics,
    which cost the same.
    """
    run: TrainingRun
    ae: torch.nn.Module  # the frozen autoencoder
    model: torch.nn.Module  # the denoiser, as checkpoints hold it
    train_model: torch.nn.Module  # run.wrap(model): DDP when distributed, compiled when asked
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: LatentScaler  # the run's latent statistics, on the run's device
    source: object = None  # the training clips {'x', 'y'}, or their latent cache {'z_c', 'z_m', 'y'}
    eval_latents: Optional[dict] = None  # z_c, z_m (the autoencoder's units), y of the fixed held-out clips
    sampler: Optional[Sampler] = None  # the previews' sampler (diffusion.sampler, diffusion.sample_steps)
    text: Optional[Callable] = None  # captions -> (B, L, D) text tokens on the device, when conditioned on text
    diffusion: object = field(init=False)  # the training diffusion: every timestep of the stage's schedule

    def __post_init__(self):
        self.diffusion = training_diffusion(self.run.cfg)

    def latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_c (B, C, H, W), z_m (B, D, T, H'+W'), y) on the device, the latents in the autoencoder's units: a
        batch of the latent cache as it is, a batch of clips encoded by the frozen autoencoder. y is the condition:
        the labels (B,), or the captions' text tokens (B, L, D)."""
        run = self.run
        if "z_c" in batch:
            z_c, z_m = run.to_device(batch["z_c"]), run.to_device(batch["z_m"])
        else:
            z_c, z_m = encode(self.ae, run.to_device(batch["x"]), run.autocast())
        return z_c, z_m, self.condition(batch)

    def condition(self, batch: dict) -> torch.Tensor:
        """What the denoiser is conditioned on, on the device: the batch's labels, or its captions' text tokens."""
        return self.run.to_device(batch["y"]) if self.text is None else self.text(batch["caption"])

    def losses(self, x0: torch.Tensor, cond: dict) -> dict:
        """The diffusion loss of the denoiser on x0 given `cond` (its keyword arguments), each clip at a timestep
        drawn uniformly, under the run's autocast: {'loss', and its terms}, each averaged over the batch."""
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.run.device)
        with self.run.autocast():
            losses = self.diffusion.training_losses(self.train_model, x0, t, cond)
        return {key: value.mean() for key, value in losses.items()}

    def denoiser(self) -> Denoiser:
        """The EMA model as sampling.generation samples it, with the previews' sampler and the guidance scale."""
        return Denoiser(self.ema, self.run.cfg, self.scaler, self.sampler, float(self.run.cfg.diffusion.cfg_scale))

    def save(self) -> None:
        """A checkpoint of the model, its EMA, the optimizer and the latent statistics (TrainingRun.save)."""
        self.run.save({"model": self.model, "ema": self.ema}, {"opt": self.opt},
                      {"latent_stats": self.scaler.state_dict()})


def training_diffusion(cfg):
    """The diffusion a stage's config trains with: every timestep of its schedule, its loss, prediction type and
    loss weighting (a config from before diffusion.prediction_type trained eps)."""
    diffusion = cfg.diffusion
    return create_diffusion(None, diffusion.noise_schedule, cfg.model.learn_sigma, diffusion.diffusion_steps,
                            diffusion.loss_type, diffusion.prediction_type or "eps", diffusion.snr_gamma)


def uses_pretrained_unet(cfg, stage: str) -> bool:
    return stage == "content" and cfg.model.name == PRETRAINED_UNET


def fresh_prediction_type(cfg, stage: str) -> str:
    """What a new run's denoiser predicts: a pretrained UNet's own type (its scheduler config; refused in one line
    when none is found and diffusion.prediction_type is unset), else diffusion.prediction_type, by default eps."""
    if uses_pretrained_unet(cfg, stage) and cfg.model.pretrained:
        return pretrained_prediction_type(cfg.model.pretrained, cfg.diffusion.prediction_type)
    return cfg.diffusion.prediction_type or "eps"


def resumed_setting(run: TrainingRun, ckpt: dict, key: str, default):
    """The value of the diffusion setting `key` the resumed run trained with (`default` for a checkpoint from before
    the key); the command asking for another is refused in one line."""
    value = (ckpt["config"].get("diffusion") or {}).get(key)
    value = default if value is None else value
    asked = run.cfg.diffusion[key]
    if asked is not None and asked != value:
        raise CheckpointError(f"diffusion.{key} is {asked} but {run.resume_path} was trained with {value}")
    return value


def setup(cfg, stage: str) -> DiffusionStage:
    """The `stage` ('motion' or 'content') run: its folder, the frozen autoencoder, the training clips (or their
    latent cache, diffusion.latent_cache) and the held-out clips' latents, the denoiser with its EMA and optimizer
    (restored when resuming), and the latent statistics (restored, measured on the training data, or identity with
    diffusion.standardize_latents false). The config the run writes, once, holds what setup finds: the resolved
    autoencoder and its fingerprints, the class count, the text encoder's, the prediction type and the
    standardisation it trains with."""
    # Read before a run folder is claimed: a pretrained UNet of unknown prediction type costs nothing.
    prediction = None if cfg.train.resume else fresh_prediction_type(cfg, stage)
    run = TrainingRun(cfg, stage=stage)
    cfg.ae_ckpt = str(resolve_ae_ckpt(cfg.ae_ckpt, cfg.train.results_dir))
    ae, ae_cfg = load_autoencoder(cfg.ae_ckpt, run.device, cfg.data, cfg.mode, cfg.vae)  # refuses another VAE
    cfg.ae_fingerprint = weights_fingerprint(ae.state_dict())  # checked on resume and by sample.py
    if ae_cfg.vae_fingerprint:
        cfg.vae_fingerprint = ae_cfg.vae_fingerprint
    dataset = run.build_dataset(cfg.data.split)
    eval_set = run.build_dataset(cfg.data.eval_split)
    cfg.data.num_classes = dataset.num_classes

    unet = None
    if stage == "content" and cfg.model.name == PRETRAINED_UNET:  # fine-tuned from a pretrained image model
        unet = load_pretrained_unet(cfg.model.pretrained)
        cfg.model.unet_config = unet_config_json(unet)  # its checkpoints rebuild it without the folder
    encoder, text, captions = setup_text(run, dataset) if cfg.text.encoder else (None, None, None)
    model = build_denoiser(stage, cfg.model, dataset.num_classes, ae.content_shape, ae.motion_shape, unet,
                           None if encoder is None else encoder.shape)
    model = model.to(run.device)
    if encoder is not None:  # guidance's null condition: the empty prompt (a resumed run restores its own below)
        model.y_embedder.null_tokens.copy_(encoder([""])[0])
    ema = make_ema(model)
    opt = make_optimizer(model.parameters(), cfg.optim, run.device)
    resumed = run.restore({"model": model, "ema": ema}, {"opt": opt})
    if resumed is not None:  # what the run trained with, whatever the command's defaults would choose today
        prediction = resumed_setting(run, resumed, "prediction_type", "eps")
        standardize = resumed_setting(run, resumed, "standardize_latents", "latent_stats" in resumed)
    else:
        prediction = prediction or fresh_prediction_type(cfg, stage)
        # A pretrained SD UNet learned raw scaled VAE latents; per-channel standardisation would move its input.
        standardize = cfg.diffusion.standardize_latents
        standardize = not uses_pretrained_unet(cfg, stage) if standardize is None else bool(standardize)
    cfg.diffusion.prediction_type, cfg.diffusion.standardize_latents = prediction, standardize
    run.write_config()  # the run's settings are decided: nothing changes them from here on
    scaler = restored_latent_stats(run, resumed, ae) if resumed is not None else None
    del resumed  # the checkpoint's weights are not kept for the whole run
    run.logger.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                    f"predicts {prediction}; autoencoder {cfg.ae_ckpt}")
    sampler = make_sampler(cfg.diffusion, cfg.model.learn_sigma)

    eval_clips = fixed_batch(eval_set, cfg.train.num_eval_videos)
    z_c, z_m = encode(ae, run.to_device(eval_clips["x"]), run.autocast())
    eval_latents = {"z_c": z_c, "z_m": z_m,
                    "y": run.to_device(eval_clips["y"]) if text is None else text(eval_clips["caption"])}
    source = dataset
    if cfg.diffusion.latent_cache:
        source = run_latent_cache(run, LatentEncoder.autoencoder(ae, cfg.ae_ckpt), dataset,
                                  cfg.diffusion.latent_cache_clips_per_video, run.batch_size, captions=captions)
    if scaler is None and not standardize:
        scaler = LatentScaler.identity(ae)
        run.logger.info("latent stats: none (diffusion.standardize_latents false): the denoiser learns the latents "
                        "as the autoencoder emits them")
    if scaler is None:
        scaler = run_latent_stats(run, ae, source)
    return DiffusionStage(run, ae, model, run.wrap(model), ema, opt, scaler.to(run.device), source, eval_latents,
                          sampler, text)


def setup_text(run: TrainingRun, dataset) -> tuple[TextEncoder, Callable, list]:
    """A caption-conditioned run's text encoder, loaded and set in the config (its token shape and weights'
    fingerprint, checked on resume and by sample.py); what turns captions into its tokens (the CaptionTable of the
    training captions, each encoded once, or with text.cache false the encoder itself); the training captions, one
    per video."""
    cfg = run.cfg
    encoder = load_text_encoder(cfg.text.encoder, run.device)
    fingerprint = weights_fingerprint(encoder.model.state_dict())
    recorded = cfg.text.fingerprint
    if run.resume_path is not None:  # the encoder the resumed run learned with, whatever the command says
        recorded = (load_checkpoint(run.resume_path, mmap=True)["config"].get("text") or {}).get("fingerprint")
    if recorded and recorded != fingerprint:
        raise CheckpointError(f"text.encoder {cfg.text.encoder}: its weights ({fingerprint}) are not those "
                              f"{run.resume_path or 'this run'} was trained with ({recorded})")
    cfg.text.tokens, cfg.text.dim, cfg.text.fingerprint = encoder.length, encoder.dim, fingerprint
    captions = dataset_captions(dataset, f"dataset '{cfg.data.dataset_name}'")
    text = run_caption_table(run, encoder, captions) if cfg.text.cache else encoder
    encoded = f"{len(text)} distinct captions encoded" if cfg.text.cache else "captions encoded as batches come"
    run.logger.info(f"text encoder {cfg.text.encoder}: {encoder.length} tokens of {encoder.dim}; {encoded} "
                    f"({len(captions)} videos)")
    return encoder, text, captions


def restored_latent_stats(run: TrainingRun, ckpt: dict, ae) -> LatentScaler:
    """The statistics the resumed run trained with, never measured again: the data they would be measured on
    may have changed, and the denoiser learned in the space of the old ones."""
    scaler = LatentScaler.from_checkpoint(ckpt, run.resume_path, ae)
    if "latent_stats" in ckpt:
        run.logger.info(f"latent stats restored from {run.resume_path}: {scaler.describe()}")
    else:
        run.logger.warning(f"latent stats: {run.resume_path} has none (a run from before latents were standardised); "
                           f"it goes on with identity stats (mean 0, std 1), the raw latents it trained on")
    return scaler
