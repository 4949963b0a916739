"""Running the entry scripts as subprocesses: from the repo root, CPU-only, each on its share of the cores; and the
list of long-running processes a test started, which the suite kills after the test (tests/conftest.py)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(extra=None):
    """The environment of a process a test starts: the repo importable, no GPU, one OpenMP thread, then `extra`."""
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

# Popen objects a test started and must not outlive it: the reap_processes fixture (tests/conftest.py) kills the
# ones still running after each test, so a failed assertion leaves no training process behind.
LAUNCHED = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(args, env=None, timeout=600, check=True):
    """Runs `python <args>` from the repo root; on failure the assertion shows its output."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=child_env(env), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                      f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


def run_torchrun(nproc, args, env=None, timeout=600, check=True, extra_launcher_args=()):
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                f"--master_port={free_port()}", *extra_launcher_args]
    return run_python([*launcher, *args], env=env, timeout=timeout, check=check)
