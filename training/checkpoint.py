"""Self-describing checkpoints: atomic writes, prefix-tolerant loading, stage checks, resume lookup."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

STEP_FILE = re.compile(r"^(\d{7})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used where it was given; the message names the file."""


def atomic_torch_save(obj, path) -> None:
    """Writes `obj` to `path` so that a crash or a full disk never leaves a half-written file there.

    The data goes to a temp file in the same folder, is fsync'ed, then renamed over `path`
    (rename is atomic on POSIX filesystems); on failure the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def strip_prefixes(state_dict: dict) -> dict:
    """Removes DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers' prefixes from keys."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Loads one of our checkpoints (mmap=True reads tensors lazily: cheap for checks of its metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as exc:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this repo (no 'model'/'config' entries)")
    return ckpt


def load_stage_checkpoint(path, stage: str, map_location="cpu", mmap: bool = False) -> dict:
    """Loads a checkpoint and refuses one of another stage with one line saying what it got."""
    ckpt = load_checkpoint(path, map_location, mmap)
    got = ckpt.get("stage", ckpt["config"].get("stage"))
    if got != stage:
        raise CheckpointError(f"{path} is a '{got}' checkpoint, but a '{stage}' checkpoint is expected here")
    return ckpt


def model_weights(ckpt: dict, prefer_ema: bool = True) -> dict:
    """The weights to sample with: EMA when present and preferred, else the raw model."""
    state = ckpt["ema"] if prefer_ema and ckpt.get("ema") is not None else ckpt["model"]
    return strip_prefixes(state)


def step_checkpoints(ckpt_dir) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if STEP_FILE.match(p.name))


def prune_checkpoints(ckpt_dir, keep_last: int) -> None:
    """Keeps the newest `keep_last` step checkpoints (0 keeps all); `last.pt` is never touched."""
    if keep_last <= 0:
        return
    for old in step_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)


def latest_checkpoint_in_run(run_dir) -> Optional[Path]:
    """`last.pt` if it is readable, else the newest readable step checkpoint (a crash may have hit last.pt)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    candidates = [ckpt_dir / "last.pt"] + list(reversed(step_checkpoints(ckpt_dir)))
    best, best_step = None, -1
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            step = int(torch.load(candidate, map_location="cpu", weights_only=False, mmap=True).get("step", -1))
        except Exception:  # an unreadable file is skipped: the next older one is the fallback
            continue
        if step > best_step:
            best, best_step = candidate, step
    return best


def find_run_dirs(results_dir, stage: str) -> list[Path]:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    runs = [p for p in results_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    runs = [p for p in runs if _run_stage(p) == stage]
    return sorted(runs, key=lambda p: p.stat().st_mtime)


def _run_stage(run_dir: Path) -> Optional[str]:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(run_dir / "config.yaml").get("stage")
    except Exception:  # a foreign or damaged config.yaml: not one of ours
        return None


def resolve_resume(resume: Optional[str], results_dir, stage: str) -> Optional[Path]:
    """Maps `--resume` (a file, a run folder, or 'auto') to a checkpoint file, or None to start fresh.

    'auto' picks the newest run folder of this stage under results_dir that holds a readable
    checkpoint, and starts fresh when there is none (so a restarted job resumes by itself).
    """
    if not resume:
        return None
    if resume == "auto":
        for run_dir in reversed(find_run_dirs(results_dir, stage)):
            found = latest_checkpoint_in_run(run_dir)
            if found is not None:
                return found
        return None
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint_in_run(path)
        if found is None:
            raise CheckpointError(f"--resume {path}: no readable checkpoint in {path / 'checkpoints'}")
        check_resumable(found, stage)
        return found
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file or run folder")
    check_resumable(path, stage)
    return path


def check_resumable(path: Path, stage: str) -> None:
    """Refuses an unreadable checkpoint or one of another stage before the run touches any folder."""
    try:
        load_stage_checkpoint(path, stage, mmap=True)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}") from None


def remove_temp_files(ckpt_dir) -> None:
    """Deletes temp files that killed saves left behind (each as large as a checkpoint)."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for stale in ckpt_dir.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
