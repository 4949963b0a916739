"""The training loop both diffusion stages share; each script supplies only its stage name and its previews."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from diffusion import create_diffusion
from models.content_unet import PRETRAINED_UNET, build_denoiser, load_pretrained_unet, unet_config_json
from training.checkpoint import weights_fingerprint
from training.data import fixed_batch
from training.generation import Denoiser, Sampler, make_sampler
from training.latents import (
    LatentEncoder,
    LatentScaler,
    build_latent_cache,
    encode,
    load_autoencoder,
    measure_latent_stats,
    resolve_ae_ckpt,
)
from training.run import TrainingRun, make_ema, make_optimizer


def stage_inputs(stage: str, z_c: torch.Tensor, z_m: torch.Tensor, y: torch.Tensor, scaler: LatentScaler):
    """(x0, model_kwargs) in the denoisers' standardised space: the motion stage diffuses z_m given (y, z_c),
    the content stage diffuses z_c given y. z_c (B, C, H, W) and z_m (B, D, T, H'+W') come in the AE's units."""
    z_c = scaler.normalize("content", z_c)
    if stage == "motion":
        return scaler.normalize("motion", z_m), {"y": y, "content": z_c}
    return z_c, {"y": y}


class DiffusionTrainStep:
    """One optimizer step of a diffusion stage on a batch of clips {'x', 'y'} or cached latents {'z_c', 'z_m', 'y'}.

    The training loop below and benchmarks/throughput.py both call this, so what is measured is what trains.
    `train_model` is the model as the step runs it (`run.wrap(model)`: DDP when distributed, compiled when asked),
    wrapped by the caller, as train_ae.py wraps its own; `scaler` (the run's latent statistics) defaults to identity
    ones, which cost the same.
    """

    def __init__(self, run: TrainingRun, stage: str, train_model, ema, optimizer, ae,
                 scaler: Optional[LatentScaler] = None):
        cfg = run.cfg
        self.run, self.stage, self.ema, self.optimizer, self.ae = run, stage, ema, optimizer, ae
        self.scaler = (scaler or LatentScaler.identity(ae)).to(run.device)
        self.train_model = train_model
        self.diffusion = create_diffusion(None, cfg.diffusion.noise_schedule, cfg.model.learn_sigma,
                                          cfg.diffusion.diffusion_steps, cfg.diffusion.loss_type)

    def __call__(self, batch: dict) -> dict:
        run = self.run
        if "z_c" in batch:
            z_c, z_m = run.to_device(batch["z_c"]), run.to_device(batch["z_m"])
        else:
            z_c, z_m = encode(self.ae, run.to_device(batch["x"]), run.autocast())
        x0, model_kwargs = stage_inputs(self.stage, z_c, z_m, run.to_device(batch["y"]), self.scaler)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=run.device)
        with run.autocast():
            losses = self.diffusion.training_losses(self.train_model, x0, t, model_kwargs)
        loss = losses["loss"].mean()
        loss.backward()
        grad_norm = run.optimizer_step(self.train_model, self.optimizer, self.ema)
        return {"loss": loss, "grad_norm": grad_norm, **{k: v.mean() for k, v in losses.items() if k != "loss"}}


@dataclass
class PreviewContext:
    run: TrainingRun
    ema: torch.nn.Module
    ae: torch.nn.Module
    sampling: object
    sampler: str
    eval_latents: dict  # z_c, z_m (the autoencoder's units), y of the fixed held-out clips
    scaler: LatentScaler  # the run's latent statistics

    @property
    def denoiser(self) -> Denoiser:
        """The EMA model as training.generation samples it, with the run's sampler and guidance scale."""
        return Denoiser(self.ema, self.run.cfg, self.scaler, Sampler(self.sampling, self.sampler),
                        float(self.run.cfg.diffusion.cfg_scale))


def train_diffusion_stage(cfg, stage: str, preview: Callable) -> None:
    """Trains the `stage` denoiser; `preview(PreviewContext)` writes samples every train.sample_every steps (rank 0)."""
    run = TrainingRun(cfg, stage=stage)
    run.record("ae_ckpt", str(resolve_ae_ckpt(cfg.ae_ckpt, cfg.train.results_dir)))
    ae, _ = load_autoencoder(cfg.ae_ckpt, run.device, cfg.data, cfg.mode, cfg.vae)
    run.record("ae_fingerprint", weights_fingerprint(ae.state_dict()))  # checked on resume and by sample.py
    dataset = run.build_dataset(cfg.data.split)
    eval_set = run.build_dataset(cfg.data.eval_split)
    run.record("data.num_classes", dataset.num_classes)

    unet = None
    if stage == "content" and cfg.model.name == PRETRAINED_UNET:  # fine-tuned from a pretrained image model
        unet = load_pretrained_unet(cfg.model.pretrained)
        run.record("model.unet_config", unet_config_json(unet))  # its checkpoints rebuild it without the folder
    model = build_denoiser(stage, cfg.model, dataset.num_classes, ae.content_shape, ae.motion_shape, unet)
    model = model.to(run.device)
    ema = make_ema(model)
    opt = make_optimizer(model.parameters(), cfg.optim, run.device)
    modules, optimizers = {"model": model, "ema": ema}, {"opt": opt}
    resumed = run.restore(modules, optimizers)
    scaler = restored_latent_stats(run, resumed, ae) if resumed is not None else None
    del resumed  # the checkpoint's weights are not kept for the whole run
    run.logger.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
                    f"autoencoder {cfg.ae_ckpt}")
    sampling, sampler = make_sampler(cfg.diffusion, cfg.model.learn_sigma)

    eval_clips = fixed_batch(eval_set, cfg.train.num_eval_videos)
    z_c, z_m = encode(ae, run.to_device(eval_clips["x"]), run.autocast())
    eval_latents = {"z_c": z_c, "z_m": z_m, "y": run.to_device(eval_clips["y"])}

    if cfg.diffusion.latent_cache:
        source = build_latent_cache(run, LatentEncoder.autoencoder(ae, cfg.ae_ckpt), dataset,
                                    cfg.diffusion.latent_cache_clips_per_video, run.batch_size)
    else:
        source = dataset
    if scaler is None:
        scaler = measure_latent_stats(run, ae, source)
    extra = {"latent_stats": scaler.state_dict()}
    train_step = DiffusionTrainStep(run, stage, run.wrap(model), ema, opt, ae, scaler)
    batches = run.loader(source)
    while not run.should_stop():
        run.log(train_step(next(batches)))
        if run.due(cfg.train.sample_every):
            if run.dist.is_main:  # the other ranks wait for it at the next collective (log or save)
                preview(PreviewContext(run, ema, ae, sampling, sampler, eval_latents, train_step.scaler))
        run.maybe_save(modules, optimizers, extra)
    run.finish()


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
