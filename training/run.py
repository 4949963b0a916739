"""TrainingRun: one training run of one stage, composed of its run folder and writers (run_folder), checkpoints
(checkpointing), stop signal (stop), log (step_log) and optimizer step (optim)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from core import checkpoint as ckpt_io
from core.cli import RunError, cancel_on_failure, on_failure
from core.config import TrainConfig, config_to_dict
from core.data import make_loader
from core.distributed import (DistInfo, all_gather_object, barrier, broadcast_object, cleanup_distributed,
                              errors_shared, on_main, setup_distributed)
from core.files import release
from datasets.build import check_data_path
from training import devices
from training.checkpointing import checkpoint_state, find_resume, load_states, restore_progress, rng_state, \
    seed_everything, write_checkpoint
from training.optim import NonfiniteSkips, clip_and_step_if_finite
from training.run_folder import close_writers, create_logger, open_run_dir, remove_run_dir, start_writers, write_config
from training.step_log import StepLog
from training.stop import StopSignal, end_message


class TrainingRun:
    """One training run of one stage: everything but the model, the loss and the loop body.

    Use, as the training scripts do: build it first, then the model, `restore(...)`, set what setup found in the
    config and `write_config()`, `wrap(model)`, `loader(dataset)`; in the loop, after backward,
    `run.clip_and_step(model, opt)`, then `count_step()`, `last = should_stop()` (once per step), `log(values, last)`
    and `if due(cfg.train.ckpt_every, last): save(...)`; at the end `finish()`. Every rank makes the same calls in
    the same order: `should_stop`, `log` and `save` are where they agree.
    """

    def __init__(self, cfg, stage: str):
        self.cfg, self.stage = cfg, stage  # the whole config: config.yaml and every checkpoint record it
        # The run's own settings, read once: the modules below get plain values, never the config.
        train: TrainConfig = OmegaConf.to_object(cfg.train)
        self.train = train
        self.grad_clip, self.num_workers = float(cfg.optim.grad_clip), int(cfg.data.num_workers)
        self.dist: DistInfo = setup_distributed()
        self.device = self.dist.device
        self.batch_size = devices.batch_size_per_rank(train.global_batch_size, self.dist)
        devices.set_tf32(self.device, train.tf32)
        self.seed = train.global_seed * self.dist.world_size + self.dist.rank
        seed_everything(self.seed)
        self.resume_path, resume_notes = find_resume(train.resume, train.results_dir, cfg, stage, self.dist)
        # On every rank before a run folder is claimed: a wrong data path costs nothing and hangs no rank.
        with errors_shared():
            check_data_path(cfg.data)
        self._steps_this_start = 0
        self.writer = self.logger = self.wandb = None
        folder = on_main(self.dist, partial(open_run_dir, train.results_dir, train.exp_name, stage, self.resume_path))
        self.run_dir = folder.path
        if self.dist.is_main and folder.created:
            on_failure(self._remove_unused_run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = create_logger(self.run_dir, self.dist.is_main)
        if self.dist.is_main:
            wandb_config = config_to_dict(cfg) if train.wandb_project else None
            self.writer, self.wandb = start_writers(self.run_dir, train.wandb_project, train.wandb_entity, wandb_config)
        self.logger.info(f"{stage} run in {self.run_dir} | world size {self.dist.world_size} | "
                         f"device {self.device} | batch {self.batch_size} per rank")
        for note in resume_notes:
            self.logger.info(note)

        self.step = 0
        self.samples_seen = 0  # training clips drawn by all ranks together: the data stream's position
        self._nonfinite = NonfiniteSkips(train.max_nonfinite_steps, self.logger, self.ckpt_dir)
        self.last_saved_step: Optional[int] = None  # the step of this run's latest checkpoint, for finish()'s message
        self._log = StepLog(self.logger, self.writer, self.device, train.log_every, train.max_steps,
                            train.global_batch_size)
        self._stop = StopSignal(self.dist)

    def write_config(self) -> None:
        """Writes config.yaml once the run's settings are decided (what setup found, the class count say, set in the
        config) and a resumed run is restored (a refusal on the way leaves it as it was); nothing changes them later."""
        on_main(self.dist, lambda: write_config(self.run_dir, self.cfg))

    def _remove_unused_run_dir(self) -> None:
        """A start that fails before training (a wrong data path, an unusable checkpoint) leaves no run folder
        behind: it would hold nothing but the error printed already, and fill results_dir with empty runs."""
        if not self._steps_this_start and ckpt_io.latest_checkpoint_in_run(self.run_dir) is None:
            remove_run_dir(self.run_dir, self.writer, self.logger)

    def restore(self, modules: dict, optimizers: dict) -> Optional[dict]:
        """Loads model/EMA/optimizer state, step and RNG from the resume checkpoint (before DDP wrapping); returns the
        checkpoint without the states it loaded (they are not kept for the whole run), or None for a new run."""
        if self.resume_path is None:
            return None
        ckpt = load_states(self.resume_path, self.stage, modules, optimizers, self.cfg.optim, self.logger)
        self.step, self.samples_seen = restore_progress(ckpt, self.train.global_batch_size,
                                                        OmegaConf.select(self.cfg, "vae_fingerprint"),
                                                        self.resume_path, self.dist, self.logger,
                                                        lambda step: seed_everything(self.seed + step))
        self.logger.info(f"resumed from {self.resume_path} at step {self.step}")
        return {key: value for key, value in ckpt.items() if key not in modules and key not in optimizers}

    def wrap(self, model: nn.Module) -> nn.Module:
        """Moves nothing; wraps in DDP when distributed, then compiles when asked."""
        return devices.wrap(model, self.dist, self.train.compile)

    def loader(self, dataset):
        """An endless iterator of batches that resumes where step `self.step` left the data stream."""
        loader = make_loader(dataset, self.batch_size, self.dist.rank, self.dist.world_size,
                             seed=self.train.global_seed, start=self.samples_seen // self.dist.world_size,
                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        return iter(loader)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def autocast(self):
        return devices.autocast(self.device, self.train.mixed_precision)

    def clip_and_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                      grad_clip: Optional[float] = None) -> tuple:
        """Clips the gradients to optim.grad_clip (or `grad_clip`; 0: no clipping) and steps the optimizer, unless
        the gradient norm is non-finite (a NaN/inf loss): then the update is skipped and counted, and
        train.max_nonfinite_steps skipped in a row stop the run. Zeroes the gradients; returns (the grad norm,
        whether it stepped). It does not count the training step: `count_step()` does, once per step."""
        clip = self.grad_clip if grad_clip is None else grad_clip
        grad_norm, stepped = clip_and_step_if_finite(model, optimizer, clip)
        self._nonfinite.count(stepped, self.step + 1)
        return grad_norm, stepped

    def count_step(self) -> None:
        """One training step done: the step count and the data stream's position (clips drawn by all ranks) move on."""
        self.step += 1
        self._steps_this_start += 1
        self.samples_seen += self.batch_size * self.dist.world_size

    def log(self, values: dict, last: bool) -> None:
        """Accumulates detached scalars on device (no sync); every log_every steps, and at the `last` step, averages
        them over steps and ranks (an all-reduce) and writes a log line."""
        self._log.add(values, self.step, last)

    def should_stop(self) -> bool:
        """Whether the step just counted is the last (before the loop: whether there is no step to train): at
        max_steps, or after SIGTERM/SIGINT on any rank.

        Call it once per step on every rank, as in the class docstring's loop: distributed, every
        STOP_CHECK_EVERY-th step it is an all-reduce (a host sync), through which the ranks agree on a signal one of
        them received.
        """
        return self.step >= self.train.max_steps or self._stop.agreed_at(self.step)

    def stop_requested(self) -> bool:
        """True after SIGTERM/SIGINT on any rank, for long work outside the step loop (the latent cache build).

        Distributed, this is an all-reduce: every rank must call it at the same points of that work.
        """
        return self._stop.on_any_rank()

    def due(self, interval: int, last: bool) -> bool:
        """Every `interval` steps (never for 0), and at the `last` step (should_stop's answer for this step)."""
        return last or (interval > 0 and self.step % interval == 0)

    def save(self, modules: dict, optimizers: dict, extra: Optional[dict] = None) -> Optional[Path]:
        """Writes checkpoints/{step:07d}.pt atomically from rank 0 and makes last.pt name it (write_checkpoint);
        all ranks wait for it."""
        rng = all_gather_object(rng_state())
        path, error = None, None
        if self.dist.is_main:
            state = checkpoint_state(modules, optimizers, step=self.step, stage=self.stage,
                                     config=config_to_dict(self.cfg), rng=rng, world_size=self.dist.world_size,
                                     batch_size_per_rank=self.batch_size, samples_seen=self.samples_seen,
                                     **(extra or {}))
            path, error = write_checkpoint(state, self.ckpt_dir, self.step, self.train.keep_last, self.logger)
        error = broadcast_object(error)  # every rank stops together instead of hanging in the barrier
        if error:
            raise RunError(error)
        self.last_saved_step = self.step
        barrier()
        return path

    def finish(self, interrupted: Optional[str] = None) -> None:
        """Logs how the run ended and closes it. `interrupted` names the work a stop signal cut short before the
        training loop (\"building the latent cache\"); the log names a checkpoint only if this run saved it."""
        self.logger.info(end_message(self._stop.received, interrupted, self.step, self.train.max_steps,
                                     self.last_saved_step, self.resume_path))
        close_writers(self.writer, self.wandb)
        if self.dist.is_main:
            cancel_on_failure(self._remove_unused_run_dir)
            release(self.run_dir)
        # Every rank is done with the process group before any ends its process (core.distributed.end_rank_process).
        barrier()
        cleanup_distributed()
