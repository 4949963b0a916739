"""A stop signal (SIGTERM/SIGINT) received by a rank, the ranks' agreement on it, and how the log says the run
ended."""
from __future__ import annotations

import signal
from typing import Optional

import torch

from core.distributed import DistInfo, all_reduce_max

STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a received SIGTERM/SIGINT


class StopSignal:
    """Catches SIGTERM and SIGINT in this process; `received` names the first one caught."""

    def __init__(self, dist: DistInfo):
        self.dist = dist
        self.received: Optional[str] = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name
        # A second signal falls through to the default action (a user pressing Ctrl-C twice).
        signal.signal(signum, signal.SIG_DFL)

    def on_any_rank(self) -> bool:
        """Whether any rank received a signal. Distributed, this is an all-reduce: every rank must call it at the
        same points."""
        if not self.dist.distributed:
            return self.received is not None
        flag = torch.tensor(1.0 if self.received else 0.0, device=self.dist.device)
        return bool(all_reduce_max(flag).item())

    def agreed_at(self, step: int) -> bool:
        """on_any_rank(), asked every STOP_CHECK_EVERY-th step only when distributed (a host sync); at the other
        steps False."""
        if self.dist.distributed and step % STOP_CHECK_EVERY != 0:
            return False
        return self.on_any_rank()


def end_message(received: Optional[str], interrupted: Optional[str], step: int, max_steps: int,
                last_saved_step: Optional[int], resume_path) -> str:
    """The log's last line: how the run ended, naming a checkpoint only if this run saved it."""
    if not (received and (interrupted or step < max_steps)):
        return f"done at step {step}"
    received = f"received {received}" + (f" while {interrupted}" if interrupted else "")
    if last_saved_step == step:
        return f"{received}: checkpoint at step {step} saved, exiting cleanly"
    if last_saved_step is not None:
        return f"{received}: stopped at step {step}; the last checkpoint saved is at step {last_saved_step}"
    kept = f" ({resume_path}, which it resumed from, is kept)" if resume_path else ""
    return f"{received}: stopped before step {step + 1}; no checkpoint was written{kept}"
