"""Sampling steps vs quality vs FLOPs vs wall time, measured with trained checkpoints on the built-in dataset.

    bash scripts/demo.sh                                   # trains the checkpoints (demo_output/runs)
    python -m benchmarks.sampler_quality                   # DDIM 50/100 vs DPM-Solver++(2M) at 10/15/20/25 steps
    python -m benchmarks.sampler_quality --steps 10 20 --seeds 0 1 --num-videos 64 --json out.json

Every setting samples the same labels (every class round-robin) with each seed and is judged by the built-in
classifier metric (evals/synthetic_quality.py): class accuracy and Fréchet distance of generated videos (content
and motion sampled) and of motion-only videos (real held-out content frames, sampled motion), each as the mean and
the spread (max - min) over the seeds. FLOPs per video come from benchmarks.flops (meta-device counts of the
checkpoints' configs); wall time is this machine's, per video, in one process, so ratios between rows hold while
absolute times depend on the machine. A setting is "within DDIM's spread" when each of its mean accuracies is at
least DDIM's mean minus DDIM's spread and each mean Fréchet distance at most DDIM's mean plus its spread.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file: re-run as the module with the repo root on PYTHONPATH (the repo is not pip-installed).
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.sampler_quality", *sys.argv[1:]])

import argparse
import datetime
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from benchmarks.flops import per_video_flops, report
from core.cli import HelpFormatter
from datasets.transforms import to_uint8_videos
from evals.synthetic_quality import evaluate_videos, load_or_train_classifier
from sampling.generation import (SAMPLING_PRESETS, CMDModels, SamplingOptions, generate, load_models,
                                 real_content_frames)

DEMO_RUNS = "demo_output/runs"


def settings_to_measure(steps: List[int]) -> Dict[str, dict]:
    """{name: {'content': SamplingOptions, 'motion': SamplingOptions}}: the DDIM preset, then DPM-Solver++(2M) with
    the same step count in both stages for each of `steps`."""
    settings = {"ddim": SAMPLING_PRESETS["ddim"]}
    for count in steps:
        options = SamplingOptions(steps=count, sampler="dpm++2m")
        settings[f"dpm++2m {count}/{count}"] = {"content": options, "motion": options}
    return settings


def sample_set(models, labels: torch.Tensor, seed: int, batch_size: int, content: Optional[torch.Tensor]):
    """uint8 videos of `labels` sampled with `seed` (video i from its own generators), and the seconds it took."""
    videos, start = [], time.perf_counter()
    for first in range(0, len(labels), batch_size):
        indices = list(range(first, min(first + batch_size, len(labels))))
        given = None if content is None else content[indices]
        decoded, _ = generate(models, labels[indices], seed=seed, indices=indices, content=given)
        videos.append(to_uint8_videos(decoded))
    return np.concatenate(videos), time.perf_counter() - start


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    settings = settings_to_measure(args.steps)
    probe = load_models(args.ae_ckpt, args.motion_ckpt, args.content_ckpt)
    num_classes = probe.num_classes
    labels_list = [i % num_classes for i in range(args.num_videos)]
    labels = torch.tensor(labels_list)
    motion_cfg = probe.motion.cfg
    data = motion_cfg.data
    classifier = load_or_train_classifier(tuple(data.resolution), int(data.n_frames), num_classes)
    real = real_content_frames(probe.ae, data, int(motion_cfg.train.global_seed), labels_list, "cpu")
    configs = {"autoencoder": probe.ae_cfg, "content": probe.content.cfg, "motion": probe.motion.cfg}
    rows = {}
    for name, options in settings.items():
        models = CMDModels(probe.ae, ae_cfg=probe.ae_cfg, motion=probe.motion.with_options(options["motion"]),
                           content=probe.content.with_options(options["content"]))
        steps = {"content": models.content.sampler.diffusion.num_timesteps,
                 "motion": models.motion.sampler.diffusion.num_timesteps}
        flops = per_video_flops(configs, steps=steps)["cmd_total"]
        runs = {"generated": [], "motion_only": []}
        seconds = []
        for seed in args.seeds:
            videos, took = sample_set(models, labels, seed, args.batch_size, None)
            seconds.append(took / len(labels))
            runs["generated"].append(evaluate_videos(videos, labels.numpy(), classifier))
            videos, _ = sample_set(models, labels, seed, args.batch_size, real)
            runs["motion_only"].append(evaluate_videos(videos, labels.numpy(), classifier))
        row = {"content": f"{options['content'].sampler} {steps['content']}",
               "motion": f"{options['motion'].sampler} {steps['motion']}", "flops": flops,
               "seconds_per_video": float(np.mean(seconds))}
        for kind, results in runs.items():
            for metric in ("accuracy", "frechet"):
                values = [r[metric] for r in results]
                row[f"{kind}_{metric}"] = {"mean": float(np.mean(values)), "spread": float(np.ptp(values)),
                                           "values": values}
        rows[name] = row
        print(format_row(name, row, rows["ddim"]), flush=True)
    baseline = rows["ddim"]
    for name, row in rows.items():
        row["within_ddim_spread"] = within_spread(row, baseline)
        row["flops_ratio"] = baseline["flops"] / row["flops"]
        row["time_ratio"] = baseline["seconds_per_video"] / row["seconds_per_video"]
    return {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores, {args.threads} torch threads", "torch": torch.__version__,
            "checkpoints": {"ae": args.ae_ckpt, "motion": args.motion_ckpt, "content": args.content_ckpt},
            "num_videos": args.num_videos, "seeds": args.seeds, "rows": rows}


def within_spread(row: dict, baseline: dict) -> bool:
    """Each mean accuracy at least DDIM's mean minus its spread, each mean Fréchet at most its mean plus spread."""
    for kind in ("generated", "motion_only"):
        accuracy, frechet = row[f"{kind}_accuracy"], row[f"{kind}_frechet"]
        base_accuracy, base_frechet = baseline[f"{kind}_accuracy"], baseline[f"{kind}_frechet"]
        if accuracy["mean"] < base_accuracy["mean"] - base_accuracy["spread"]:
            return False
        if frechet["mean"] > base_frechet["mean"] + base_frechet["spread"]:
            return False
    return True


def _cell(stat: dict, digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['spread'] / 2:.{digits}f}"


def format_row(name: str, row: dict, baseline: dict) -> str:
    within = row.get("within_ddim_spread")
    return (f"| {name} | {row['content']} | {row['motion']} | {_cell(row['generated_accuracy'], 3)} | "
            f"{_cell(row['generated_frechet'], 1)} | {_cell(row['motion_only_accuracy'], 3)} | "
            f"{_cell(row['motion_only_frechet'], 1)} | {row['flops'] / 1e9:.3f} | "
            f"{baseline['flops'] / row['flops']:.2f}x | {row['seconds_per_video'] * 1e3:.0f} | "
            f"{baseline['seconds_per_video'] / row['seconds_per_video']:.2f}x |"
            + ("" if within is None else f" {'yes' if within else 'no'} |"))


def format_table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"{result['num_videos']} videos per seed, seeds {result['seeds']}; {result['machine']}; torch "
             f"{result['torch']}; {result['date']}. Cells: mean ± half the spread (max - min) over the seeds.", "",
             "| setting | content | motion | generated accuracy | generated Fréchet | motion-only accuracy | "
             "motion-only Fréchet | GFLOPs / video | FLOPs vs DDIM | ms / video (CPU) | time vs DDIM | within DDIM's "
             "spread |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [format_row(name, row, rows["ddim"]) for name, row in rows.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sampling steps vs quality vs FLOPs vs wall time on the built-in "
                                     "data.", formatter_class=HelpFormatter)
    parser.add_argument("--ae-ckpt", default=f"{DEMO_RUNS}/autoencoder/checkpoints/last.pt",
                        help="the autoencoder checkpoint (scripts/demo.sh trains it)")
    parser.add_argument("--motion-ckpt", default=f"{DEMO_RUNS}/motion/checkpoints/last.pt",
                        help="the motion DiT checkpoint")
    parser.add_argument("--content-ckpt", default=f"{DEMO_RUNS}/content/checkpoints/last.pt",
                        help="the content DiT checkpoint")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25],
                        help="DPM-Solver++(2M) step counts, the same in both stages")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="sample.py seeds; each setting samples once per seed")
    parser.add_argument("--num-videos", type=int, default=128, help="videos per setting and seed")
    parser.add_argument("--batch-size", type=int, default=64, help="videos per forward pass")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    for path in (args.ae_ckpt, args.motion_ckpt, args.content_ckpt):
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such checkpoint (bash scripts/demo.sh trains them, or pass --*-ckpt)")
    result = measure(args)
    report(format_table(result), result, args.json)
    return result


if __name__ == "__main__":
    main()
