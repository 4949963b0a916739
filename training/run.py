"""The runtime every entry script shares: run folder, logging, seeding, resume, optimizer steps, checkpoints."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from core import checkpoint as ckpt_io
from datasets.build import check_data_path
from core.cli import RunError, cancel_on_failure, on_failure
from core.config import config_to_dict, to_yaml
from core.files import claim, release, write_output
from core.data import make_loader
from core.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    setup_distributed,
)


STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a received SIGTERM/SIGINT


def create_logger(run_dir: Optional[Path], is_main: bool, name: str = "cmd") -> logging.Logger:
    """Rank 0 logs to stdout and <run_dir>/log.txt; other ranks only report warnings."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if is_main:
        logger.setLevel(logging.INFO)
        handlers = [logging.StreamHandler(sys.stdout)]
        if run_dir is not None:
            handlers.append(logging.FileHandler(Path(run_dir) / "log.txt"))
        # Library modules (datasets, ...) log through the root logger; show their messages too.
        logging.getLogger().setLevel(logging.INFO)
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
            logging.getLogger().addHandler(handler)
    else:
        logger.setLevel(logging.WARNING)
        logger.addHandler(logging.NullHandler())
    return logger


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def make_ema(model: nn.Module) -> nn.Module:
    ema = deepcopy(model).eval()
    ema.requires_grad_(False)
    update_ema(ema, model, decay=0.0)
    return ema


def lr_factor(optim_cfg, step: int, max_steps: int) -> float:
    """The multiplier of optim.lr for the update that step `step` (0-based) makes: a linear warm-up from
    1/warmup_steps to 1 over the first warmup_steps updates, then 1, or, with optim.decay, a linear or cosine
    decay over the last decay_fraction of the max_steps updates (at most all after the warm-up) that reaches
    min_lr_ratio at the last one. As a fraction, the decay keeps its shape when --max-steps changes.

    A decay to the end of a short run lets the final weights settle instead of carrying the noise of a constant
    rate (the cosine schedule of Loshchilov & Hutter, SGDR, 2017; the linear one of "warmup-stable-decay" runs).
    """
    factor = 1.0
    warmup = int(optim_cfg.warmup_steps)
    if step < warmup:
        factor = (step + 1) / warmup
    if optim_cfg.decay == "none":
        return factor
    decay_steps = max(min(round(float(optim_cfg.decay_fraction) * max_steps), max_steps - warmup), 1)
    start = max_steps - decay_steps
    if step < start:
        return factor
    progress = min((step - start + 1) / decay_steps, 1.0)  # the last update (step max_steps - 1) has progress 1
    shape = progress if optim_cfg.decay == "linear" else (1.0 - math.cos(math.pi * progress)) / 2.0
    floor = float(optim_cfg.min_lr_ratio)
    return factor * (1.0 - (1.0 - floor) * shape)


def make_optimizer(params, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    fused = bool(optim_cfg.fused) and device.type in ("cuda", "cpu")  # fused kernels exist for both
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                             weight_decay=optim_cfg.weight_decay, fused=fused)


def _rng_state() -> dict:
    """The RNG states as tensors and plain values only, so that checkpoints load weights-only."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple: a checkpoint from before the states were stored as tensors
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RunFolder(NamedTuple):
    path: Path
    created: bool  # by this start: a start that fails before training removes it again


def claim_run_dir(results: Path, stage: str, exp_name: Optional[str] = None) -> RunFolder:
    """A run folder under `results` that belongs to this process alone: `exp_name`, or the next NNN-stage.

    mkdir is atomic, so two runs started at the same instant in one results folder cannot both take the same
    NNN-stage: the loser takes the next free index. A named folder is claimed (core.files.claim) before anything in
    it is looked at or written: a second start with the same --exp-name, or a --resume of a run whose process is
    alive, stops with one line naming the folder and that process, and the first run's files are untouched. The
    claim ends with the process, a kill -9 included, so a requeued job's restart takes the folder over.
    """
    results.mkdir(parents=True, exist_ok=True)
    if exp_name:
        run_dir = results / exp_name
        created = not run_dir.exists()
        held = claim(run_dir, "--exp-name: the run folder", "choose another --exp-name, or wait for that run to end")
        if ckpt_io.latest_checkpoint_in_run(run_dir) is not None:
            held.release()
            raise RunError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it or "
                           f"choose another --exp-name (nothing was overwritten)")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)  # a requeued job whose first save was killed
        ckpt_io.remove_temp_files(run_dir / "checkpoints")
        return RunFolder(run_dir, created)
    taken = [int(p.name.split("-", 1)[0]) for p in results.iterdir() if p.name.split("-", 1)[0].isdigit()]
    index = max(taken, default=-1) + 1
    while True:
        run_dir = results / f"{index:03d}-{stage}"
        try:
            run_dir.mkdir()
        except FileExistsError:
            index += 1
            continue
        claim(run_dir, "the run folder", "start the run again")  # its own new folder: only a --resume can meet it
        (run_dir / "checkpoints").mkdir()
        return RunFolder(run_dir, True)


class TrainingRun:
    """One training run of one stage: everything but the model, the loss and the loop body.

    Use: build it first, build the model, `restore(...)`, `wrap(model)`, `loader(dataset)`, then the loop, whose
    stop check is made once per step and passed on:

        last = run.should_stop()  # True already for a run resumed at its last step
        while not last:
            ...forward, loss, loss.backward()...
            grad_norm = run.clip_and_step_if_finite(model, optimizer, ema)
            run.count_step()
            last = run.should_stop()
            run.log(values, last)
            if run.due(cfg.train.ckpt_every, last):
                run.save(modules, optimizers)
        run.finish()

    Every rank makes the same calls in the same order: `should_stop`, `log` and `save` are where they agree.
    """

    def __init__(self, cfg, stage: str):
        self.cfg, self.stage = cfg, stage
        self.dist: DistInfo = setup_distributed()
        self.device = self.dist.device
        train = cfg.train
        if train.global_batch_size % self.dist.world_size != 0:
            raise RunError(f"train.global_batch_size={train.global_batch_size} is not divisible by the "
                           f"world size {self.dist.world_size}")
        self.batch_size = train.global_batch_size // self.dist.world_size
        if self.device.type == "cuda":
            # Set here, in the run, never at import: the config decides (no global flags on import).
            torch.backends.cuda.matmul.allow_tf32 = bool(train.tf32)
            torch.backends.cudnn.allow_tf32 = bool(train.tf32)
        self.seed = train.global_seed * self.dist.world_size + self.dist.rank
        self._seed_everything(self.seed)

        resume_notes: list = []
        self.resume_path = self._on_main(
            lambda: ckpt_io.resolve_resume(train.resume, train.results_dir, stage, cfg, resume_notes))
        resume_notes = broadcast_object(resume_notes)
        if self.resume_path is not None and OmegaConf.select(cfg, "ae_ckpt") == "auto":
            # 'auto' found the run's autoencoder when the run started; a newer one found today is another latent space.
            recorded = self._on_main(lambda: ckpt_io.load_checkpoint(self.resume_path, mmap=True)["config"].get("ae_ckpt"))
            if recorded not in (None, "auto"):
                OmegaConf.update(cfg, "ae_ckpt", recorded, merge=False)
        # On every rank before a run folder is claimed: a wrong data path costs nothing and hangs no rank.
        _raise_first(all_gather_object(_attempt(lambda: check_data_path(cfg.data))[1]))
        self._created_run_dir = False  # set by _make_run_dir on rank 0
        self._restored = self.resume_path is None  # a resumed run's config.yaml is rewritten once restore() took it
        self._steps_this_start = 0
        self.writer = self.logger = None
        self.run_dir = Path(self._on_main(self._make_run_dir))
        if self.dist.is_main and self._created_run_dir:
            on_failure(self._remove_unused_run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = create_logger(self.run_dir, self.dist.is_main)
        self._write_config()
        self.wandb = None
        if self.dist.is_main:
            self.wandb = start_wandb(cfg, self.run_dir)  # before the TensorBoard writer, whose scalars it mirrors
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self.logger.info(f"{stage} run in {self.run_dir} | world size {self.dist.world_size} | "
                         f"device {self.device} | batch {self.batch_size} per rank")
        for note in resume_notes:
            self.logger.info(note)

        self.step = 0
        self.samples_seen = 0  # training clips drawn by all ranks together: the data stream's position
        self.nonfinite_in_a_row = 0
        self.last_saved_step: Optional[int] = None  # the step of this run's latest checkpoint, for finish()'s message
        self._stop_signal: Optional[str] = None
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_count = 0
        self._speed_mark: Optional[tuple[float, int]] = None  # (time, step) of the last log line or the first step
        self._install_signal_handlers()

    # ---- setup -------------------------------------------------------------------------------------------
    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _on_main(self, fn):
        """fn() on rank 0, its result on every rank; an error there is raised on every rank (none hangs waiting)."""
        result, error = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except (ValueError, OSError, RunError) as exc:
                error = exc
        result, error = broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def _make_run_dir(self) -> str:
        train = self.cfg.train
        results = Path(train.results_dir)
        if self.resume_path is not None:
            run_dir = self.resume_path.parent.parent  # <run>/checkpoints/x.pt -> <run>
            if self.resume_path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
                if not os.access(run_dir, os.W_OK) or not os.access(run_dir / "checkpoints", os.W_OK):
                    raise RunError(f"--resume: the run folder {run_dir} is not writable; nothing was changed")
                claim(run_dir, "--resume: the run folder", "wait for that process to end")
                ckpt_io.remove_temp_files(run_dir / "checkpoints")  # after the claim: a live run's are its own
                return str(run_dir)
            # A checkpoint outside any run folder (a copy, a download) continues in a new run folder.
        try:
            folder = claim_run_dir(results, self.stage, train.exp_name)
            self._created_run_dir = folder.created
            return str(folder.path)
        except OSError as exc:  # under a file, read-only, a pseudo file system, no space
            reason = exc.strerror or type(exc).__name__
            raise RunError(f"--results-dir {results}: cannot create a run folder there ({reason}: "
                           f"{exc.filename or results})") from None

    def _write_config(self) -> None:
        """config.yaml: the settings of the run. A resumed run's keeps the settings it had until restore() has
        accepted this command's (a refusal on the way, another text encoder say, must leave the run as it was)."""
        if self._restored:
            text = to_yaml(self.cfg).encode()
            self._on_main(lambda: write_output(self.run_dir / "config.yaml", lambda handle: handle.write(text),
                                               "the run's config"))

    def _remove_unused_run_dir(self) -> None:
        """A start that fails before training (a wrong data path, an unusable checkpoint) leaves no run folder
        behind: it would hold nothing but the error printed already, and fill results_dir with empty runs."""
        if self._steps_this_start or ckpt_io.latest_checkpoint_in_run(self.run_dir) is not None:
            return
        if self.writer is not None:
            self.writer.close()
        for handler in list(self.logger.handlers) if self.logger is not None else []:
            handler.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def record(self, key: str, value) -> None:
        """Sets a value found at run time (the dataset's class count, the resolved AE checkpoint) in the config
        and config.yaml, so that checkpoints carry it and later stages and sample.py read it from there."""
        OmegaConf.update(self.cfg, key, value, merge=False)
        self._write_config()

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name
            # A second signal falls through to the default action (a user pressing Ctrl-C twice).
            signal.signal(signum, signal.SIG_DFL)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    # ---- resume --------------------------------------------------------------------------------------------
    def restore(self, modules: dict, optimizers: dict) -> Optional[dict]:
        """Loads model/EMA/optimizer state, step and RNG from the resume checkpoint (before DDP wrapping)."""
        if self.resume_path is None:
            return None
        ckpt = ckpt_io.load_stage_checkpoint(self.resume_path, self.stage)
        for name, module in modules.items():
            if ckpt.get(name) is None:
                raise RunError(f"{self.resume_path} has no '{name}' weights to resume from")
            ckpt_io.load_weights(module, ckpt_io.strip_prefixes(ckpt[name]), self.resume_path, f"'{name}' weights")
        for name, optimizer in optimizers.items():
            if ckpt.get(name) is not None:
                optimizer.load_state_dict(ckpt[name])
                self._apply_optimizer_settings(name, optimizer, ckpt["config"])
        self.step = int(ckpt["step"])
        self.samples_seen = _samples_seen(ckpt)
        old_batch = (ckpt["config"].get("train") or {}).get("global_batch_size", self.cfg.train.global_batch_size)
        if old_batch != self.cfg.train.global_batch_size:
            self.logger.info(f"resume: train.global_batch_size {old_batch} -> {self.cfg.train.global_batch_size} "
                             f"(applied); the data stream continues at clip {self.samples_seen}")
        rng = ckpt.get("rng") or []
        if len(rng) == self.dist.world_size:
            _set_rng_state(rng[self.dist.rank])
        else:
            self.logger.warning(f"resume: world size changed ({len(rng)} -> {self.dist.world_size}); RNG reseeded")
            self._seed_everything(self.seed + self.step)
        vae = OmegaConf.select(self.cfg, "vae_fingerprint")
        if vae and not ckpt["config"].get("vae_fingerprint"):
            self.logger.warning(f"resume: {self.resume_path} records no VAE fingerprint (written before VAEs were "
                                f"recorded), so its VAE cannot be checked; the run continues with the VAE of weights "
                                f"{vae}, which its checkpoints record from now on")
        self.logger.info(f"resumed from {self.resume_path} at step {self.step}")
        self._restored = True
        self._write_config()
        return ckpt

    def _apply_optimizer_settings(self, name: str, optimizer: torch.optim.Optimizer, old_cfg: dict) -> None:
        """The rule for optimiser settings changed on resume: they apply, and the log says so.

        load_state_dict restores the run's old lr/betas/weight decay into the param groups; without this the
        command's new values would be recorded in the checkpoint's config while the old ones kept training.
        The discriminator's optimiser keeps its own learning rate (loss.disc_lr), set where it is built.
        """
        if name != "opt":
            return
        optim = self.cfg.optim
        wanted = {"lr": float(optim.lr), "base_lr": float(optim.lr), "betas": tuple(float(b) for b in optim.betas),
                  "weight_decay": float(optim.weight_decay)}
        for group in optimizer.param_groups:
            group.update(wanted)
        old = old_cfg.get("optim", {})
        for key, value in (("lr", optim.lr), ("betas", list(optim.betas)), ("weight_decay", optim.weight_decay)):
            if key in old and old[key] != value:
                self.logger.info(f"resume: optim.{key} {old[key]} -> {value} (applied)")

    # ---- model and data ------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """Moves nothing; wraps in DDP when distributed, then compiles when asked."""
        wrapped = model
        if self.dist.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DDP(model, device_ids=device_ids)
        if self.cfg.train.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def loader(self, dataset):
        """An endless iterator of batches that resumes where step `self.step` left the data stream."""
        loader = make_loader(dataset, self.batch_size, self.dist.rank, self.dist.world_size,
                             seed=self.cfg.train.global_seed, start=self.samples_seen // self.dist.world_size,
                             num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        return iter(loader)

    def build_dataset(self, split: str):
        """The dataset of `split`; rank 0 indexes the files first so the others read its cache instead of probing."""
        from datasets import build_dataset

        def build():
            return build_dataset(self.cfg.data, split=split, seed=self.cfg.train.global_seed)

        # Rank 0 first; an error on any rank (a wrong data path) reaches every rank as the same one line, so that
        # none is left waiting for the others at a barrier.
        dataset, error = _attempt(build) if self.dist.is_main else (None, None)
        _raise_first([broadcast_object(error)])
        if not self.dist.is_main:
            dataset, error = _attempt(build)
        _raise_first(all_gather_object(error))
        return dataset

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.train.mixed_precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- the step --------------------------------------------------------------------------------------------
    def clip_and_step_if_finite(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                ema: Optional[nn.Module] = None, grad_clip: Optional[float] = None) -> torch.Tensor:
        """Clips the gradients to optim.grad_clip (or `grad_clip`; 0: no clipping), steps the optimizer and moves
        `ema` towards the model, unless the gradient norm is non-finite (a NaN/inf loss): then the update is
        skipped and counted, and train.max_nonfinite_steps skipped in a row stop the run. Zeroes the gradients;
        returns the grad norm. It does not count the training step: `count_step()` does, once per step.

        The finiteness check is the one host sync per step; DDP has already averaged the gradients, so every rank
        takes the same decision.
        """
        clip = self.cfg.optim.grad_clip if grad_clip is None else grad_clip
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)
        if torch.isfinite(grad_norm):
            factor = lr_factor(self.cfg.optim, self.step, self.cfg.train.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
            optimizer.step()
            if ema is not None:
                update_ema(ema, _unwrap(model), self.cfg.train.ema_decay)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.logger.warning(f"step {self.step + 1}: non-finite loss/gradient, update skipped "
                                f"({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                raise RunError(f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step + 1}; "
                               f"stopping (the last good checkpoint is kept in {self.ckpt_dir})")
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def count_step(self) -> None:
        """One training step done: the step count and the data stream's position (clips drawn by all ranks) move on."""
        self.step += 1
        self._steps_this_start += 1
        self.samples_seen += self.batch_size * self.dist.world_size

    def log(self, values: dict, last: bool) -> None:
        """Accumulates detached scalars on device (no sync); every log_every steps, and at the `last` step, averages
        them over steps and ranks (an all-reduce) and writes a log line."""
        if self._speed_mark is None:  # the clock starts at the first step, not at setup (datasets, latent cache)
            self._speed_mark = (time.perf_counter(), self.step)
        for key, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self._log_sums[key] = self._log_sums.get(key, 0.0) + value.to(self.device)
        self._log_count += 1
        if not last and self.step % self.cfg.train.log_every != 0:
            return
        keys = sorted(self._log_sums)
        means = all_reduce_mean(torch.stack([self._log_sums[k] for k in keys]) / self._log_count).tolist()
        self._log_sums, self._log_count = {}, 0
        text = " ".join(f"{k}={v:.4g}" for k, v in zip(keys, means))
        self.logger.info(f"step {self.step:07d} | {text} | {self._speed()}")
        if self.writer is not None:
            for key, value in zip(keys, means):
                self.writer.add_scalar(f"train/{key}", value, self.step)

    def _speed(self) -> str:
        """Steps/s and clips/s since the previous log line (after the all-reduce, so device work is finished) and
        the time left to max_steps at that rate."""
        now = time.perf_counter()
        last_time, last_step = self._speed_mark if self._speed_mark is not None else (now, self.step)
        self._speed_mark = (now, self.step)
        rate = (self.step - last_step) / max(now - last_time, 1e-9)
        if rate <= 0:
            return "speed n/a"
        seconds_left = int((self.cfg.train.max_steps - self.step) / rate)
        eta = f"{seconds_left // 3600}:{seconds_left // 60 % 60:02d}:{seconds_left % 60:02d}"
        return f"{rate:.3g} steps/s {rate * self.cfg.train.global_batch_size:.3g} clips/s ETA {eta}"

    def should_stop(self) -> bool:
        """Whether the step just counted is the last (before the loop: whether there is no step to train): at
        max_steps, or after SIGTERM/SIGINT on any rank.

        Call it once per step on every rank, as in the class docstring's loop: distributed, every
        STOP_CHECK_EVERY-th step it is an all-reduce (a host sync), through which the ranks agree on a signal one of
        them received.
        """
        if self.step >= self.cfg.train.max_steps:
            return True
        if not self.dist.distributed:
            return self._stop_signal is not None
        if self.step % STOP_CHECK_EVERY != 0:
            return False
        flag = torch.tensor(1.0 if self._stop_signal else 0.0, device=self.device)
        return bool(all_reduce_max(flag).item())

    def stop_requested(self) -> bool:
        """True after SIGTERM/SIGINT on any rank, for long work outside the step loop (the latent cache build).

        Distributed, this is an all-reduce: every rank must call it at the same points of that work.
        """
        if not self.dist.distributed:
            return self._stop_signal is not None
        flag = torch.tensor(1.0 if self._stop_signal else 0.0, device=self.device)
        return bool(all_reduce_max(flag).item())

    def due(self, interval: int, last: bool) -> bool:
        """Every `interval` steps (never for 0), and at the `last` step (should_stop's answer for this step)."""
        return last or (interval > 0 and self.step % interval == 0)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, modules: dict, optimizers: dict, extra: Optional[dict] = None) -> Optional[Path]:
        """Writes checkpoints/{step:07d}.pt atomically from rank 0 and makes last.pt name it; all ranks wait for it.

        The checkpoint is written once: last.pt becomes a hard link to the step file, swapped in by rename (a full
        copy where the filesystem has no hard links), so it always names the newest complete checkpoint.
        """
        rng = all_gather_object(_rng_state())
        path, error = None, None
        if self.dist.is_main:
            state = {name: _unwrap(m).state_dict() for name, m in modules.items()}
            state.update({name: opt.state_dict() for name, opt in optimizers.items()})
            state.update(step=self.step, stage=self.stage, config=config_to_dict(self.cfg), rng=rng,
                         world_size=self.dist.world_size, batch_size_per_rank=self.batch_size,
                         samples_seen=self.samples_seen)
            state.update(extra or {})
            path = self.ckpt_dir / f"{self.step:07d}.pt"
            target = path
            try:
                ckpt_io.atomic_torch_save(state, path)
                target = self.ckpt_dir / "last.pt"
                ckpt_io.atomic_link(path, target)
            except (OSError, RuntimeError) as exc:  # a full disk surfaces as either (torch wraps the OSError)
                cause = exc if isinstance(exc, OSError) else (exc.__cause__ or exc.__context__ or exc)
                reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
                free = shutil.disk_usage(self.ckpt_dir).free / 2**30
                error = (f"cannot write checkpoint {target}: {reason} ({free:.2f} GiB free); "
                         f"the previous checkpoints in {self.ckpt_dir} are intact")
            if error is None:
                ckpt_io.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)
                self.logger.info(f"saved checkpoint {path}")
        error = broadcast_object(error)  # every rank stops together instead of hanging in the barrier
        if error:
            raise RunError(error)
        self.last_saved_step = self.step
        barrier()
        return path

    def finish(self, interrupted: Optional[str] = None) -> None:
        """Logs how the run ended and closes it. `interrupted` names the work a stop signal cut short before the
        training loop (\"building the latent cache\"); the log names a checkpoint only if this run saved it."""
        if self._stop_signal and (interrupted or self.step < self.cfg.train.max_steps):
            received = f"received {self._stop_signal}" + (f" while {interrupted}" if interrupted else "")
            if self.last_saved_step == self.step:
                self.logger.info(f"{received}: checkpoint at step {self.step} saved, exiting cleanly")
            elif self.last_saved_step is not None:
                self.logger.info(f"{received}: stopped at step {self.step}; the last checkpoint saved is at step "
                                 f"{self.last_saved_step}")
            else:
                kept = f" ({self.resume_path}, which it resumed from, is kept)" if self.resume_path else ""
                self.logger.info(f"{received}: stopped before step {self.step + 1}; no checkpoint was written{kept}")
        else:
            self.logger.info(f"done at step {self.step}")
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.dist.is_main:
            cancel_on_failure(self._remove_unused_run_dir)
            release(self.run_dir)
        # Every rank is done with the process group before any ends its process (core.distributed.end_rank_process).
        barrier()
        cleanup_distributed()


def _attempt(fn) -> tuple:
    """(fn(), None), or (None, the user error it raised): to be shared with the other ranks before raising."""
    try:
        return fn(), None
    except (ValueError, OSError, RunError) as exc:
        return None, exc


def _raise_first(errors: list) -> None:
    error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def start_wandb(cfg, run_dir: Path):
    """A Weights & Biases run mirroring the TensorBoard scalars and media, when train.wandb_project is set (off by
    default; TensorBoard stays). The id is kept in the run folder, so a resumed run continues the same W&B run."""
    project = cfg.train.wandb_project
    if not project:
        return None
    import wandb  # optional: validate_config has checked that it is installed

    id_file = Path(run_dir) / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    write_output(id_file, lambda handle: handle.write(run_id.encode()), "the run's W&B id")
    return wandb.init(project=project, entity=cfg.train.wandb_entity, name=Path(run_dir).name, id=run_id,
                      resume="allow", dir=str(run_dir), config=config_to_dict(cfg), sync_tensorboard=True)


def _samples_seen(ckpt: dict) -> int:
    """Training clips drawn by all ranks together before the checkpoint; older checkpoints recorded one rank's
    position (data_position, with the batch size never changed)."""
    if "samples_seen" in ckpt:
        return int(ckpt["samples_seen"])
    return int(ckpt.get("data_position", ckpt["step"] * ckpt.get("batch_size_per_rank", 0))) * int(ckpt.get("world_size", 1))


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DDP):
            model = model.module
        else:
            return model
