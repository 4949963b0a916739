"""Shared pytest fixtures: subprocess runners for the entry scripts, with a clean, CPU-only environment."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


# A test that trains one process for minutes (no torchrun beside it) may use both cores of a 2-core machine: 1.5x
# faster for the tiny models, and the same numbers as one thread (measured: identical losses at step 300).
LONE_PROCESS_ENV = {"OMP_NUM_THREADS": str(min(2, os.cpu_count() or 1))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(args, env=None, timeout=600, check=True):
    """Runs `python <args>` from the repo root; on failure the assertion shows its output."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=_env(env), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def run_torchrun(nproc, args, env=None, timeout=600, check=True, extra_launcher_args=()):
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                f"--master_port={free_port()}", *extra_launcher_args]
    return run_python([*launcher, *args], env=env, timeout=timeout, check=check)


@pytest.fixture
def python_runner():
    return run_python


@pytest.fixture
def torchrun_runner():
    return run_torchrun


@pytest.fixture(scope="session")
def trained_tiny_ae(tmp_path_factory):
    """The demo's autoencoder config trained for 250 steps (about a minute and a half): (checkpoint path, train_ae.py stdout).

    Shared by the tests that need an autoencoder whose motion latent carries motion.
    """
    results = tmp_path_factory.mktemp("trained_ae")
    proc = run_python(["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", "--results-dir", results,
                       "--exp-name", "ae", "--max-steps", 250, "train.eval_every=250", "train.ckpt_every=250"],
                      env=LONE_PROCESS_ENV)
    return results / "ae" / "checkpoints" / "last.pt", proc.stdout
