"""Trains the motion DiT p(z_m | z_c, y) on latents of a frozen autoencoder.

    torchrun --nproc_per_node=8 train_motion_diffusion.py --config configs/ucf101/motion.yaml \
        --data-path /data/UCF-101 --ae-ckpt results/000-autoencoder/checkpoints/last.pt
"""
import torch

from datasets.transforms import to_uint8_videos
from training.diffusion_stage import train_diffusion_stage
from training.generation import CMDModels, generate
from training.media import save_video_set
from training.cli import entry_point


@torch.no_grad()
def preview(ctx):
    """The paper's motion-only check: generated motion on REAL content frames, next to the real clip's decoding."""
    run, latents = ctx.run, ctx.eval_latents
    fake, _ = generate(CMDModels(ctx.ae, motion=ctx.denoiser), latents["y"], content=latents["z_c"])
    real = ctx.ae.decode(latents["z_c"], latents["z_m"])
    pairs = torch.stack([real, fake], dim=1).flatten(0, 1)  # rows: (real motion, generated motion) per content frame
    paths = save_video_set(to_uint8_videos(pairs), run.run_dir / "samples", "motion_on_real_content", run.step,
                           run.writer, nrow=2)
    run.logger.info(f"motion samples (left real, right generated): {paths['mp4']}")


def main(cfg):
    train_diffusion_stage(cfg, "motion", preview)


if __name__ == "__main__":
    entry_point(main, "motion", "Train the CMD motion diffusion model (MotionDiT).")
