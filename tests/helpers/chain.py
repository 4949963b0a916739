"""The tiny training chain (autoencoder, motion, content, sample.py) on CPU-sized configs: its settings, the runs of
its scripts, and checkpoints derived from it."""
from pathlib import Path

import torch

from core import checkpoint as ckpt_io
from tests.helpers.processes import run_python, run_torchrun

TINY_DATA = ["data.resolution=[16,16]", "data.n_frames=10", "data.num_workers=0", "data.synthetic_size=64",
             "train.global_batch_size=4", "train.num_eval_videos=2"]
TINY_AE = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4"]
TINY_DIFFUSION = ["diffusion.sample_steps=4", "train.sample_every=2"]
# The latent-mode chain (configs/tiny_latent): data and step settings of its 2-step runs.
TINY_LATENT_RUN = ["data.resolution=[16,16]", "data.n_frames=4", "data.num_workers=0", "data.synthetic_size=16",
                   "train.global_batch_size=4", "train.num_eval_videos=2", "--max-steps", "2", "--ckpt-every", "2",
                   "--log-every", "1"]


def train(tmp, script, config, name, steps, *extra, nproc=1, check=True):
    args = [script, "--config", f"configs/tiny/{config}.yaml", "--results-dir", tmp, "--exp-name", name,
            "--max-steps", steps, "--ckpt-every", 2, "--log-every", 1, *TINY_DATA, *extra]
    if nproc > 1:
        return run_torchrun(nproc, args, check=check)
    return run_python(args, check=check)


def sample(chain, out, *extra, nproc=1, check=True):
    args = ["sample.py", "--ae-ckpt", chain["ae"], "--motion-ckpt", chain["motion"], "--content-steps", 4,
            "--motion-steps", 4, "--out-dir", out, "--quiet", *extra]
    if "--content-frame" not in extra:
        args += ["--content-ckpt", chain["content"]]
    return run_torchrun(nproc, args, check=check) if nproc > 1 else run_python(args, check=check)


def perturbed_autoencoder(ae_ckpt: Path, target: Path) -> Path:
    """The same autoencoder layout with other weights (what another training run would give)."""
    ckpt = ckpt_io.safe_torch_load(ae_ckpt)
    for name in ("model", "ema"):
        ckpt[name] = {key: value + 0.01 if value.is_floating_point() else value for key, value in ckpt[name].items()}
    torch.save(ckpt, target)
    return target
