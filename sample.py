"""Generates videos: class -> content frame (content DiT) -> motion latent (motion DiT) -> autoencoder decode.

    python sample.py --ae-ckpt AE.pt --content-ckpt CONTENT.pt --motion-ckpt MOTION.pt --num-videos 16 --out-dir out
    torchrun --nproc_per_node=8 sample.py ... --num-videos 2048 --npz out/samples.npz   # for FVD
    python sample.py --ae-ckpt AE.pt --motion-ckpt MOTION.pt --content-frame photo.png --classes 3   # image-to-video
    python sample.py --ae-ckpt AE.pt --motion-ckpt MOTION.pt --real-content --npz motion_only.npz  # motion-only
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datasets.transforms import frames_to_clip
from evals.recon import to_uint8_videos
from training.checkpoint import CheckpointError
from training.distributed import barrier, cleanup_distributed, setup_distributed
from training.generation import load_denoiser, make_sampler, sample_latents
from training.latents import load_autoencoder
from training.run import run_reporting_user_errors
from training.media import save_video_set, write_mp4


def video_generators(seed: int, indices, stream: int, device) -> list:
    """One generator per video index and stage, so a video never depends on its batch or its rank."""
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + index * 2 + stream) for index in indices]


def load_image(path, resolution, channels: int = 3) -> torch.Tensor:
    """An image file -> (C, H, W) in [-1, 1], resized and center-cropped exactly like the training clips."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--content-frame {path}: no such image")
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    return frames_to_clip(pixels[None], resolution)[:channels, 0]  # a one-frame clip (C, 1, H, W) -> (C, H, W)


def real_content_frames(ae, data_cfg, seed: int, labels, device) -> torch.Tensor:
    """(N, C, H, W) content frames of held-out real clips, encoded by `ae`: video i gets the next clip of its class.

    The paper's motion-only evaluation (real content frames, generated motion): the held-out split of the motion
    run's data (data.eval_split), taken in index order so that the frames do not depend on batch or rank.
    """
    from datasets import build_dataset

    dataset = build_dataset(data_cfg, split=data_cfg.eval_split, seed=seed)
    wanted = {label: labels.count(label) for label in set(labels)}
    by_class = {label: [] for label in wanted}
    for index in range(len(dataset)):
        label = dataset.label_of(index) if hasattr(dataset, "label_of") else int(dataset[index]["y"])
        if label in by_class and len(by_class[label]) < wanted[label]:
            by_class[label].append(index)
        if all(len(by_class[k]) == wanted[k] for k in wanted):
            break
    short = [k for k in wanted if len(by_class[k]) < wanted[k]]
    if short:
        raise ValueError(f"--real-content: the {data_cfg.eval_split} split has only {len(by_class[short[0]])} clips of "
                         f"class {short[0]}, {wanted[short[0]]} are needed")
    taken = {label: iter(indices) for label, indices in by_class.items()}
    clips = torch.stack([dataset[next(taken[label])]["x"] for label in labels]).to(device)
    return torch.cat([ae.encode(chunk)[0] for chunk in clips.split(64)])


def class_list(args, num_classes: int) -> list:
    if args.classes:
        classes = [int(c) for c in args.classes.split(",")]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes: class id {bad[0]} is out of range; the models know classes 0..{num_classes - 1}")
    else:
        classes = list(range(num_classes))
    return [classes[i % len(classes)] for i in range(args.num_videos)]


@torch.no_grad()
def main(args):
    if args.content_frame and args.real_content:
        raise ValueError("--content-frame and --real-content both give the content frames: choose one")
    info = setup_distributed()
    device = info.device
    ae, ae_cfg = load_autoencoder(args.ae_ckpt, device)
    # Each denoiser comes with the latent statistics of its own run; sample_latents works in the AE's units.
    motion, motion_cfg, motion_scaler = load_denoiser(args.motion_ckpt, "motion", ae, device)
    num_classes = motion.num_classes
    content_model, content_cfg, content_scaler, given_frame, real_frames = None, None, None, None, None
    labels = class_list(args, num_classes)
    if args.content_frame:
        given_frame = load_image(args.content_frame, ae_cfg.data.resolution, ae_cfg.model.channels).to(device)
    elif args.real_content:
        real_frames = real_content_frames(ae, motion_cfg.data, int(motion_cfg.train.global_seed), labels, device)
    else:
        if not args.content_ckpt:
            raise ValueError("--content-ckpt is required unless --content-frame gives the content frame")
        content_model, content_cfg, content_scaler = load_denoiser(args.content_ckpt, "content", ae, device)
        if content_model.num_classes != num_classes:
            raise CheckpointError(f"{args.content_ckpt} knows {content_model.num_classes} classes but "
                                  f"{args.motion_ckpt} knows {num_classes}")

    motion_sampling, motion_sampler = make_sampler(motion_cfg.diffusion, motion_cfg.model.learn_sigma,
                                                   args.motion_steps, args.motion_sampler)
    motion_scale = motion_cfg.diffusion.cfg_scale if args.motion_cfg_scale is None else args.motion_cfg_scale
    if content_model is not None:
        content_sampling, content_sampler = make_sampler(content_cfg.diffusion, content_cfg.model.learn_sigma,
                                                         args.content_steps, args.content_sampler)
        content_scale = content_cfg.diffusion.cfg_scale if args.content_cfg_scale is None else args.content_cfg_scale

    out_dir = Path(args.out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    mine = list(range(info.rank, args.num_videos, info.world_size))
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    videos, contents, indices = [], [], []
    show_steps = info.is_main and not args.quiet
    for batch in tqdm(batches, desc=f"sampling (rank {info.rank})", disable=not show_steps):
        y = torch.tensor([labels[i] for i in batch], device=device)
        if given_frame is not None:
            z_c = given_frame.expand(len(batch), -1, -1, -1)
        elif real_frames is not None:
            z_c = real_frames[batch]
        else:
            z_c = sample_latents(content_model, content_sampling, content_sampler, "content", tuple(ae.content_shape),
                                 y, content_scale, content_scaler, progress=show_steps,
                                 generator=video_generators(args.seed, batch, 0, device))
        z_m = sample_latents(motion, motion_sampling, motion_sampler, "motion", tuple(ae.motion_shape), y, motion_scale,
                             motion_scaler, content=z_c, generator=video_generators(args.seed, batch, 1, device),
                             progress=show_steps)
        clips = to_uint8_videos(ae.decode(z_c, z_m).float())
        contents.append(to_uint8_videos(z_c.unsqueeze(2))[:, 0])
        for index, label, clip in zip(batch, y.tolist(), clips):
            write_mp4(clip, out_dir / "videos" / f"{index:06d}_class{label:03d}.mp4", fps=args.fps)
        videos.append(clips)
        indices.extend(batch)
    shard = out_dir / f".shard-{info.rank:05d}.npz"
    np.savez(shard, videos=np.concatenate(videos) if videos else np.zeros((0,), np.uint8),
             content_frames=np.concatenate(contents) if contents else np.zeros((0,), np.uint8), indices=np.array(indices))
    barrier()
    if info.is_main:
        shards = [np.load(out_dir / f".shard-{r:05d}.npz") for r in range(info.world_size)]
        order = np.concatenate([s["indices"] for s in shards if len(s["indices"])])
        ranked = np.argsort(order)
        all_videos = np.concatenate([s["videos"] for s in shards if len(s["indices"])])[ranked]
        all_contents = np.concatenate([s["content_frames"] for s in shards if len(s["indices"])])[ranked]
        grid = save_video_set(all_videos[: args.grid_videos], out_dir, "grid", fps=args.fps)
        if args.npz:
            np.savez(args.npz, videos=all_videos, labels=np.array(labels, dtype=np.int64), content_frames=all_contents,
                     num_classes=np.int64(num_classes))
            print(f"wrote {args.npz}: videos {all_videos.shape} uint8")
        print(f"wrote {len(all_videos)} videos to {out_dir / 'videos'}; grid: {grid['mp4']} and {grid['png']}")
    barrier()
    shard.unlink()
    cleanup_distributed()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sample videos from trained CMD checkpoints.")
    parser.add_argument("--ae-ckpt", required=True)
    parser.add_argument("--motion-ckpt", required=True)
    parser.add_argument("--content-ckpt", default=None)
    parser.add_argument("--content-frame", default=None, help="an image to animate instead of sampling content")
    parser.add_argument("--real-content", action="store_true",
                        help="motion-only samples: content frames of held-out real clips of each video's class")
    parser.add_argument("--classes", default=None, help="comma-separated class ids, used round-robin (default: all)")
    parser.add_argument("--num-videos", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--content-sampler", choices=["ddim", "ddpm"], default="ddim")
    parser.add_argument("--content-steps", type=int, default=50)
    parser.add_argument("--content-cfg-scale", type=float, default=None, help="default: the checkpoint's config")
    parser.add_argument("--motion-sampler", choices=["ddim", "ddpm"], default="ddim")
    parser.add_argument("--motion-steps", type=int, default=100)
    parser.add_argument("--motion-cfg-scale", type=float, default=None, help="default: the checkpoint's config")
    parser.add_argument("--out-dir", default="samples")
    parser.add_argument("--npz", default=None,
                        help="also write videos (N, T, H, W, 3) uint8, labels (N,), content_frames (N, H, W, 3) and "
                        "num_classes here")
    parser.add_argument("--grid-videos", type=int, default=16)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_reporting_user_errors(main, parse_args())
