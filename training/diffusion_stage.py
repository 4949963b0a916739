"""The parts of a diffusion stage that train_motion_diffusion.py and train_content_diffusion.py build in sight: the
frozen autoencoder, the text condition, the settings a run decides (prediction type, standardisation), the latent
statistics, the held-out latents of the previews, and the diffusion loss of one batch."""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional

import torch

from diffusion import create_diffusion
from models.content_unet import PRETRAINED_UNET, pretrained_prediction_type
from models.text_encoder import TextEncoder, load_text_encoder
from core.checkpoint import CheckpointError, load_checkpoint, weights_fingerprint
from core.data import fixed_batch
from core.frozen_autoencoder import encode, load_autoencoder, resolve_ae_ckpt
from core.latent_stats import LatentScaler
from core.text_cache import dataset_captions
from training.checkpointing import unwrap
from training.run import TrainingRun
from training.run_latents import run_caption_table, run_latent_stats


def load_frozen_autoencoder(cfg, device: torch.device) -> torch.nn.Module:
    """The autoencoder ae_ckpt names ('auto': the newest of results_dir), frozen on `device`. Records in the config
    the path it resolved to and its weights' fingerprints, which a resume and sample.py check."""
    cfg.ae_ckpt = str(resolve_ae_ckpt(cfg.ae_ckpt, cfg.train.results_dir))
    ae, ae_cfg = load_autoencoder(cfg.ae_ckpt, device, cfg.data, cfg.mode, cfg.vae)  # refuses another VAE
    cfg.ae_fingerprint = weights_fingerprint(ae.state_dict())
    if ae_cfg.vae_fingerprint:
        cfg.vae_fingerprint = ae_cfg.vae_fingerprint
    return ae


class TextCondition(NamedTuple):
    encoder: TextEncoder
    tokens: Callable  # captions -> (B, L, D) text tokens on the device: the caption table, or the encoder itself
    captions: list  # the training captions, one per video


def setup_text(run: TrainingRun, cfg, dataset) -> TextCondition:
    """A caption-conditioned run's text encoder, loaded and recorded in the config (its token shape and weights'
    fingerprint, checked on resume and by sample.py), with what turns captions into its tokens: the CaptionTable
    of the training captions, each encoded once, or with text.cache false the encoder itself."""
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
    tokens = run_caption_table(run, encoder, captions, fingerprint, cfg.diffusion.latent_cache) if cfg.text.cache \
        else encoder
    encoded = f"{len(tokens)} distinct captions encoded" if cfg.text.cache else "captions encoded as batches come"
    run.logger.info(f"text encoder {cfg.text.encoder}: {encoder.length} tokens of {encoder.dim}; {encoded} "
                    f"({len(captions)} videos)")
    return TextCondition(encoder, tokens, captions)


def uses_pretrained_unet(cfg, stage: str) -> bool:
    return stage == "content" and cfg.model.name == PRETRAINED_UNET


def fresh_prediction_type(cfg, stage: str) -> str:
    """What a new run's denoiser predicts: a pretrained UNet's own type (its scheduler config; refused in one line
    when none is found and diffusion.prediction_type is unset), else diffusion.prediction_type, by default eps."""
    if uses_pretrained_unet(cfg, stage) and cfg.model.pretrained:
        return pretrained_prediction_type(cfg.model.pretrained, cfg.diffusion.prediction_type)
    return cfg.diffusion.prediction_type or "eps"


def decide_diffusion_settings(cfg, stage: str, resumed: Optional[dict], resume_path) -> None:
    """Sets diffusion.prediction_type and diffusion.standardize_latents to what the run trains with: a resumed run's
    own, whatever today's defaults would choose (a command asking for another is refused in one line); for a new
    run the config's, where a pretrained SD UNet predicts its own type on raw latents (standardising them would
    move its input)."""
    if resumed is not None:
        prediction = _resumed_setting(cfg, resumed, resume_path, "prediction_type", "eps")
        standardize = _resumed_setting(cfg, resumed, resume_path, "standardize_latents", "latent_stats" in resumed)
    else:
        prediction = fresh_prediction_type(cfg, stage)
        standardize = cfg.diffusion.standardize_latents
        standardize = not uses_pretrained_unet(cfg, stage) if standardize is None else bool(standardize)
    cfg.diffusion.prediction_type, cfg.diffusion.standardize_latents = prediction, standardize


def _resumed_setting(cfg, ckpt: dict, resume_path, key: str, default):
    """The diffusion setting `key` of the resumed run (`default` for a checkpoint from before the key)."""
    value = (ckpt["config"].get("diffusion") or {}).get(key)
    value = default if value is None else value
    asked = cfg.diffusion[key]
    if asked is not None and asked != value:
        raise CheckpointError(f"diffusion.{key} is {asked} but {resume_path} was trained with {value}")
    return value


def training_diffusion(cfg):
    """The diffusion a stage's config trains with: every timestep of its schedule, its loss, prediction type and
    loss weighting (a config from before diffusion.prediction_type trained eps)."""
    diffusion = cfg.diffusion
    return create_diffusion(None, diffusion.noise_schedule, cfg.model.learn_sigma, diffusion.diffusion_steps,
                            diffusion.loss_type, diffusion.prediction_type or "eps", diffusion.snr_gamma)


def latent_stats(run: TrainingRun, ae, source, resumed: Optional[dict], standardize: bool) -> LatentScaler:
    """The latent statistics the denoiser learns in, on the device: a resumed run's own, never measured again (the
    data may have changed, and the denoiser learned in the space of the old ones); identity without
    standardisation; else measured over the training clips or their latent cache `source`."""
    if resumed is not None:
        scaler = LatentScaler.from_checkpoint(resumed, run.resume_path, ae)
        if "latent_stats" in resumed:
            run.logger.info(f"latent stats restored from {run.resume_path}: {scaler.describe()}")
        else:
            run.logger.warning(f"latent stats: {run.resume_path} has none (a run from before latents were "
                               f"standardised); it goes on with identity stats (mean 0, std 1), the raw latents it "
                               f"trained on")
    elif not standardize:
        scaler = LatentScaler.identity(ae)
        run.logger.info("latent stats: none (diffusion.standardize_latents false): the denoiser learns the latents "
                        "as the autoencoder emits them")
    else:
        scaler = run_latent_stats(run, ae, source)
    return scaler.to(run.device)


def batch_latents(run: TrainingRun, ae, batch: dict, text: Optional[TextCondition]) -> tuple:
    """(z_c (B, C, H, W), z_m (B, D, T, H'+W'), y) on the device, the latents in the autoencoder's units: a batch of
    the latent cache as it is, a batch of clips encoded by the frozen autoencoder. y is the condition: the labels
    (B,), or the captions' text tokens (B, L, D)."""
    if "z_c" in batch:
        z_c, z_m = run.to_device(batch["z_c"]), run.to_device(batch["z_m"])
    else:
        z_c, z_m = encode(ae, run.to_device(batch["x"]), run.autocast())
    y = run.to_device(batch["y"]) if text is None else text.tokens(batch["caption"])
    return z_c, z_m, y


def held_out_latents(run: TrainingRun, ae, eval_set, count: int, text: Optional[TextCondition]) -> dict:
    """z_c, z_m (the autoencoder's units) and y of the first `count` held-out clips, for the previews."""
    z_c, z_m, y = batch_latents(run, ae, fixed_batch(eval_set, count), text)
    return {"z_c": z_c, "z_m": z_m, "y": y}


def diffusion_losses(diffusion, model: torch.nn.Module, x0: torch.Tensor, cond: dict,
                     autocast=contextlib.nullcontext(), self_condition: bool = False) -> dict:
    """The diffusion loss of `model` on x0 given `cond` (its keyword arguments), each clip at a timestep drawn
    uniformly, under `autocast` (the run's): {'loss', and its terms}, each averaged over the batch.
    self_condition: the model reads its own x0 estimate (config key model.self_condition)."""
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
    with autocast:
        losses = diffusion.training_losses(model, x0, t, cond, estimator=unwrap(model) if self_condition else None)
    return {key: value.mean() for key, value in losses.items()}
