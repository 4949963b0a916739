"""Trains the CMD autoencoder: clip -> (content frame, motion latent) -> clip.

    torchrun --nproc_per_node=8 train_ae.py --config configs/ucf101/autoencoder.yaml --data-path /data/UCF-101
    python train_ae.py --config configs/tiny/autoencoder.yaml            # one CPU process, synthetic data
"""
import numpy as np
import torch

from evals.fvd import extract_features, frechet_distance, load_detector
from evals.recon import motion_health, motion_warning, ssim, to_uint8_videos
from models.ae_losses import build_ae_loss
from models.autoencoder import build_autoencoder
from training.data import fixed_batch
from training.distributed import all_gather_object, all_reduce_mean
from training.media import save_video_set
from training.run import TrainingRun, entry_point, make_ema, make_optimizer


@torch.no_grad()
def evaluate(run, model, loss_fn, eval_batch, detector=None):
    """PSNR/SSIM/LPIPS, motion-latent health (+ reconstruction FVD with a detector) on the fixed held-out clips.

    The clips are sharded over ranks; the motion swap happens within each rank's shard.
    """
    rank, world = run.dist.rank, run.dist.world_size
    x = run.to_device(eval_batch["x"][rank::world])
    model.eval()
    with run.autocast():
        x_hat, z_c, z_m = model(x)
        health = motion_health(model, x, encoded=(z_c, z_m), x_hat=x_hat)
    x_hat = x_hat.float()
    model.train()
    metrics = {key: value.mean() for key, value in health.items()}
    metrics["ssim"] = ssim(x, x_hat).mean()
    if loss_fn.lpips is not None:
        # Every frame counts here: (B, C, T, H, W) -> (B*T, C, H, W).
        metrics["lpips"] = loss_fn.lpips(x_hat.transpose(1, 2).flatten(0, 1), x.transpose(1, 2).flatten(0, 1)).mean()
    keys = sorted(metrics)
    values = all_reduce_mean(torch.stack([metrics[k].float() for k in keys])).tolist()
    results = dict(zip(keys, values))
    if detector is not None:
        real = all_gather_object(extract_features(to_uint8_videos(x), detector))
        fake = all_gather_object(extract_features(to_uint8_videos(x_hat), detector))
        results["fvd_recon"] = frechet_distance(np.concatenate(real), np.concatenate(fake))
    if run.dist.is_main:
        out = run.run_dir / "eval"
        pairs = torch.stack([x, x_hat], dim=1).flatten(0, 1)  # originals and reconstructions side by side
        save_video_set(to_uint8_videos(pairs), out, "reconstruction", run.step, run.writer, nrow=2)
        save_video_set(to_uint8_videos(z_c.unsqueeze(2)), out, "content_frames", run.step, run.writer)
        for key, value in results.items():
            run.writer.add_scalar(f"eval/{key}", value, run.step)
        run.logger.info(f"eval step {run.step:07d} | " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))
        warning = motion_warning(results)
        if warning:
            run.logger.warning(f"eval step {run.step:07d} | WARNING {warning}")
    return results


def main(cfg):
    run = TrainingRun(cfg, stage="autoencoder")
    dataset = run.build_dataset(cfg.data.split)
    eval_set = run.build_dataset(cfg.data.eval_split)
    run.record("data.num_classes", dataset.num_classes)

    model = build_autoencoder(cfg.model, cfg.data).to(run.device)
    loss_fn = build_ae_loss(cfg.loss, cfg.model.channels).to(run.device)
    ema = make_ema(model)
    opt = make_optimizer(model.parameters(), cfg.optim, run.device)
    modules, optimizers = {"model": model, "ema": ema}, {"opt": opt}
    disc = loss_fn.discriminator
    if disc is not None:
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.loss.disc_lr or cfg.optim.lr, betas=tuple(cfg.optim.betas))
        modules["discriminator"], optimizers["disc_opt"] = disc, disc_opt
    run.restore(modules, optimizers)
    run.logger.info(f"autoencoder: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
                    f"content frame {model.content_shape}, motion latent {model.motion_shape}")
    train_model = run.wrap(model)
    if disc is not None:
        loss_fn.discriminator = run.wrap(disc)
    detector = load_detector(cfg.train.fvd_detector, run.device) if cfg.train.fvd_detector else None
    # The motion-swap measure decodes each clip with another clip's motion latent: two clips per rank at least.
    eval_batch = fixed_batch(eval_set, max(cfg.train.num_eval_videos, 2 * run.dist.world_size))

    batches = run.loader(dataset)
    results = None
    while not run.should_stop():
        x = run.to_device(next(batches)["x"])
        with run.autocast():
            x_hat, _, _ = train_model(x)
        loss, logs = loss_fn(x, x_hat.float(), run.step, last_layer=model.last_layer())
        loss.backward()
        if disc is not None and loss_fn.discriminator_active(run.step):
            disc_opt.zero_grad(set_to_none=True)  # drop what the generator loss left on the discriminator
            disc_loss, disc_logs = loss_fn.discriminator_loss(x, x_hat.float(), run.step)
            disc_loss.backward()
            run.optimizer_step(loss_fn.discriminator, disc_opt, count_step=False)
            logs.update(disc_logs)
        logs["grad_norm"] = run.optimizer_step(train_model, opt, ema)
        run.log(logs)
        if run.due(cfg.train.eval_every):
            results = evaluate(run, ema, loss_fn, eval_batch, detector)
        run.maybe_save(modules, optimizers)
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
