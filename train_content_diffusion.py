"""Trains the class-conditional content DiT p(z_c | y) on content frames of a frozen autoencoder.

    torchrun --nproc_per_node=8 train_content_diffusion.py --config configs/ucf101/content.yaml \
        --data-path /data/UCF-101 --ae-ckpt results/ucf101-ae/checkpoints/last.pt --exp-name ucf101-content
"""
import torch

from datasets.transforms import to_uint8_videos
from core.cli import entry_point
from training.diffusion_stage import DiffusionStage, setup
from training.optim import lr_factor, set_lr, update_ema
from sampling.generation import CMDModels, generate_content_frames
from sampling.media import save_video_set


def train_step(s: DiffusionStage, batch: dict) -> dict:
    """One optimizer step on a batch of clips {'x', 'y'} or of the latent cache {'z_c', 'z_m', 'y'}; returns what
    it logs. benchmarks/throughput.py times this function: what is measured is what trains."""
    run, cfg = s.run, s.run.cfg
    set_lr(s.opt, lr_factor(cfg.optim, run.step, cfg.train.max_steps))  # optim.lr times the schedule's factor
    z_c, _, y = s.latents(batch)  # the cache's latents, or the frozen autoencoder encodes the clips now
    x0 = s.scaler.normalize("content", z_c)  # the denoiser learns latents standardised by the run's latent stats
    losses = s.losses(x0, {"y": y})  # the diffusion loss on z_c given y, at a random timestep per clip
    losses["loss"].backward()
    losses["grad_norm"], stepped = run.clip_and_step(s.train_model, s.opt)  # skipped if the gradient is not finite
    if stepped:
        update_ema(s.ema, s.model, cfg.train.ema_decay)
    return losses


@torch.no_grad()
def preview(s: DiffusionStage) -> None:
    """Generated content frames, one per class round-robin (or for the held-out clips' captions), next to real
    held-out content frames."""
    run, latents = s.run, s.eval_latents
    count = len(latents["z_c"])
    y = latents["y"] if s.text is not None else torch.arange(count, device=run.device) % run.cfg.data.num_classes
    z_c = generate_content_frames(CMDModels(s.ae, motion=None, content=s.denoiser()), y)
    # (2N, C, 1, H, W): the real row, then the generated row
    frames = s.ae.decode_content(torch.cat([latents["z_c"], z_c])).unsqueeze(2)
    paths = save_video_set(to_uint8_videos(frames), run.run_dir / "samples", "content_frames", run.step, run.writer,
                           nrow=count)
    what = "their captions" if s.text is not None else f"classes {y.tolist()}"
    run.logger.info(f"content samples (top real, bottom generated for {what}): {paths['png']}")


def main(cfg):
    s = setup(cfg, "content")  # run, frozen AE, data (or its latent cache), model/EMA/optimizer, resume, latent stats
    run, batches = s.run, s.run.loader(s.source)
    last = run.should_stop()  # True already for a run resumed at its last step
    while not last:
        logs = train_step(s, next(batches))
        run.count_step()
        last = run.should_stop()  # the step's one stop check: max_steps, or a stop signal the ranks agree on
        run.log(logs, last)
        if run.due(cfg.train.sample_every, last) and run.dist.is_main:
            preview(s)  # the other ranks wait for it at their next collective (log or save)
        if run.due(cfg.train.ckpt_every, last):
            s.save()
    run.finish()


if __name__ == "__main__":
    entry_point(main, "content", "Train the CMD content diffusion model (ContentDiT).")
