"""Motion-latent ablation: which autoencoder variants keep z_m alive on the built-in data (swap gap, PSNR).

    python benchmarks/ae_motion_ablation.py                       # all variants, 600 steps each (~3 min each on 1 core)
    python benchmarks/ae_motion_ablation.py --variants centred-mse paper-l1 --steps 1000

Every variant starts from configs/tiny/autoencoder.yaml (same data, model size, batch, optimiser, seed) and
changes only what its name says; measures come from evals.recon.motion_health on 64 held-out clips,
with the trained weights (no EMA), after `--steps` optimiser steps. Prints one markdown row per variant.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file: re-run as the module with the repo root on PYTHONPATH, as benchmarks/throughput.py does.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.ae_motion_ablation", *sys.argv[1:]])

import argparse
import datetime
import platform
import time

import torch

from datasets.synthetic import SyntheticMovingShapes
from evals.recon import motion_health
from models.ae_losses import build_ae_loss
from models.autoencoder import build_autoencoder
from core.cli import HelpFormatter
from core.config import load_config

# name -> (config overrides, lr warm-up steps, what it tests)
VARIANTS = {
    "paper-l1": (["model.motion_centering=false", "loss.l1_weight=1.0", "loss.mse_weight=0.0"], 0,
                 "the paper's motion head (pool, 1x1 conv, tanh), L1 loss"),
    "paper-l1-warmup": (["model.motion_centering=false", "loss.l1_weight=1.0", "loss.mse_weight=0.0"], 200,
                        "same, linear lr warm-up over 200 steps"),
    "paper-mse": (["model.motion_centering=false"], 0, "the paper's motion head, MSE loss"),
    "centred-l1": (["loss.l1_weight=1.0", "loss.mse_weight=0.0"], 0, "pooled features centred over time, L1 loss"),
    "centred-mse": ([], 0, "pooled features centred over time, MSE loss (configs/tiny)"),
}


def run_variant(name: str, steps: int, seed: int) -> dict:
    overrides, warmup, _ = VARIANTS[name]
    cfg = load_config("autoencoder", "configs/tiny/autoencoder.yaml", overrides)
    torch.manual_seed(seed)
    data = cfg.data
    train_set = SyntheticMovingShapes(data.synthetic_size, data.num_classes, data.resolution, data.n_frames, "train")
    test_set = SyntheticMovingShapes(64, data.num_classes, data.resolution, data.n_frames, "test")
    clips = torch.stack([train_set[i]["x"] for i in range(len(train_set))])
    held_out = torch.stack([test_set[i]["x"] for i in range(len(test_set))])
    model = build_autoencoder(cfg.model, cfg.data)
    loss_fn = build_ae_loss(cfg.loss, cfg.model.channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        x = clips[torch.randint(0, len(clips), (cfg.train.global_batch_size,), generator=generator)]
        x_hat, _, _ = model(x)
        loss, _ = loss_fn(x, x_hat, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        health = {key: float(value.mean()) for key, value in motion_health(model.eval(), held_out).items()}
    return {**health, "seconds": seconds}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                        help="the autoencoder variants to train and measure")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per variant")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the data")
    return parser


def main():
    args = build_parser().parse_args()
    print(f"{datetime.date.today()} | {platform.platform()} | {os.cpu_count()} CPUs | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | {args.steps} steps, seed {args.seed}")
    print("| variant | what changes | PSNR (dB) | static baseline (dB) | swap gap (dB) | z_m spread | saturated | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.variants:
        r = run_variant(name, args.steps, args.seed)
        print(f"| {name} | {VARIANTS[name][2]} | {r['psnr']:.2f} | {r['psnr_temporal_mean']:.2f} | "
              f"{r['swap_gap']:.2f} | {r['zm_spread']:.4f} | {100 * r['zm_saturated']:.1f}% | {r['seconds']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
