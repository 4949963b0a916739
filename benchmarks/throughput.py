"""Training steps/s and videos/s per stage, sampling s/video, FLOP/s and MFU on whatever device runs it.

    python -m benchmarks.throughput --tiny                       # CPU-sized configs
    python -m benchmarks.throughput --batch-size 32 --compile    # configs/ucf101 on a GPU
    python -m benchmarks.throughput --stages motion --grad-checkpointing --steps 20

Each stage runs the real training runtime (training.run.TrainingRun: autocast, torch.compile via
`wrap`, fused AdamW, EMA, the non-finite check) on one fixed batch that already sits on the device,
so the numbers measure the model step, not data loading (benchmarks/bench_loader.py and
benchmarks/bench_latent_cache.py measure that). The diffusion stages encode clips with the frozen
autoencoder every step unless `--latent-cache` stands in for diffusion.latent_cache=true.
FLOPs per step come from benchmarks.flops (meta-device counts; the AE's LPIPS term is not
included). MFU = achieved FLOP/s / peak, the peak measured by a large bf16 matmul in the same run
(CUDA only). Prints markdown table rows for docs/BENCHMARKS.md.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`python benchmarks/throughput.py`): the repo root is not on the import path then, so run
    # again as the module `benchmarks.throughput` with the root on PYTHONPATH (the repo is not pip-installed).
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.throughput", *sys.argv[1:]])

import argparse
import datetime
import platform
import resource
import shlex
import tempfile
import time
from functools import partial
from typing import Callable, Optional

import torch

from benchmarks.flops import (
    DEFAULT_CONFIG_DIR,
    TINY_CONFIG_DIR,
    build_models,
    load_stage_configs,
    num_classes_of,
    per_video_flops,
    training_step_flops,
)
from models.ae_losses import build_ae_loss
from models.autoencoder import build_autoencoder
from models.dit import build_dit
from training.diffusion_stage import batch_latents, diffusion_losses, training_diffusion
from sampling.generation import (PRECISIONS, SAMPLING_PRESETS, CMDModels, Denoiser, SamplingOptions, compile_models,
                                 generate, set_precision)
from core.cli import HelpFormatter
from core.frozen_autoencoder import encode
from core.latent_stats import LatentScaler
from training.optim import lr_factor, make_ema, make_optimizer, set_lr, update_ema
from training.run import TrainingRun

STAGES = ("autoencoder", "content", "motion", "sampling")


# ---- machine and measurement helpers ----------------------------------------------------------------------
def machine_description(device: torch.device) -> str:
    text = f"{platform.platform()} ({platform.machine()}), {os.cpu_count()} CPUs"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(device: torch.device, size: int = 8192, repeats: int = 20) -> Optional[float]:
    """Measured bf16 matmul FLOP/s on a CUDA device (the MFU denominator); None elsewhere."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (it only grows)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"


def seconds_per_call(fn: Callable[[], object], calls: int, warmup: int, device: torch.device) -> float:
    """Wall time per call after `warmup` calls (compilation, allocator warm-up); one sync at each end."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


# ---- the training steps (the loop bodies of the training scripts) ------------------------------------------
def autoencoder_step_fn(run: TrainingRun, model, clips: torch.Tensor) -> Callable[[], None]:
    """One train_ae.py step on a fixed batch: forward under autocast, L1 (+ LPIPS) loss, backward, update."""
    cfg = run.cfg
    # A random LPIPS trunk costs what the ImageNet one costs, and needs no weights file.
    loss_fn = build_ae_loss(cfg.loss, cfg.model.channels, random_lpips_backbone=True).to(run.device)
    ema = make_ema(model)
    opt = make_optimizer(model.parameters(), cfg.optim, run.device)
    train_model = run.wrap(model)

    def step():
        with run.autocast():
            x_hat, _, _ = train_model(clips)
        loss, logs = loss_fn(clips, x_hat.float(), run.step, last_layer=model.last_layer())
        set_lr(opt, lr_factor(cfg.optim, run.step, cfg.train.max_steps))
        loss.backward()
        logs["grad_norm"], stepped = run.clip_and_step(train_model, opt)
        if stepped:
            update_ema(ema, model, cfg.train.ema_decay)
        run.count_step()
        run.log(logs, run.should_stop())

    return step


def diffusion_step_fn(run: TrainingRun, stage: str, model, ae) -> Callable[[dict], None]:
    """The loop body of train_{stage}_diffusion.py, from the same calls: the latents of the batch, the loss,
    backward, the optimizer and EMA updates, then the step's count, stop check and logging. Identity latent
    statistics cost what measured ones cost."""
    cfg = run.cfg
    ema, opt = make_ema(model), make_optimizer(model.parameters(), cfg.optim, run.device)
    train_model, diffusion = run.wrap(model), training_diffusion(cfg)
    scaler = LatentScaler.identity(ae).to(run.device)

    def step(batch):
        set_lr(opt, lr_factor(cfg.optim, run.step, cfg.train.max_steps))
        z_c, z_m, y = batch_latents(run, ae, batch, None)
        if stage == "motion":
            x0, cond = scaler.normalize("motion", z_m), {"y": y, "content": scaler.normalize("content", z_c)}
        else:
            x0, cond = scaler.normalize("content", z_c), {"y": y}
        losses = diffusion_losses(diffusion, train_model, x0, cond, run.autocast())
        losses["loss"].backward()
        losses["grad_norm"], stepped = run.clip_and_step(train_model, opt)
        if stepped:
            update_ema(ema, model, cfg.train.ema_decay)
        run.count_step()
        run.log(losses, run.should_stop())

    return step


def stage_overrides(args, results_dir: str) -> dict:
    """Dot-list overrides per stage for the benchmark's switches."""
    common = [f"train.results_dir={results_dir}", f"train.global_batch_size={args.batch_size}",
              f"train.compile={str(args.compile).lower()}", "train.max_steps=1000000000",
              f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}"]
    if args.mixed_precision is not None:
        common.append(f"train.mixed_precision={args.mixed_precision}")
    return {stage: list(common) for stage in ("autoencoder", "content", "motion")}


def frozen_autoencoder(configs: dict, device: torch.device):
    ae = build_autoencoder(configs["autoencoder"].model, configs["autoencoder"].data)
    return ae.to(device).eval().requires_grad_(False)


def random_clips(ae, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.rand(batch_size, *ae.clip_shape, device=device) * 2 - 1


# ---- the benchmark ----------------------------------------------------------------------------------------
def run_benchmark(args) -> list:
    """Measures the requested stages; returns one result dict per stage."""
    results = []
    with tempfile.TemporaryDirectory() as results_dir:
        configs = load_stage_configs(args.config_dir, stage_overrides(args, results_dir))
        classes = num_classes_of(configs)
        batch = args.batch_size
        train_flops = training_step_flops(configs, build_models(configs), batch_size=batch)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what TrainingRun picks
        peak = peak_matmul_flops(device)

        for stage in args.stages:
            if stage == "sampling":
                continue
            reset_peak_memory(device)
            torch.manual_seed(0)
            run = TrainingRun(configs[stage], stage=stage)
            ae = frozen_autoencoder(configs, run.device)
            clips = random_clips(ae, batch, run.device)
            if stage == "autoencoder":
                model = build_autoencoder(configs[stage].model, configs[stage].data).to(run.device)
                step = autoencoder_step_fn(run, model, clips)
                flops = train_flops["autoencoder"]
            else:
                model = build_dit(stage, configs[stage].model, classes, ae.content_shape, ae.motion_shape)
                model = model.to(run.device)
                diffusion_step = diffusion_step_fn(run, stage, model, ae)
                labels = torch.randint(0, classes, (batch,), device=run.device)
                if args.latent_cache:
                    z_c, z_m = encode(ae, clips, run.autocast())
                    fixed = {"z_c": z_c, "z_m": z_m, "y": labels}
                else:
                    fixed = {"x": clips, "y": labels}
                step = partial(diffusion_step, fixed)
                # training_step_flops counts the encode in the motion step only; the loop encodes for both.
                dit_flops = train_flops[stage] - (train_flops["motion_encode_part"] if stage == "motion" else 0)
                flops = dit_flops + (0 if args.latent_cache else train_flops["motion_encode_part"])
            seconds = seconds_per_call(step, args.steps, args.warmup, run.device)
            results.append(_result(stage, batch, seconds, flops, peak, run.device))
            run.finish()
            del run, model, step

        if "sampling" in args.stages:
            results.append(sampling_benchmark(configs, args, device, peak))
    return results


def sampling_benchmark(configs: dict, args, device: torch.device, peak: Optional[float]) -> dict:
    """class -> content frame -> motion latent -> decode, as sample.py does it (its --preset, --precision and
    --compile), timed per video."""
    reset_peak_memory(device)
    torch.manual_seed(0)
    classes = num_classes_of(configs)
    ae = frozen_autoencoder(configs, device)
    scaler = LatentScaler.identity(ae).to(device)  # as costly as measured statistics
    denoisers = {}
    for stage in ("content", "motion"):
        cfg = configs[stage]
        preset = SAMPLING_PRESETS[args.preset][stage]
        model = build_dit(stage, cfg.model, classes, ae.content_shape, ae.motion_shape)
        denoisers[stage] = Denoiser.from_config(model.to(device).eval().requires_grad_(False), cfg, scaler,
                                                SamplingOptions(args.sample_steps or preset.steps, preset.sampler))
    models = CMDModels(ae, motion=denoisers["motion"], content=denoisers["content"])
    set_precision(models, args.precision, device)
    if args.compile:
        compile_models(models)
    y = torch.randint(0, classes, (args.batch_size,), device=device)

    seconds = seconds_per_call(lambda: generate(models, y), max(1, args.steps // 5), 1, device)
    steps = {stage: denoisers[stage].sampler.diffusion.num_timesteps for stage in denoisers}
    flops = per_video_flops(configs, steps=steps)["cmd_total"]
    label = f"sampling ({args.preset}: {steps['content']}/{steps['motion']} steps, {args.precision})"
    return _result(label, args.batch_size, seconds, flops * args.batch_size, peak, device)


def _result(stage: str, batch: int, seconds: float, flops: float, peak: Optional[float], device) -> dict:
    achieved = flops / seconds
    return {"stage": stage, "batch": batch, "seconds_per_call": seconds, "calls_per_s": 1 / seconds,
            "videos_per_s": batch / seconds, "seconds_per_video": seconds / batch, "flops_per_call": flops,
            "achieved_flops": achieved, "mfu": achieved / peak if peak else None, "peak_memory": peak_memory(device)}


def format_rows(results: list, args, device: torch.device, command: str) -> str:
    date = datetime.date.today().isoformat()
    machine = machine_description(device)
    header = ("| date | machine | device | torch | configs | stage | batch | compile | grad ckpt | steps/s | "
              "videos/s | s/video | model TFLOP/s | MFU | peak memory |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        rate = "-" if r["stage"].startswith("sampling") else f"{r['calls_per_s']:.3g}"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {date} | {machine} | {device.type} | {torch.__version__} | {args.config_dir} | {r['stage']} | "
                     f"{r['batch']} | {args.compile} | {args.grad_checkpointing} | {rate} | {r['videos_per_s']:.3g} | "
                     f"{r['seconds_per_video']:.3g} | {r['achieved_flops'] / 1e12:.3g} | {mfu} | {r['peak_memory']} |")
    lines.append(f"\ncommand: `{command}`")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Training and sampling throughput per stage.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config-dir", default=None, help=f"stage YAMLs (default: {DEFAULT_CONFIG_DIR})")
    parser.add_argument("--tiny", action="store_true", help=f"use {TINY_CONFIG_DIR} (unless --config-dir is given)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch for training and sampling")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed training steps per stage (sampling: steps // 5 runs)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", action="store_true", help="train.compile=true; sampling: sample.py --compile")
    parser.add_argument("--grad-checkpointing", action="store_true", help="model.grad_checkpointing=true")
    parser.add_argument("--mixed-precision", default=None, choices=["bf16", "no"],
                        help="train.mixed_precision (default: the config's)")
    parser.add_argument("--latent-cache", action="store_true", help="diffusion stages train from pre-encoded latents")
    parser.add_argument("--preset", choices=sorted(SAMPLING_PRESETS), default="fast",
                        help="sample.py's preset for the sampling stage (sampler and steps per stage)")
    parser.add_argument("--sample-steps", type=int, default=None,
                        help="sampling steps for both stages (default: the preset's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="sample.py's --precision for sampling")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config_dir = args.config_dir or (TINY_CONFIG_DIR if args.tiny else DEFAULT_CONFIG_DIR)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = run_benchmark(args)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.throughput " + " ".join(shlex.quote(a) for a in given)
    print(format_rows(results, args, device, command.strip()))
    return results


if __name__ == "__main__":
    main()
