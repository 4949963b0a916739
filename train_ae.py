"""Trains the CMD autoencoder: clip -> (content frame, motion latent) -> clip.

    torchrun --nproc_per_node=8 train_ae.py --config configs/ucf101/autoencoder.yaml --data-path /data/UCF-101 \
        --exp-name ucf101-ae
    python train_ae.py --config configs/tiny/autoencoder.yaml            # one CPU process, synthetic data
"""
import torch

from datasets import build_dataset
from datasets.transforms import to_uint8_videos
from evals.fvd import load_detector
from evals.recon import motion_health, motion_warning, ssim
from evals.reconstruction_fvd import ReconstructionFVD
from models.ae_losses import build_ae_loss, content_detail_excess
from models.autoencoder import build_autoencoder
from models.vae import PixelFrames, pixel_interface
from core.config import ConfigError
from core.data import fixed_batch
from core.distributed import all_reduce_mean, main_rank_first
from core.cli import entry_point
from core.frozen_autoencoder import load_frames, vae_fingerprint
from core.latent_cache import LatentEncoder
from sampling.media import save_video_set
from training.optim import lr_factor, make_ema, make_optimizer, set_lr, update_ema
from training.run import TrainingRun
from training.run_latents import run_latent_cache


@torch.no_grad()
def evaluate(run, model, frames, loss_fn, eval_batch, recon_fvd=None):
    """PSNR/SSIM/LPIPS and motion-latent health on the fixed held-out clips, + reconstruction FVD over its own
    train.fvd_eval_videos clips when a detector is set.

    The clips are sharded over ranks; the motion swap happens within each rank's shard. In latent mode the
    measures compare VAE latent clips (what the autoencoder reconstructs; the dB are of latent units, peak 2,
    nothing clamped to [-1, 1]) and the videos written are decoded to pixels.
    """
    clamp = isinstance(frames, PixelFrames)
    rank, world = run.dist.rank, run.dist.world_size
    model.eval()
    with run.autocast():
        x = frames.encode(run.to_device(eval_batch["x"][rank::world])).float()
        x_hat, z_c, z_m = model(x)
        health = motion_health(model, x, encoded=(z_c, z_m), x_hat=x_hat, clamp=clamp)
    x_hat = x_hat.float()
    model.train()
    metrics = {key: value.mean() for key, value in health.items()}
    metrics["ssim"] = ssim(x, x_hat, clamp=clamp).mean()
    # The content frames' dither, what loss.content_detail_weight penalises: 0 when no more detailed than the frames.
    metrics["content_detail"] = content_detail_excess(x, z_c.float()).mean()
    if loss_fn.lpips is not None:
        # Every frame counts here: (B, C, T, H, W) -> (B*T, C, H, W).
        metrics["lpips"] = loss_fn.lpips(x_hat.transpose(1, 2).flatten(0, 1), x.transpose(1, 2).flatten(0, 1)).mean()
    keys = sorted(metrics)
    values = all_reduce_mean(torch.stack([metrics[k].float() for k in keys])).tolist()
    results = dict(zip(keys, values))
    on_pixels = pixel_interface(frames, model)  # the model on pixel clips (behind the VAE in latent mode)
    if recon_fvd is not None:
        model.eval()
        results["fvd_recon"] = recon_fvd(on_pixels, run.device, run.autocast)
        model.train()
    if run.dist.is_main:
        out = run.run_dir / "eval"
        with run.autocast():
            pairs = frames.decode(torch.stack([x, x_hat], dim=1).flatten(0, 1)).float()  # originals, reconstructions
            content = on_pixels.decode_content(z_c).float().unsqueeze(2)
        save_video_set(to_uint8_videos(pairs), out, "reconstruction", run.step, run.writer, nrow=2)
        save_video_set(to_uint8_videos(content), out, "content_frames", run.step, run.writer)
        for key, value in results.items():
            run.writer.add_scalar(f"eval/{key}", value, run.step)
        run.logger.info(f"eval step {run.step:07d} | " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))
        warning = motion_warning(results)
        if warning:
            run.logger.warning(f"eval step {run.step:07d} | WARNING {warning}")
    return results


def main(cfg):
    if cfg.train.fvd_detector and cfg.train.fvd_eval_videos < 2:  # before the run folder is claimed
        raise ConfigError(f"config key 'train.fvd_eval_videos' must be at least 2, got {cfg.train.fvd_eval_videos}")
    # Identity in pixel mode; the frozen SD VAE in latent mode, loaded before a run folder is claimed (a bad path
    # costs nothing).
    frames = load_frames(cfg, "cpu")
    # Latent mode: the VAE's weights are part of what the run learns; a resume with other weights is refused.
    cfg.vae_fingerprint = vae_fingerprint(frames)
    run = TrainingRun(cfg, stage="autoencoder")
    frames.to(run.device)
    with main_rank_first(run.dist):  # rank 0 indexes the videos; the other ranks then read its index
        dataset = build_dataset(cfg.data, cfg.data.split, cfg.train.global_seed)
        eval_set = build_dataset(cfg.data, cfg.data.eval_split, cfg.train.global_seed)
    cfg.data.num_classes = dataset.num_classes

    model = build_autoencoder(cfg.model, cfg.data, frames.downsample).to(run.device)
    loss_fn = build_ae_loss(cfg.loss, cfg.model.channels).to(run.device)
    ema = make_ema(model)
    opt = make_optimizer(model.parameters(), cfg.optim, run.device)
    modules, optimizers = {"model": model, "ema": ema}, {"opt": opt}
    disc = loss_fn.discriminator
    if disc is not None:
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.loss.disc_lr or cfg.optim.lr,
                                    betas=tuple(cfg.optim.betas))
        modules["discriminator"], optimizers["disc_opt"] = disc, disc_opt
    run.restore(modules, optimizers)
    run.write_config()  # the run's settings are decided: nothing changes them from here on
    run.logger.info(f"autoencoder: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
                    f"content frame {model.content_shape}, motion latent {model.motion_shape}")
    train_model = run.wrap(model)
    if disc is not None:
        loss_fn.discriminator = run.wrap(disc)
    recon_fvd = None
    if cfg.train.fvd_detector:
        detector = load_detector(cfg.train.fvd_detector, run.device)
        recon_fvd = ReconstructionFVD(eval_set, cfg.train.fvd_eval_videos, detector, run.dist.rank,
                                      run.dist.world_size, run.batch_size, cfg.data.num_workers)
        fewer = (f" (train.fvd_eval_videos={cfg.train.fvd_eval_videos}; the split holds {len(eval_set)})"
                 if recon_fvd.count < cfg.train.fvd_eval_videos else "")
        run.logger.info(f"reconstruction FVD: {recon_fvd.name(cfg.data.n_frames)} over {recon_fvd.count} clips of the "
                        f"{cfg.data.eval_split} split{fewer}, sharded over {run.dist.world_size} ranks")
    # The motion-swap measure decodes each clip with another clip's motion latent: two clips per rank at least.
    eval_batch = fixed_batch(eval_set, max(cfg.train.num_eval_videos, 2 * run.dist.world_size))

    source = dataset
    if cfg.latent_cache:  # latent mode: the VAE runs once per cached clip instead of on every batch
        source = run_latent_cache(run, LatentEncoder.frames(frames, cfg.data), dataset, cfg.data,
                                  cfg.latent_cache_clips_per_video)
    batches = run.loader(source)
    results = None
    last = run.should_stop()  # True already for a run resumed at its last step
    while not last:
        lr_scale = lr_factor(cfg.optim, run.step, cfg.train.max_steps)  # each optimizer's base rate times this
        set_lr(opt, lr_scale)
        with run.autocast():
            x = run.to_device(next(batches)["x"])
            x = x if cfg.latent_cache else frames.encode(x).float()
            x_hat, z_c, _ = train_model(x)
        loss, logs = loss_fn(x, x_hat.float(), run.step, last_layer=model.last_layer(), content=z_c.float())
        loss.backward()
        if disc is not None and loss_fn.discriminator_active(run.step):
            disc_opt.zero_grad(set_to_none=True)  # drop what the generator loss left on the discriminator
            disc_loss, disc_logs = loss_fn.discriminator_loss(x, x_hat.float(), run.step)
            disc_loss.backward()
            set_lr(disc_opt, lr_scale)
            run.clip_and_step(loss_fn.discriminator, disc_opt)
            logs.update(disc_logs)
        logs["grad_norm"], stepped = run.clip_and_step(train_model, opt)  # skipped if the gradient is not finite
        if stepped:
            update_ema(ema, model, cfg.train.ema_decay)
        run.count_step()
        last = run.should_stop()  # the step's one stop check: max_steps, or a stop signal the ranks agree on
        run.log(logs, last)
        if run.due(cfg.train.eval_every, last):
            results = evaluate(run, ema, frames, loss_fn, eval_batch, recon_fvd)
        if run.due(cfg.train.ckpt_every, last):
            run.save(modules, optimizers)
    if results is not None:
        warning = motion_warning(results)
        run.logger.info(
            f"summary (EMA, {len(eval_batch['x'])} held-out clips): reconstruction {results['psnr']:.2f} dB, "
            f"static temporal-mean baseline {results['psnr_temporal_mean']:.2f} dB "
            f"(gain {results['gain_over_static']:+.2f} dB), motion-swap gap {results['swap_gap']:.2f} dB, "
            f"z_m spread {results['zm_spread']:.3f}, saturated {100 * results['zm_saturated']:.1f}%"
            + (f" | WARNING {warning}" if warning else ""))
    run.finish()


if __name__ == "__main__":
    entry_point(main, "autoencoder", "Train the CMD content-frame / motion-latent autoencoder.")
