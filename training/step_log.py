"""The training log: scalars accumulated on device each step, averaged over steps and ranks at a log step, with the
speed and the time left."""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from core.distributed import all_reduce_mean


class StepLog:
    def __init__(self, logger: logging.Logger, writer, device: torch.device, log_every: int, max_steps: int,
                 global_batch_size: int):
        self.logger, self.writer, self.device = logger, writer, device
        self.log_every, self.max_steps, self.global_batch_size = log_every, max_steps, global_batch_size
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._speed_mark: Optional[tuple[float, int]] = None  # (time, step) of the last log line or the first step

    def add(self, values: dict, step: int, last: bool) -> None:
        """Accumulates detached scalars on device (no sync); every log_every steps, and at the `last` step,
        averages them over steps and ranks (an all-reduce) and writes a log line."""
        if self._speed_mark is None:  # the clock starts at the first step, not at setup (datasets, latent cache)
            self._speed_mark = (time.perf_counter(), step)
        for key, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self._sums[key] = self._sums.get(key, 0.0) + value.to(self.device)
        self._count += 1
        if not last and step % self.log_every != 0:
            return
        keys = sorted(self._sums)
        means = all_reduce_mean(torch.stack([self._sums[k] for k in keys]) / self._count).tolist()
        self._sums, self._count = {}, 0
        text = " ".join(f"{k}={v:.4g}" for k, v in zip(keys, means))
        self.logger.info(f"step {step:07d} | {text} | {self._speed(step)}")
        if self.writer is not None:
            for key, value in zip(keys, means):
                self.writer.add_scalar(f"train/{key}", value, step)

    def _speed(self, step: int) -> str:
        """Steps/s and clips/s since the previous log line (after the all-reduce, so device work is finished) and
        the time left to max_steps at that rate."""
        now = time.perf_counter()
        last_time, last_step = self._speed_mark if self._speed_mark is not None else (now, step)
        self._speed_mark = (now, step)
        rate = (step - last_step) / max(now - last_time, 1e-9)
        if rate <= 0:
            return "speed n/a"
        seconds_left = int((self.max_steps - step) / rate)
        eta = f"{seconds_left // 3600}:{seconds_left // 60 % 60:02d}:{seconds_left % 60:02d}"
        return f"{rate:.3g} steps/s {rate * self.global_batch_size:.3g} clips/s ETA {eta}"
