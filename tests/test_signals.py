"""Stop signals and kills while a diffusion stage builds its latent cache: a prompt stop with a truthful last log
line, exit code 0 as for a stop in the training loop, and no half-built staging folder left, now or by a later run."""
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import LAUNCHED, REPO, child_env, run_python

SHRINK = ["train.global_batch_size=4", "data.resolution=[16,16]", "data.n_frames=4", "train.log_every=1",
          "train.num_eval_videos=2"]
# 64 videos; with many clips per video the cache build takes minutes on a CPU, with one it takes a second.
SLOW_CACHE = ["data.synthetic_size=64", "diffusion.latent_cache_clips_per_video=1024"]
FAST_CACHE = ["data.synthetic_size=64", "diffusion.latent_cache_clips_per_video=1"]
STOP_WITHIN_S = 30  # a build that ignores the signal would run on for minutes


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    """A one-step CPU-tiny autoencoder: the cache build needs an encoder, not a good one."""
    results = tmp_path_factory.mktemp("signals_ae")
    run_python(["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", *SHRINK, "data.num_workers=0",
                "model.depth=1", "model.hidden_size=32", "--results-dir", results, "--exp-name", "ae",
                "--max-steps", 1, "--ckpt-every", 1])
    return results / "ae" / "checkpoints" / "last.pt"


def motion_args(ae_ckpt, results, exp_name, *extra):
    return ["train_motion_diffusion.py", "--config", "configs/tiny/motion.yaml", "--ae-ckpt", ae_ckpt, *SHRINK,
            "diffusion.sample_steps=2", "train.sample_every=100000", "--results-dir", results, "--exp-name", exp_name,
            *extra]


def launch(args, output: Path) -> subprocess.Popen:
    """`python <args>` in its own session (so that its process group can be signalled), output to a file."""
    with open(output, "w") as handle:
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=child_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.output_path = output
    LAUNCHED.append(proc)
    return proc


def output_of(proc) -> str:
    return Path(proc.output_path).read_text()


def staging_folders(results: Path) -> list:
    root = results / "latent_cache"
    return sorted(p for p in root.glob("*.tmp-*")) if root.is_dir() else []


def wait_for_cache_build(proc, results: Path, log: Path, timeout=120.0) -> None:
    """Until the trainer has begun encoding into its staging folder."""
    deadline = time.time() + timeout
    while not (staging_folders(results) and log.is_file() and "latent cache: encoding" in log.read_text()):
        if proc.poll() is not None:
            pytest.fail(f"trainer ended (exit {proc.returncode}) before building its cache:\n{output_of(proc)[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"no cache build after {timeout:.0f} s:\n{output_of(proc)[-3000:]}")
        time.sleep(0.05)
    time.sleep(1.0)  # a few batches into the build


@pytest.mark.parametrize("target, signal_number", [("trainer", signal.SIGTERM), ("process group", signal.SIGTERM),
                                                    ("process group", signal.SIGINT)],
                         ids=["SIGTERM to the trainer", "SIGTERM to its process group", "SIGINT to its process group"])
def test_stop_signal_during_cache_build_stops_promptly_and_truthfully(ae_ckpt, tmp_path, target, signal_number):
    """Kubernetes signals the trainer, Slurm and torchrun its process group (DataLoader workers included), Ctrl-C the
    terminal's: the build stops within a few batches, removes its staging folder, the log says no checkpoint was
    written (there is none to resume from) and the exit code is 0, as for a stop in the training loop."""
    log = tmp_path / "run" / "log.txt"
    proc = launch(motion_args(ae_ckpt, tmp_path, "run", "--max-steps", 100000, "data.num_workers=1", *SLOW_CACHE),
                  tmp_path / "out.txt")
    wait_for_cache_build(proc, tmp_path, log)
    if target == "trainer":
        proc.send_signal(signal_number)
    else:
        os.killpg(proc.pid, signal_number)
    sent = time.time()
    try:
        proc.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {STOP_WITHIN_S} s after the signal:\n{output_of(proc)[-3000:]}")
    output, text = output_of(proc), log.read_text()
    name = signal.Signals(signal_number).name
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "ConnectionResetError" not in output, output[-4000:]
    assert re.search(rf"received {name} while building the latent cache \(\d+ of \d+ clips encoded\): "
                     rf"stopped before step 1; no checkpoint was written$", text, re.MULTILINE), text[-2000:]
    assert "saved" not in text, text[-2000:]
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    assert list((tmp_path / "latent_cache").iterdir()) == []  # neither the staging folder nor a cache
    assert time.time() - sent < STOP_WITHIN_S


def test_later_run_removes_the_staging_folder_of_a_killed_build(ae_ckpt, tmp_path):
    """kill -9 leaves a half-built staging folder behind; the next run that builds or looks up a cache removes it."""
    log = tmp_path / "killed" / "log.txt"
    proc = launch(motion_args(ae_ckpt, tmp_path, "killed", "--max-steps", 100000, "data.num_workers=1", *SLOW_CACHE),
                  tmp_path / "killed.txt")
    wait_for_cache_build(proc, tmp_path, log)
    proc.kill()
    proc.wait(timeout=60)
    (orphan,) = staging_folders(tmp_path)

    run_python(motion_args(ae_ckpt, tmp_path, "next", "--max-steps", 1, "data.num_workers=0", *FAST_CACHE))
    text = (tmp_path / "next" / "log.txt").read_text()
    assert staging_folders(tmp_path) == [], text[-2000:]
    assert f"removed the abandoned staging folder {orphan} (its build, process {proc.pid}, is gone)" in text
    caches = list((tmp_path / "latent_cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "done").is_file()  # the next run's own cache, complete


def test_abandoned_staging_folders_are_told_from_live_builds(tmp_path):
    """Removed: this machine's folders whose owner process is dead, and folders of another machine (or of no
    recorded owner) untouched for two days. Kept: one a live process here owns (this test), and a recent one of
    another machine, whose owner cannot be checked from here."""
    from core import latent_cache

    logger = logging.getLogger("test_signals")
    here = latent_cache._machine()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {
        "dead owner": latent_cache._staging_path(tmp_path / "0123456789abcdef", dead.pid, here),
        "live owner": latent_cache._staging_path(tmp_path / "0123456789abcdef", os.getpid(), here),
        "elsewhere, recent": latent_cache._staging_path(tmp_path / "0123456789abcdef", dead.pid, "elsewhere.example"),
        "elsewhere, old": latent_cache._staging_path(tmp_path / "fedcba9876543210", os.getpid(), "elsewhere.example"),
        "no owner, old": tmp_path / "fedcba9876543210.tmp-1a2b3c4d",  # named before owners were recorded
    }
    for folder in folders.values():
        folder.mkdir()
        (folder / "z_c.npy").write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    for name in ("elsewhere, old", "no owner, old"):
        os.utime(folders[name] / "z_c.npy", (two_days_ago, two_days_ago))
        os.utime(folders[name], (two_days_ago, two_days_ago))
    (tmp_path / "0123456789abcdef").mkdir()  # a finished cache is no staging folder

    latent_cache.remove_abandoned_staging(tmp_path, logger)
    kept = {name for name, folder in folders.items() if folder.exists()}
    assert kept == {"live owner", "elsewhere, recent"}
    assert (tmp_path / "0123456789abcdef").is_dir()


def test_finish_names_a_checkpoint_only_when_one_was_saved(tmp_path):
    """A stop signal before the first step leaves no checkpoint, and the log must not claim one; after a save at
    the stopping step it names that step."""
    from core.config import load_config
    from training.run import TrainingRun

    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        texts = []
        for exp_name, steps in (("early", 0), ("saved", 3)):
            cfg = load_config("content", str(REPO / "configs/tiny/content.yaml"),
                              [f"train.results_dir={tmp_path}", f"train.exp_name={exp_name}", "ae_ckpt=unused"])
            run = TrainingRun(cfg, stage="content")
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the handler the run installed, as on a signal
            run.step = steps
            if steps:
                run.save({"model": torch.nn.Linear(2, 2)}, {})
            run.finish()
            texts.append((run.run_dir / "log.txt").read_text())
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    early, saved = texts
    assert "received SIGTERM: stopped before step 1; no checkpoint was written" in early, early
    assert "saved" not in early
    assert list((tmp_path / "early" / "checkpoints").iterdir()) == []
    assert "received SIGTERM: checkpoint at step 3 saved, exiting cleanly" in saved, saved



CRASH_WITH_WORKERS = """
import torch
from core import data

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, key):  # the (index, epoch) keys of the training sampler
        return torch.tensor(float(key[0]))

batches = iter(data.make_loader(Items(), 4, 0, 1, 0, 0, 1, False))
next(batches)
raise RuntimeError("crashed with a live loader")
"""


def test_a_crash_with_live_loader_workers_exits(tmp_path):
    """The workers ignore SIGTERM (the main process handles stop signals), and multiprocessing's exit hook SIGTERMs
    and joins them: an exception that escapes a training script while its traceback holds the loader must still
    end the process (core.data._shut_down_workers), not hang it in that join."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_WITH_WORKERS)
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        for child in Path("/proc").glob("[0-9]*"):  # its worker, orphaned: it ignores SIGTERM
            try:
                if str(script) in (child / "cmdline").read_text():
                    os.kill(int(child.name), signal.SIGKILL)
            except OSError:
                continue
        process.communicate()
        pytest.fail("a crash with live loader workers hung the process")
    assert process.returncode == 1 and "crashed with a live loader" in stderr
