"""Autoencoder forward + backward time and peak memory per clip, for a config (CPU or CUDA).

    python -m benchmarks.bench_autoencoder --config configs/tiny/autoencoder.yaml --batch-size 8
    python -m benchmarks.bench_autoencoder --config configs/ucf101/autoencoder.yaml --batch-size 1 --steps 1 \
        [--grad-checkpointing]

Peak memory: CUDA max_memory_allocated; on CPU the process' peak RSS minus the RSS before the first
step (the model and its optimizer state are counted, the Python/torch runtime is not).
"""
import argparse
import datetime
import os
import platform
import resource
import time

import torch

from models.autoencoder import build_autoencoder
from core.cli import HelpFormatter
from core.config import load_config


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(config: str, batch_size: int, steps: int, grad_checkpointing: bool) -> dict:
    cfg = load_config("autoencoder", config,
                      ["data.data_path=unused", f"model.grad_checkpointing={grad_checkpointing}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_autoencoder(cfg.model, cfg.data).to(device).train()
    clips = torch.rand(batch_size, *model.clip_shape, device=device) * 2 - 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    base_rss = _rss_gib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        with autocast:
            x_hat, _, _ = model(clips)
        (x_hat.float() - clips).abs().mean().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:] if steps > 0 else seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else _rss_gib() - base_rss
    return {"device": str(device), "seconds_per_clip": sum(timed) / len(timed) / batch_size,
            "peak_gib_per_clip": peak / batch_size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "clip": "x".join(map(str, model.clip_shape))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--config", default="configs/tiny/autoencoder.yaml", help="the autoencoder config to time")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--grad-checkpointing", action="store_true", help="model.grad_checkpointing=true")
    return parser


def main():
    args = build_parser().parse_args()
    result = measure(args.config, args.batch_size, args.steps, args.grad_checkpointing)
    command = "python -m benchmarks.bench_autoencoder " + " ".join(
        f"--config {args.config} --batch-size {args.batch_size} --steps {args.steps}".split()
        + (["--grad-checkpointing"] if args.grad_checkpointing else []))
    print("| date | machine | CPUs | torch | threads | config | clip | params | batch | grad ckpt | "
          "fwd+bwd s per clip | peak memory per clip | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {datetime.date.today()} | {platform.platform()} ({result['device']}) | {os.cpu_count()} | "
          f"{torch.__version__} | {torch.get_num_threads()} | {args.config} | {result['clip']} | "
          f"{result['params_m']:.2f}M | {args.batch_size} | {args.grad_checkpointing} | "
          f"{result['seconds_per_clip']:.4g} | {result['peak_gib_per_clip']:.3g} GiB | `{command}` |")


if __name__ == "__main__":
    main()
