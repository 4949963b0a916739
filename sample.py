"""Generates videos: class -> content frame (content DiT) -> motion latent (motion DiT) -> autoencoder decode.

    python sample.py --ae-ckpt AE.pt --content-ckpt CONTENT.pt --motion-ckpt MOTION.pt --num-videos 16 --out-dir out
    torchrun --nproc_per_node=8 sample.py ... --preset paper --num-videos 2048 --npz out/samples.npz  # FVD
    python sample.py --ae-ckpt AE.pt --motion-ckpt MOTION.pt --content-frame photo.png --classes 3   # image-to-video
    python sample.py --ae-ckpt AE.pt --motion-ckpt MOTION.pt --real-content --npz motion_only.npz  # motion-only
    torchrun --nproc_per_node=8 sample.py ... --preset paper --num-videos 10000 --no-mp4 --frames-dir out/frames
    python sample.py ... --prompt "a red disc moving left" --num-videos 4     # text-to-video (caption-conditioned)
"""
import argparse
import signal
import sys

import torch

from diffusion import SAMPLERS
from core.cli import HelpFormatter, guidance_scale, positive_int, run_reporting_user_errors, seed_int
from core.distributed import cleanup_distributed, setup_distributed
from sampling.batches import generate_videos, rank_indices
from sampling.generation import PRECISIONS, SAMPLING_PRESETS, compile_models, load_models, set_precision
from sampling.outputs import (UnsavedVideos, check_outputs, claim_job_outputs, prepare_outputs, shard_path,
                              video_places, write_results, write_shard)
from sampling.requests import choose_videos, class_choice, prompt_list
from sampling.settings import describe_presets, protocol_line, resolve_settings


@torch.no_grad()
def main(args):
    check_flags(args)
    # Before setup_distributed: its rendezvous waits for every rank, so all ranks check before any can write.
    earlier = check_outputs(args)
    info = setup_distributed()
    claims, earlier = claim_job_outputs(args, info.is_main, earlier)
    stop_on_signals()
    written = []  # this rank's finished videos
    keep_shard = False
    try:
        models, settings, precision = load(args, info.device)
        request = choose_videos(args, models, info.device)
        if info.is_main and not args.quiet:
            print(protocol_line(args, models, settings, precision, request.captions))
        # --overwrite removes the earlier run only now that the models loaded: a typo in a flag must not cost it.
        prepare_outputs(args, info.is_main, earlier)
        videos = generate_videos(args, info, models, request, written)
        write_shard(args.out_dir, info.rank, videos)
        write_results(args, info, models.num_classes, request.labels, request.captions)
    except StopSignal as stop:
        report_stop(args, info, stop, written)
        raise SystemExit(128 + stop.signum) from None
    except UnsavedVideos:
        keep_shard = True
        raise
    finally:
        if not keep_shard:  # rank 0 has read them all, or the run failed before they were complete
            shard_path(args.out_dir, info.rank).unlink(missing_ok=True)
        for held in claims:
            held.release()
    cleanup_distributed()


def check_flags(args) -> None:
    """Refuses flags that cannot make a run before any output is claimed or model loaded."""
    if args.content_frame and args.real_content:
        raise ValueError("--content-frame and --real-content both give the content frames: choose one")
    if not (args.content_frame or args.real_content or args.content_ckpt):
        raise ValueError("--content-ckpt is required unless --content-frame gives the content frame")
    if args.no_mp4 and not (args.npz or args.frames_dir):
        raise ValueError("--no-mp4 would keep only the grid of a sampling run: pass --npz or --frames-dir to keep "
                         "the videos")
    prompt_list(args)  # an unreadable or empty --prompts file stops here, before any model loads


def load(args, device) -> tuple:
    """(the models, the settings they sample with, (bf16, tf32) as set for them)."""
    # Content frames given by --content-frame or --real-content need no content denoiser.
    content_ckpt = None if args.content_frame or args.real_content else args.content_ckpt
    settings = resolve_settings(args)
    models = load_models(args.ae_ckpt, args.motion_ckpt, content_ckpt, device, args.allow_ae_mismatch,
                         settings.motion, settings.content, vae=args.vae, text_encoder=args.text_encoder)
    precision = set_precision(models, settings.precision, device)
    if args.compile:
        compile_models(models)
    return models, settings, precision


# ---- stop signals -----------------------------------------------------------------------------------------------
class StopSignal(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM arrived. A BaseException, like KeyboardInterrupt: `except Exception` blocks
    (write_mp4 has one) must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    def handler(signum, frame):
        # Later signals (a second Ctrl-C, torchrun's SIGTERM after the terminal's SIGINT) must not cut the cleanup
        # short; it only removes a few files.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise StopSignal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def report_stop(args, info, stop: StopSignal, written: list) -> None:
    """How many of this rank's videos a stopped run leaves, and where."""
    # Every file in `written` is a whole video; the one being written when the signal came was removed.
    count = sum(path.exists() for path in written)
    total = len(rank_indices(args, info))
    rank = f"rank {info.rank}: " if info.world_size > 1 else ""
    print(f"{rank}stopped by {stop}: {count} of {total} videos written to {' and '.join(video_places(args))}; grid"
          f"{' and --npz' if args.npz else ''} files are written only by a finished run", file=sys.stderr, flush=True)


# ---- flags: a bad value is refused by the parser (exit 2, naming the flag) before anything loads ------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample videos from trained CMD checkpoints.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--ae-ckpt", required=True, metavar="PATH",
                        help="the autoencoder checkpoint (train_ae.py: RUN/checkpoints/last.pt or a step file)")
    parser.add_argument("--motion-ckpt", required=True, metavar="PATH",
                        help="the motion DiT checkpoint (train_motion_diffusion.py); its config gives the classes, "
                        "the dataset and the default sampling settings")
    parser.add_argument("--content-ckpt", default=None, metavar="PATH",
                        help="the content DiT checkpoint (train_content_diffusion.py); required unless --content-frame "
                        "or --real-content gives the content frames")
    parser.add_argument("--content-frame", default=None, metavar="IMAGE",
                        help="image-to-video: an image to animate as every video's content frame instead of "
                        "sampling one")
    parser.add_argument("--real-content", action="store_true",
                        help="motion-only samples: content frames of held-out real clips of each video's class")
    parser.add_argument("--vae", default=None, metavar="PATH",
                        help="latent mode: the SD VAE folder or hub id, when it moved since the autoencoder "
                        "recorded it")
    parser.add_argument("--allow-ae-mismatch", action="store_true",
                        help="sample even though the denoisers were trained with another autoencoder checkpoint")
    parser.add_argument("--classes", type=class_choice, default=None, metavar="IDS|NAMES|dataset",
                        help="comma-separated class ids or names, used round-robin; ids are 0-based (UCF-101's "
                        "classInd.txt numbers from 1: id = its number - 1), names are those of the motion run's "
                        "dataset (e.g. ApplyEyeMakeup,Biking). 'dataset': labels drawn by the class frequencies of "
                        "the motion run's training split, as NVlabs/CMD's evaluation and StyleGAN-V's metrics draw "
                        "them (deterministic given --seed). "
                        "Default: the preset's ('paper', 'reference': dataset), else every class round-robin")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text-to-video (caption-conditioned checkpoints): a prompt; repeat the flag for several. "
                        "Videos go round-robin over the prompts; a prompt's k-th video depends on --seed, the prompt "
                        "and k alone")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="a text file of prompts, one per line (with or after --prompt)")
    parser.add_argument("--text-encoder", default=None, metavar="PATH",
                        help="text-to-video: the CLIP text encoder folder or hub id, when it moved since the runs "
                        "recorded it")
    parser.add_argument("--num-videos", type=positive_int, default=16, metavar="N",
                        help="videos to generate, over all ranks")
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="B",
                        help="videos per forward pass on each rank (memory only: the videos do not depend on it)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="noise seed, 0..2**64-1: video i depends on the seed and i alone, for any --batch-size "
                        "or rank count")
    parser.add_argument("--preset", choices=sorted(SAMPLING_PRESETS), default="fast",
                        help=f"the sampling protocol; {describe_presets()}. 'fast' (the default) is validated against "
                        "'ddim' on the built-in data only (docs/BENCHMARKS.md); report numbers with 'paper' "
                        "(docs/RECIPES.md, FVD). The flags below override it setting by setting")
    parser.add_argument("--content-sampler", choices=SAMPLERS, default=None,
                        help="the content stage's sampler (default: the preset's)")
    parser.add_argument("--content-steps", type=positive_int, default=None, metavar="N",
                        help="the content stage's sampling steps (default: the preset's)")
    parser.add_argument("--content-cfg-scale", type=guidance_scale, default=None, metavar="S",
                        help="guidance scale s, DiT's convention: eps = eps(null) + s * (eps(c) - eps(null)); "
                        "1 = none; the paper's (1 + w) eps(c) - w eps(null) is s = 1 + w. Default: the preset's "
                        "('paper': 5.0, the paper's w = 4; 'reference': 4.0), else the checkpoint's config "
                        "(configs/ucf101: 4.0)")
    parser.add_argument("--motion-sampler", choices=SAMPLERS, default=None,
                        help="the motion stage's sampler (default: the preset's)")
    parser.add_argument("--motion-steps", type=positive_int, default=None, metavar="N",
                        help="the motion stage's sampling steps (default: the preset's)")
    parser.add_argument("--motion-cfg-scale", type=guidance_scale, default=None, metavar="S",
                        help="guidance scale s of the motion model, the same convention as --content-cfg-scale. "
                        "Default: the preset's ('paper', 'reference': 1.0, unguided), else the checkpoint's config "
                        "(configs/ucf101: 1.0)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="on CUDA: 'auto' follows the motion run's train.mixed_precision and train.tf32; 'bf16' = "
                        "bf16 autocast (+ TF32), 'tf32' = fp32 with TF32 matmuls, 'fp32' = strict fp32. The CPU runs "
                        "fp32. Default: the preset's ('paper', 'reference': fp32), else 'auto'")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoisers and the decoder (pays off for thousands of videos on a GPU)")
    parser.add_argument("--out-dir", default="samples", metavar="DIR",
                        help="where the videos go: DIR/videos/NNNNNN_classCCC.mp4 (text-to-video: NNNNNN_<prompt>.mp4) "
                        "and the grid of the first --grid-videos, DIR/grid.mp4 and DIR/grid.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the videos and grid of an earlier run in --out-dir and its frame folders in "
                        "--frames-dir (refused without this flag)")
    parser.add_argument("--npz", default=None, metavar="FILE",
                        help="also write videos (N, T, H, W, 3) uint8, labels (N,), content_frames (N, H, W, 3) and "
                        "num_classes here")
    parser.add_argument("--frames-dir", default=None, metavar="DIR",
                        help="also write each video as a folder of PNG frames, DIR/000000/000.png ..., the layout "
                        "StyleGAN-V's metric scripts read")
    parser.add_argument("--no-mp4", action="store_true",
                        help="write no mp4 per video (for runs of thousands of videos); the grid is still written. "
                        "Needs --npz or --frames-dir")
    parser.add_argument("--grid-videos", type=positive_int, default=16, metavar="N",
                        help="how many of the first videos the grid shows")
    parser.add_argument("--fps", type=positive_int, default=8, help="frame rate of the written mp4 files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    run_reporting_user_errors(main, parse_args())
