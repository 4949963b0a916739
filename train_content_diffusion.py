"""Trains the class-conditional content DiT p(z_c | y) on content frames of a frozen autoencoder.

    torchrun --nproc_per_node=8 train_content_diffusion.py --config configs/ucf101/content.yaml \
        --data-path /data/UCF-101 --ae-ckpt results/000-autoencoder/checkpoints/last.pt
"""
import torch

from datasets.transforms import to_uint8_videos
from training.diffusion_stage import train_diffusion_stage
from training.generation import CMDModels, generate_content_frames
from training.media import save_video_set
from training.cli import entry_point


@torch.no_grad()
def preview(ctx):
    """Generated content frames, one per class round-robin, next to real held-out content frames."""
    run, latents = ctx.run, ctx.eval_latents
    count = len(latents["y"])
    y = torch.arange(count, device=run.device) % run.cfg.data.num_classes
    z_c = generate_content_frames(CMDModels(ctx.ae, motion=None, content=ctx.denoiser), y)
    frames = ctx.ae.decode_content(torch.cat([latents["z_c"], z_c])).unsqueeze(2)  # (2N, C, 1, H, W): real row, generated row
    paths = save_video_set(to_uint8_videos(frames), run.run_dir / "samples", "content_frames", run.step, run.writer,
                           nrow=count)
    run.logger.info(f"content samples (top real, bottom generated for classes {y.tolist()}): {paths['png']}")


def main(cfg):
    train_diffusion_stage(cfg, "content", preview)


if __name__ == "__main__":
    entry_point(main, "content", "Train the CMD content diffusion model (ContentDiT).")
