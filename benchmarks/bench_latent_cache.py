"""Diffusion-stage training speed from clips (encode every step) versus from the latent cache (diffusion.latent_cache).

    python -m benchmarks.bench_latent_cache                      # configs/tiny, motion stage, CPU
    python -m benchmarks.bench_latent_cache --stage content --steps 50

Both loops are the loop body of the stage's training script fed by the run's own DataLoader
(`TrainingRun.loader`), so data loading, the frozen encoder and the DiT step are all inside the
timing; only the source differs: the clip dataset, or the LatentCache that `run_latent_cache`
writes. The one-time cost of building the cache is reported too, with the number of steps after
which it has paid for itself. The autoencoder has random weights: its cost, not its quality, matters here.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.throughput import diffusion_step_fn
from datasets import build_dataset
from models.autoencoder import build_autoencoder
from models.dit import build_dit
from core.cli import HelpFormatter
from core.config import load_config
from core.latent_cache import LatentEncoder
from training.run import TrainingRun
from training.run_latents import run_latent_cache


def steps_per_second(step, batches, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    return steps / (time.perf_counter() - start)


def measure(args) -> dict:
    config_dir = Path(args.config_dir)
    with tempfile.TemporaryDirectory() as folder:
        ae_cfg = load_config("autoencoder", str(config_dir / "autoencoder.yaml"))
        torch.manual_seed(0)
        ae = build_autoencoder(ae_cfg.model, ae_cfg.data).eval().requires_grad_(False)
        ae_path = Path(folder) / "ae.pt"
        torch.save(ae.state_dict(), ae_path)  # the cache key is derived from this file
        overrides = [f"ae_ckpt={ae_path}", f"train.results_dir={folder}", "train.max_steps=1000000000",
                     f"data.synthetic_size={args.synthetic_size}",
                     f"diffusion.latent_cache_clips_per_video={args.clips_per_video}"]
        if args.batch_size:
            overrides.append(f"train.global_batch_size={args.batch_size}")
        if args.num_workers is not None:
            overrides.append(f"data.num_workers={args.num_workers}")
        cfg = load_config(args.stage, str(config_dir / f"{args.stage}.yaml"), overrides)
        run = TrainingRun(cfg, stage=args.stage)
        ae = ae.to(run.device)
        dataset = build_dataset(cfg.data, cfg.data.split, cfg.train.global_seed)
        model = build_dit(args.stage, cfg.model, dataset.num_classes, ae.content_shape, ae.motion_shape).to(run.device)
        step = diffusion_step_fn(run, args.stage, model, ae)

        from_clips = steps_per_second(step, run.loader(dataset), args.steps, args.warmup)
        start = time.perf_counter()
        cache = run_latent_cache(run, LatentEncoder.autoencoder(ae, ae_path), dataset, cfg.data, args.clips_per_video)
        build_seconds = time.perf_counter() - start
        from_cache = steps_per_second(step, run.loader(cache), args.steps, args.warmup)
        run.finish()
    saved_per_step = 1 / from_clips - 1 / from_cache
    return {"config_dir": str(config_dir), "stage": args.stage, "batch": run.batch_size,
            "num_workers": int(cfg.data.num_workers),
            "clip": f"{cfg.data.n_frames}x{'x'.join(map(str, cfg.data.resolution))}",
            "dataset": f"{cfg.data.dataset_name} ({len(dataset)} videos)", "cached_clips": len(cache),
            "from_clips_steps_per_s": from_clips, "from_cache_steps_per_s": from_cache,
            "speed_up": from_cache / from_clips, "cache_build_s": build_seconds,
            "break_even_steps": build_seconds / saved_per_step if saved_per_step > 0 else float("inf")}


def format_row(result: dict, command: str) -> str:
    header = ("| date | machine | CPUs | torch | configs | stage | dataset | clip | batch | loader workers | "
              "from clips steps/s | from cache steps/s | speed-up | cache build (clips, s) | break-even steps |")
    row = (f"| {datetime.date.today().isoformat()} | {platform.platform()} ({platform.machine()}) | "
           f"{os.cpu_count()} | {torch.__version__} | {result['config_dir']} | {result['stage']} | "
           f"{result['dataset']} | {result['clip']} | "
           f"{result['batch']} | {result['num_workers']} | {result['from_clips_steps_per_s']:.2f} | "
           f"{result['from_cache_steps_per_s']:.2f} | {result['speed_up']:.2f}x | "
           f"{result['cached_clips']} clips, {result['cache_build_s']:.1f} s | {result['break_even_steps']:.0f} |")
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1), row, "", f"command: `{command}`"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Diffusion training steps/s from clips vs from the latent cache.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config-dir", default="configs/tiny", help="the folder of the stage YAMLs")
    parser.add_argument("--stage", default="motion", choices=["motion", "content"], help="the diffusion stage to time")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps from each source")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.global_batch_size")
    parser.add_argument("--num-workers", type=int, default=None, help="default: the config's data.num_workers")
    parser.add_argument("--synthetic-size", type=int, default=256, help="videos in the synthetic dataset (cache size)")
    parser.add_argument("--clips-per-video", type=int, default=1,
                        help="clips the cache encodes per video (diffusion.latent_cache_clips_per_video)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    command = "python -m benchmarks.bench_latent_cache " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(format_row(result, command.strip()))
    return result


if __name__ == "__main__":
    main()
