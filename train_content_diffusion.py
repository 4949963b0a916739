"""Trains the class-conditional content DiT p(z_c | y) on content frames of a frozen autoencoder.

    torchrun --nproc_per_node=8 train_content_diffusion.py --config configs/ucf101/content.yaml \
        --data-path /data/UCF-101 --ae-ckpt results/ucf101-ae/checkpoints/last.pt --exp-name ucf101-content
"""
import torch

from datasets import build_dataset
from datasets.transforms import to_uint8_videos
from models.content_unet import build_denoiser, load_pretrained_unet, unet_config_json
from core.cli import entry_point
from core.distributed import main_rank_first
from core.latent_cache import LatentEncoder
from sampling.generation import CMDModels, Denoiser, generate_content_frames
from sampling.media import save_video_set
from training.diffusion_stage import (batch_latents, decide_diffusion_settings, diffusion_losses,
                                      fresh_prediction_type, held_out_latents, latent_stats, load_frozen_autoencoder,
                                      setup_text, training_diffusion, uses_pretrained_unet)
from training.optim import lr_factor, make_ema, make_optimizer, set_lr, update_ema
from training.run import TrainingRun
from training.run_latents import run_latent_cache


@torch.no_grad()
def preview(run: TrainingRun, ae, denoiser: Denoiser, held_out: dict, num_classes: int, captioned: bool) -> None:
    """Generated content frames, one per class round-robin (or for the held-out clips' captions), next to real
    held-out content frames."""
    count = len(held_out["z_c"])
    y = held_out["y"] if captioned else torch.arange(count, device=run.device) % num_classes
    z_c = generate_content_frames(CMDModels(ae, motion=None, content=denoiser), y)
    # (2N, C, 1, H, W): the real row, then the generated row
    frames = ae.decode_content(torch.cat([held_out["z_c"], z_c])).unsqueeze(2)
    paths = save_video_set(to_uint8_videos(frames), run.run_dir / "samples", "content_frames", run.step, run.writer,
                           nrow=count)
    what = "their captions" if captioned else f"classes {y.tolist()}"
    run.logger.info(f"content samples (top real, bottom generated for {what}): {paths['png']}")


def main(cfg):
    if not cfg.train.resume:  # a pretrained UNet of unknown prediction type is refused before a run folder is claimed
        fresh_prediction_type(cfg, "content")
    run = TrainingRun(cfg, "content")  # the run folder, log, ranks, device, resume point and stop signal
    ae = load_frozen_autoencoder(cfg, run.device)
    with main_rank_first(run.dist):  # rank 0 indexes the videos; the other ranks then read its index
        train_set = build_dataset(cfg.data, cfg.data.split, cfg.train.global_seed)
        eval_set = build_dataset(cfg.data, cfg.data.eval_split, cfg.train.global_seed)
    cfg.data.num_classes = train_set.num_classes
    text = setup_text(run, cfg, train_set) if cfg.text.encoder else None  # captions instead of class labels
    unet = None
    if uses_pretrained_unet(cfg, "content"):  # fine-tuned from a pretrained image model
        unet = load_pretrained_unet(cfg.model.pretrained)
        cfg.model.unet_config = unet_config_json(unet)  # its checkpoints rebuild it without the folder
    model = build_denoiser("content", cfg.model, train_set.num_classes, ae.content_shape, ae.motion_shape, unet,
                           text_shape=None if text is None else text.encoder.shape).to(run.device)
    if text is not None:  # guidance's null condition: the empty prompt (a resumed run restores its own)
        model.y_embedder.null_tokens.copy_(text.encoder([""])[0])
    ema = make_ema(model)
    opt = make_optimizer(model.parameters(), cfg.optim, run.device)
    resumed = run.restore({"model": model, "ema": ema}, {"opt": opt})
    decide_diffusion_settings(cfg, "content", resumed, run.resume_path)
    run.write_config()  # the run's settings are decided: nothing changes them from here on
    run.logger.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                    f"predicts {cfg.diffusion.prediction_type}; autoencoder {cfg.ae_ckpt}")
    train_model = run.wrap(model)
    diffusion = training_diffusion(cfg)
    held_out = held_out_latents(run, ae, eval_set, cfg.train.num_eval_videos, text)
    source = train_set
    if cfg.diffusion.latent_cache:  # the frozen autoencoder encodes each clip once instead of on every batch
        source = run_latent_cache(run, LatentEncoder.autoencoder(ae, cfg.ae_ckpt), train_set, cfg.data,
                                  cfg.diffusion.latent_cache_clips_per_video, None if text is None else text.captions)
    scaler = latent_stats(run, ae, source, resumed, cfg.diffusion.standardize_latents)
    denoiser = Denoiser.from_config(ema, cfg, scaler)  # the EMA model as the previews sample it

    batches = run.loader(source)
    last = run.should_stop()  # True already for a run resumed at its last step
    while not last:
        set_lr(opt, lr_factor(cfg.optim, run.step, cfg.train.max_steps))  # optim.lr times the schedule's factor
        z_c, _, y = batch_latents(run, ae, next(batches), text)
        x0 = scaler.normalize("content", z_c)  # the denoiser learns latents standardised by the run's latent stats
        losses = diffusion_losses(diffusion, train_model, x0, {"y": y}, run.autocast(),  # a random t per clip
                                  self_condition=cfg.model.self_condition)
        losses["loss"].backward()
        losses["grad_norm"], stepped = run.clip_and_step(train_model, opt)  # skipped if the gradient is not finite
        if stepped:
            update_ema(ema, model, cfg.train.ema_decay)
        run.count_step()
        last = run.should_stop()  # the step's one stop check: max_steps, or a stop signal the ranks agree on
        run.log(losses, last)
        if run.due(cfg.train.sample_every, last) and run.dist.is_main:
            preview(run, ae, denoiser, held_out, cfg.data.num_classes, text is not None)
        if run.due(cfg.train.ckpt_every, last):
            run.save({"model": model, "ema": ema}, {"opt": opt}, {"latent_stats": scaler.state_dict()})
    run.finish()


if __name__ == "__main__":
    entry_point(main, "content", "Train the CMD content diffusion model (ContentDiT).")
