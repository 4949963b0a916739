"""Trains the motion DiT p(z_m | z_c, y) on latents of a frozen autoencoder.

    torchrun --nproc_per_node=8 train_motion_diffusion.py --config configs/ucf101/motion.yaml \
        --data-path /data/UCF-101 --ae-ckpt results/ucf101-ae/checkpoints/last.pt --exp-name ucf101-motion
"""
import torch

from datasets.transforms import to_uint8_videos
from core.cli import entry_point
from training.diffusion_stage import DiffusionStage, setup
from training.optim import lr_factor, set_lr, update_ema
from sampling.generation import CMDModels, generate
from sampling.media import save_video_set


def train_step(s: DiffusionStage, batch: dict) -> dict:
    """One optimizer step on a batch of clips {'x', 'y'} or of the latent cache {'z_c', 'z_m', 'y'}; returns what
    it logs. benchmarks/throughput.py times this function: what is measured is what trains."""
    run, cfg = s.run, s.run.cfg
    set_lr(s.opt, lr_factor(cfg.optim, run.step, cfg.train.max_steps))  # optim.lr times the schedule's factor
    z_c, z_m, y = s.latents(batch)  # the cache's latents, or the frozen autoencoder encodes the clips now
    x0 = s.scaler.normalize("motion", z_m)  # the denoiser learns latents standardised by the run's latent stats
    cond = {"y": y, "content": s.scaler.normalize("content", z_c)}
    losses = s.losses(x0, cond)  # the diffusion loss on z_m given (y, z_c), at a random timestep per clip
    losses["loss"].backward()
    losses["grad_norm"], stepped = run.clip_and_step(s.train_model, s.opt)  # skipped if the gradient is not finite
    if stepped:
        update_ema(s.ema, s.model, cfg.train.ema_decay)
    return losses


@torch.no_grad()
def preview(s: DiffusionStage) -> None:
    """The paper's motion-only check: generated motion on REAL content frames, next to the real clip's decoding."""
    run, latents = s.run, s.eval_latents
    fake, _ = generate(CMDModels(s.ae, motion=s.denoiser()), latents["y"], content=latents["z_c"])
    real = s.ae.decode(latents["z_c"], latents["z_m"])
    pairs = torch.stack([real, fake], dim=1).flatten(0, 1)  # rows: (real motion, generated motion) per content frame
    paths = save_video_set(to_uint8_videos(pairs), run.run_dir / "samples", "motion_on_real_content", run.step,
                           run.writer, nrow=2)
    run.logger.info(f"motion samples (left real, right generated): {paths['mp4']}")


def main(cfg):
    s = setup(cfg, "motion")  # run, frozen AE, data (or its latent cache), model/EMA/optimizer, resume, latent stats
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
    entry_point(main, "motion", "Train the CMD motion diffusion model (MotionDiT).")
