"""Checkpoints of a run: writing them atomically, and restoring weights, optimizer settings and RNG states."""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Optional
import numpy as np
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from core import checkpoint as ckpt_io
from core.cli import RunError
from core.distributed import DistInfo, broadcast_object, on_main


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """The RNG states as tensors and plain values only, so that checkpoints load weights-only."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple: a checkpoint from before the states were stored as tensors
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def samples_seen(ckpt: dict) -> int:
    """Training clips drawn by all ranks together before the checkpoint; older checkpoints recorded one rank's
    position (data_position, with the batch size never changed)."""
    if "samples_seen" in ckpt:
        return int(ckpt["samples_seen"])
    position = ckpt.get("data_position", ckpt["step"] * ckpt.get("batch_size_per_rank", 0))
    return int(position) * int(ckpt.get("world_size", 1))


def unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DDP):
            model = model.module
        else:
            return model


def checkpoint_state(modules: dict, optimizers: dict, **meta) -> dict:
    """The modules' weights (unwrapped from DDP and torch.compile), the optimizers' states and `meta`."""
    state = {name: unwrap(m).state_dict() for name, m in modules.items()}
    state.update({name: opt.state_dict() for name, opt in optimizers.items()})
    state.update(meta)
    return state


def write_checkpoint(state: dict, ckpt_dir: Path, step: int, keep_last: int, logger: logging.Logger) -> tuple:
    """Writes ckpt_dir/{step:07d}.pt atomically and makes last.pt name it; returns (its path, None) or (None, the
    error to report on every rank).

    The checkpoint is written once: last.pt becomes a hard link to the step file, swapped in by rename (a full
    copy where the filesystem has no hard links), so it always names the newest complete checkpoint.
    """
    path = ckpt_dir / f"{step:07d}.pt"
    target = path
    try:
        ckpt_io.atomic_torch_save(state, path)
        target = ckpt_dir / "last.pt"
        ckpt_io.atomic_link(path, target)
    except (OSError, RuntimeError) as exc:  # a full disk surfaces as either (torch wraps the OSError)
        cause = exc if isinstance(exc, OSError) else (exc.__cause__ or exc.__context__ or exc)
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        free = shutil.disk_usage(ckpt_dir).free / 2**30
        return path, (f"cannot write checkpoint {target}: {reason} ({free:.2f} GiB free); "
                      f"the previous checkpoints in {ckpt_dir} are intact")
    ckpt_io.prune_checkpoints(ckpt_dir, keep_last)
    logger.info(f"saved checkpoint {path}")
    return path, None


def load_states(path: Path, stage: str, modules: dict, optimizers: dict, optim_cfg,
                logger: logging.Logger) -> dict:
    """The checkpoint at `path`, its weights and optimizer states loaded into `modules` and `optimizers`."""
    ckpt = ckpt_io.load_stage_checkpoint(path, stage)
    for name, module in modules.items():
        if ckpt.get(name) is None:
            raise RunError(f"{path} has no '{name}' weights to resume from")
        ckpt_io.load_weights(module, ckpt_io.strip_prefixes(ckpt[name]), path, f"'{name}' weights")
    for name, optimizer in optimizers.items():
        if ckpt.get(name) is not None:
            optimizer.load_state_dict(ckpt[name])
            if name == "opt":
                apply_optimizer_settings(optimizer, optim_cfg, ckpt["config"], logger)
    return ckpt


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, optim_cfg, old_cfg: dict,
                             logger: logging.Logger) -> None:
    """The rule for optimiser settings changed on resume: they apply, and the log says so.

    load_state_dict restores the run's old lr/betas/weight decay into the param groups; without this the
    command's new values would be recorded in the checkpoint's config while the old ones kept training.
    The discriminator's optimiser keeps its own learning rate (loss.disc_lr), set where it is built.
    """
    wanted = {"lr": float(optim_cfg.lr), "base_lr": float(optim_cfg.lr),
              "betas": tuple(float(b) for b in optim_cfg.betas), "weight_decay": float(optim_cfg.weight_decay)}
    for group in optimizer.param_groups:
        group.update(wanted)
    old = old_cfg.get("optim", {})
    for key, value in (("lr", optim_cfg.lr), ("betas", list(optim_cfg.betas)),
                       ("weight_decay", optim_cfg.weight_decay)):
        if key in old and old[key] != value:
            logger.info(f"resume: optim.{key} {old[key]} -> {value} (applied)")


def restore_progress(ckpt: dict, batch: int, vae: Optional[str], path: Path, dist: DistInfo,
                     logger: logging.Logger, reseed) -> tuple:
    """(step, samples seen) of the checkpoint, resumed with global batch size `batch` and the VAE of fingerprint
    `vae` (None in pixel mode). Sets this rank's RNG states from it, or calls reseed(step) when it holds another
    world size's; logs what the resume changes or cannot check."""
    step, samples = int(ckpt["step"]), samples_seen(ckpt)
    old_batch = (ckpt["config"].get("train") or {}).get("global_batch_size", batch)
    if old_batch != batch:
        logger.info(f"resume: train.global_batch_size {old_batch} -> {batch} "
                    f"(applied); the data stream continues at clip {samples}")
    rng = ckpt.get("rng") or []
    if len(rng) == dist.world_size:
        set_rng_state(rng[dist.rank])
    else:
        logger.warning(f"resume: world size changed ({len(rng)} -> {dist.world_size}); RNG reseeded")
        reseed(step)
    if vae and not ckpt["config"].get("vae_fingerprint"):
        logger.warning(f"resume: {path} records no VAE fingerprint (written before VAEs were "
                       f"recorded), so its VAE cannot be checked; the run continues with the VAE of weights "
                       f"{vae}, which its checkpoints record from now on")
    return step, samples


def find_resume(resume: Optional[str], results_dir: str, cfg, stage: str, dist: DistInfo) -> tuple:
    """(the checkpoint `resume` (train.resume) names, resolved on rank 0, and the notes to log about it): a run
    whose settings match `cfg`. With ae_ckpt 'auto' a resumed run goes on with the autoencoder it recorded."""
    notes = []
    path = on_main(dist, lambda: ckpt_io.resolve_resume(resume, results_dir, stage, cfg, notes))
    notes = broadcast_object(notes)
    if path is not None and OmegaConf.select(cfg, "ae_ckpt") == "auto":
        # 'auto' found the run's autoencoder when the run started; a newer one found today is another latent space.
        recorded = on_main(dist, lambda: ckpt_io.load_checkpoint(path, mmap=True)["config"].get("ae_ckpt"))
        if recorded not in (None, "auto"):
            OmegaConf.update(cfg, "ae_ckpt", recorded, merge=False)
    return path, notes
