"""A sample.py rank's share of the videos, generated --batch-size at a time; each video is written as soon as its
batch is finished."""
from __future__ import annotations

import torch
from tqdm import tqdm

from datasets.transforms import to_uint8_videos
from sampling.generation import generate
from sampling.outputs import RankVideos, write_video
from sampling.requests import VideoRequests, batch_conditioning, video_names


def rank_indices(args, info) -> range:
    """The indices of this rank's videos: every world_size-th, from its rank."""
    return range(info.rank, args.num_videos, info.world_size)


def rank_batches(args, info) -> list:
    """This rank's video indices in batches of --batch-size."""
    mine = list(rank_indices(args, info))
    return [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]


def generate_videos(args, info, models, request: VideoRequests, written: list) -> RankVideos:
    """This rank's videos; the place each finished one is counted by is appended to `written`."""
    rank = RankVideos([], [], [])
    show_steps = info.is_main and not args.quiet
    for batch in tqdm(rank_batches(args, info), desc=f"sampling (rank {info.rank})", disable=not show_steps):
        clips, content_frames = generate_batch(args, info.device, models, request, batch, show_steps)
        rank.content_frames.append(content_frames)
        for index, name, clip in zip(batch, video_names(request, batch), clips):
            written.extend(write_video(args, index, name, clip))
        rank.videos.append(clips)
        rank.indices.extend(batch)
    return rank


def generate_batch(args, device, models, request: VideoRequests, batch: list, progress: bool) -> tuple:
    """(uint8 videos, uint8 content frames) of the videos `batch` indexes, refused if any value is not finite."""
    y = batch_conditioning(models, request, batch, device)
    given = None if request.content_frames is None else request.content_frames[batch]
    decoded, z_c = generate(models, y, args.seed, [request.noise_ids[i] for i in batch], given, progress=progress)
    check_finite_samples(models, batch, decoded, z_c)
    return to_uint8_videos(decoded), to_uint8_videos(models.ae.decode_content(z_c).float().unsqueeze(2))[:, 0]


def check_finite_samples(models, indices: list, videos: torch.Tensor, contents: torch.Tensor) -> None:
    """Refuses a batch with a NaN or infinite value before any of it is written: converted to uint8 it would pass
    for a black video."""
    bad = [index for index, video, content in zip(indices, videos, contents)
           if not (bool(torch.isfinite(video).all()) and bool(torch.isfinite(content).all()))]
    if bad:
        scales = ", ".join(f"{stage} {denoiser.guidance_scale:g}" for stage, denoiser in
                           (("content", models.content), ("motion", models.motion)) if denoiser is not None)
        raise ValueError(f"sampling produced non-finite values (NaN or inf) in video{'s' * (len(bad) > 1)} "
                         f"{', '.join(map(str, bad[:4]))}{', ...' if len(bad) > 4 else ''}; nothing of "
                         f"{'them' if len(bad) > 1 else 'it'} was written (guidance scales: {scales})")
