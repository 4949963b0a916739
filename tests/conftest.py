"""Shared pytest fixtures: subprocess runners for the entry scripts, with a clean, CPU-only environment."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


# scripts/test.sh runs the suite on pytest-xdist workers, one per core; each worker and what it starts then keeps to
# its share of the cores (one thread on 2 cores): OpenMP pools spinning on the same cores slow each other down many
# times over.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# A test that trains one process for minutes (no torchrun beside it) may use the cores no other worker needs: on a
# 2-core machine run serially, 1.5x faster for the tiny models, and the same numbers as one thread (measured:
# identical losses at step 300).
LONE_PROCESS_ENV = {"OMP_NUM_THREADS": str(max(1, min(2, CORES // WORKERS)))}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test file that trains for minutes; scheduled first")
    if WORKERS > 1:  # the in-process tests of each worker: its share of the cores
        torch.set_num_threads(max(1, CORES // WORKERS))


def pytest_collection_modifyitems(config, items):
    """The files marked slow run first (a stable sort keeps the order within each group): the workers of
    scripts/test.sh, which take files in this order, then end together instead of one waiting for the longest."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
