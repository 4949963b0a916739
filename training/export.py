"""Exports a checkpoint's weights for sharing: one .safetensors file with the EMA weights and what loading them needs.

    python -m training.export results/ae/checkpoints/last.pt ae.safetensors
    python -m training.export results/motion/checkpoints/last.pt motion.safetensors
    python sample.py --ae-ckpt ae.safetensors --motion-ckpt motion.safetensors --content-ckpt content.safetensors ...

A .pt checkpoint is a pickle: loading one from someone else means trusting its author (here it is only ever loaded
weights-only), and it carries the optimizer state (twice the weights) and RNG states that only a resumed run needs.
The export holds tensors and string metadata only, so opening it cannot run code:

  tensors   the EMA weights (the raw model's when the run kept no EMA), contiguous, under their module names;
            a diffusion checkpoint's latent statistics under `latent_stats.` (content_mean, content_std, ...)
  metadata  cmd.format, cmd.stage, cmd.step, cmd.weights ("ema" or "model"), cmd.config (the run's config as JSON;
            a diffusion stage's ae_ckpt and ae_fingerprint are in it), cmd.weights_fingerprint, and for a
            diffusion stage cmd.ae_fingerprint (the autoencoder it was trained with, also in the config); in
            latent mode cmd.vae_fingerprint (the VAE's weights, also in the config)

Every option that takes a checkpoint to sample or encode with (--ae-ckpt, --motion-ckpt, --content-ckpt) accepts
the file; --resume refuses it, since a run cannot continue without its optimizer state. The weights' fingerprint
is the original's, so denoiser checkpoints trained with the original autoencoder accept its export.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file (python training/export.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from core.files import check_creatable, write_output
from core.checkpoint import (
    EXPORT_FORMAT,
    LATENT_STATS_PREFIX,
    META_AE_FINGERPRINT,
    META_VAE_FINGERPRINT,
    META_CONFIG,
    META_FORMAT,
    META_STAGE,
    META_STEP,
    META_WEIGHTS,
    META_WEIGHTS_FINGERPRINT,
    SAFETENSORS_SUFFIX,
    CheckpointError,
    load_checkpoint,
    model_weights,
    weights_fingerprint,
)
from core.cli import HelpFormatter


def export_tensors(ckpt: dict, path) -> tuple[dict, dict]:
    """(tensors, metadata) of the export of a loaded checkpoint `ckpt` read from `path` (named in errors)."""
    stage = ckpt.get("stage", ckpt["config"].get("stage"))
    if not stage:
        raise CheckpointError(f"{path} does not record its stage; it was not written by a training run of this repo")
    kind = "ema" if ckpt.get("ema") is not None else "model"
    # Copies, each contiguous and owning its memory: safetensors stores a tensor's bytes as they lie, and refuses
    # tensors that share storage (tied weights) or views of a larger one (a memory-mapped checkpoint).
    tensors = {key: value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for key, value in model_weights(ckpt, prefer_ema=True).items()}
    clash = next((key for key in tensors if key.startswith(LATENT_STATS_PREFIX)), None)
    if clash:
        raise CheckpointError(f"{path}: weight '{clash}' starts with '{LATENT_STATS_PREFIX}', the prefix the export "
                              f"keeps for the latent statistics")
    stats = ckpt.get("latent_stats")
    if stats is not None:
        if not isinstance(stats, dict) or not all(torch.is_tensor(value) for value in stats.values()):
            raise CheckpointError(f"{path}: its latent_stats are not a dict of tensors")
        tensors.update({LATENT_STATS_PREFIX + key: value.detach().to("cpu").float().contiguous().clone()
                        for key, value in stats.items()})
    config = ckpt["config"]
    metadata = {"format": "pt", META_FORMAT: EXPORT_FORMAT, META_STAGE: str(stage),
                META_STEP: str(int(ckpt.get("step", -1))),
                META_WEIGHTS: kind, META_CONFIG: json.dumps(config, sort_keys=True),
                META_WEIGHTS_FINGERPRINT: weights_fingerprint(model_weights(ckpt, prefer_ema=True))}
    if config.get("ae_fingerprint"):
        metadata[META_AE_FINGERPRINT] = str(config["ae_fingerprint"])
    if config.get("vae_fingerprint"):
        metadata[META_VAE_FINGERPRINT] = str(config["vae_fingerprint"])
    return tensors, metadata


def export_checkpoint(ckpt_path, out_path, overwrite: bool = False) -> str:
    """Writes the export of `ckpt_path` to `out_path` atomically; returns the line that describes it."""
    from safetensors.torch import save as safetensors_bytes

    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    if out_path.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{out_path}: the export is a safetensors file; give it the {SAFETENSORS_SUFFIX} suffix")
    if out_path.is_dir():
        raise CheckpointError(f"{out_path} is a folder; give the export a file name (nothing was written)")
    if out_path.exists() and not overwrite:
        raise CheckpointError(f"{out_path} exists; pass --overwrite to replace it (nothing was written)")
    if out_path.exists() and out_path.resolve() == ckpt_path.resolve():
        raise CheckpointError(f"{out_path} is the checkpoint being exported; choose another output file")
    check_creatable(out_path, "export to", folder=False)  # a file in the way, no permission: before any reading
    ckpt = load_checkpoint(ckpt_path, mmap=True)  # mmap: the optimizer state is never read
    tensors, metadata = export_tensors(ckpt, ckpt_path)
    del ckpt
    write_output(out_path, lambda handle: handle.write(safetensors_bytes(tensors, metadata=metadata)), "export to")
    size = sum(value.numel() * value.element_size() for value in tensors.values()) / 2**20
    return (f"exported the {metadata[META_WEIGHTS]} weights of {ckpt_path} ({metadata[META_STAGE]}, step "
            f"{metadata[META_STEP]}, {len(tensors)} tensors, {size:.1f} MiB, weights "
            f"{metadata[META_WEIGHTS_FINGERPRINT]}) to {out_path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.export", formatter_class=HelpFormatter,
                                     description="Export a checkpoint's EMA weights and config as .safetensors")
    parser.add_argument("checkpoint", help="a .pt checkpoint written by a training run")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace `out` if it exists")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out, args.overwrite))


if __name__ == "__main__":
    from core.cli import run_reporting_user_errors

    run_reporting_user_errors(main)
