"""What the command-line tools share without the training runtime: the entry point of the training scripts,
the one-line reporting of user errors, and argparse value types (a bad value is refused by the parser, naming
its flag). sample.py, evals and the export tool import this, not training.run."""
from __future__ import annotations

import argparse
import math
import os
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every entry point's --help: each flag's help ends with its default. Flags that default to None or False
    (off, or "see the help") show none; their help says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


class RunError(RuntimeError):
    """A run that cannot start or go on; the message is one line."""


_ON_FAILURE: list = []


def on_failure(callback) -> None:
    """callback() runs when run_reporting_user_errors' function ends in an exception (a user error or any other):
    what a failed start must undo, such as the run folder it created."""
    _ON_FAILURE.append(callback)


def cancel_on_failure(callback) -> None:
    """Withdraws an on_failure callback (the start it would undo has succeeded)."""
    if callback in _ON_FAILURE:
        _ON_FAILURE.remove(callback)


def _lost_another_rank(exc: BaseException) -> bool:
    """A collective that failed because another rank of the job ended (its own error is the one to read)."""
    import torch.distributed as dist

    kinds = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError") if hasattr(dist, name))
    return bool(kinds) and isinstance(exc, kinds) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_reporting_user_errors(fn, *args) -> None:
    """fn(*args); a user error ends as one line `error: ...` on stderr and exit code 1, not a traceback; so does a
    rank of a distributed job that lost contact with a rank which stopped on its own error.

    Set CMD_TRACEBACK=1 to see the full traceback instead. A rank of a distributed job ends here, in both cases
    (core.distributed.end_rank_process).
    """
    try:
        fn(*args)
    except BaseException as exc:
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            while _ON_FAILURE:
                try:
                    _ON_FAILURE.pop()()
                except Exception:  # the undo of a failed start must not hide why it failed
                    pass
        user_error = isinstance(exc, (ValueError, FileNotFoundError, RunError))
        if os.environ.get("CMD_TRACEBACK") or not (user_error or _lost_another_rank(exc)):
            raise
        if user_error:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            message = (f"rank {os.environ.get('RANK', '?')}: another rank of this job stopped (its error is above); "
                       f"this one stops too")
        sys.stderr.write(f"error: {message}\n")  # one write: torchrun's unbuffered ranks share the stream
        _end_rank_process(1)
        raise SystemExit(1) from None
    _end_rank_process(0)


def _end_rank_process(code: int) -> None:
    from core.distributed import end_rank_process  # here: core.distributed takes its flag types from this module

    end_rank_process(code)


def entry_point(main, stage: str, description: str, argv=None) -> None:
    """The training scripts' `__main__`: parse the config (exit 2 on a bad one; it may re-launch the process under
    torchrun when launcher flags are given), then run `main(cfg)`."""
    from core.config import parse_config  # config imports the models' registry; the value types above do not

    run_reporting_user_errors(main, parse_config(stage, description, argv))


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def int_in_range(low: int, high=None, what: str = ""):
    """An argparse type: a whole number in low..high (no upper bound when high is None); `what` names the range
    in the message (e.g. "a port")."""
    def parse(text: str) -> int:
        value = _whole_number(text)
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {what + ', ' if what else ''}{bound}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message for a value it cannot convert
    return parse


positive_int = int_in_range(1)
nonnegative_int = int_in_range(0)
# Seeds seed torch.Generator and numpy, which take unsigned 64-bit numbers.
SEED_MAX = 2**64 - 1
seed_int = int_in_range(0, SEED_MAX, "a seed")
port_int = int_in_range(1, 65535, "a TCP port")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# Classifier-free guidance scales: 1 is none, 0 the unconditional model; scales in the tens already saturate every
# sample, and far larger ones overflow float32 in the guided prediction (black videos).
GUIDANCE_MAX = 100.0


def guidance_scale(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value <= GUIDANCE_MAX:
        raise argparse.ArgumentTypeError(f"must be a guidance scale in 0..{GUIDANCE_MAX:g}, got {text}")
    return value
