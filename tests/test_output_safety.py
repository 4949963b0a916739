"""Outputs that belong to one process and appear whole or not at all: claims (core.files.claim), the atomic
writer behind every output, and the one-line errors of the export tool when its output cannot be written."""
import errno
import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core import files
from core.cli import run_reporting_user_errors
from tests.helpers.processes import REPO, child_env


# ---- claims --------------------------------------------------------------------------------------------------------
def _claim_at_once(folder, barrier, queue):
    barrier.wait()
    try:
        held = files.claim(Path(folder), "--out-dir", "choose another --out-dir")
        queue.put(("won", os.getpid()))
        time.sleep(3)  # hold it while the others try
        held.release()
    except files.OutputError as exc:
        queue.put(("lost", str(exc)))


def test_a_folder_claimed_at_the_same_instant_goes_to_one_process_and_the_others_name_it(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(5), context.Queue()
    workers = [context.Process(target=_claim_at_once, args=(tmp_path / "out", barrier, queue)) for _ in range(5)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    winners = [value for kind, value in results if kind == "won"]
    assert len(winners) == 1, results
    for kind, message in results:
        if kind == "lost":
            assert message.startswith(f"--out-dir {tmp_path / 'out'} is in use by pid {winners[0]} on ")
            assert "\n" not in message and "choose another --out-dir" in message
    assert not (tmp_path / "out" / files.CLAIM_FILE).exists()


def _claim_and_die(folder):
    files.claim(Path(folder), "--out-dir", "hint")
    if os.fork() == 0:  # a worker (DataLoader) that outlives its killed parent for a while
        time.sleep(10)
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_claim_of_a_killed_process_is_taken_over_and_a_live_one_is_not(tmp_path):
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_claim_and_die, args=(tmp_path,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    lock = tmp_path / files.CLAIM_FILE
    assert json.loads(lock.read_text())["pid"] == child.pid  # what a kill -9 leaves behind
    held = files.claim(tmp_path, "--out-dir", "hint")
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    probe = subprocess.run([sys.executable, "-c", "from core import files; import sys; "
                            "files.claim(sys.argv[1], '--out-dir', 'hint')", str(tmp_path)],
                           cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and f"is in use by pid {os.getpid()}" in probe.stderr
    held.release()
    assert not lock.exists()


def test_without_file_locks_a_claim_is_the_lock_file_and_a_dead_pid_on_this_host_is_stale(tmp_path, monkeypatch):
    def no_locks(*_args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = tmp_path / files.CLAIM_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "time": 0, "command": "x"}))
    files.claim(tmp_path, "--out-dir", "hint").release()  # a dead process's lock file is taken over
    parent = os.getppid()  # alive
    lock.write_text(json.dumps({"pid": parent, "host": os.uname().nodename, "time": 0, "command": "x"}))
    with pytest.raises(files.OutputError, match=f"in use by pid {parent} .*delete {lock}"):
        files.claim(tmp_path, "--out-dir", "hint")


# ---- the atomic writer ---------------------------------------------------------------------------------------------
WRITER = """
import sys, numpy as np
from sampling.media import write_mp4
frames = np.random.default_rng(0).integers(0, 255, (4000, 64, 64, 3), dtype=np.uint8)
write_mp4(frames, sys.argv[1])
"""


def test_an_mp4_writer_killed_mid_write_leaves_no_file_under_the_videos_name(tmp_path):
    """kill -9 runs no cleanup: only a rename may give a video its name."""
    target = tmp_path / "000000_class001.mp4"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=REPO, env=child_env())
    try:
        deadline = time.time() + 120
        while not any(p.stat().st_size > 0 for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.time() < deadline, "the writer ended before it wrote anything"
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before the kill: give it more frames"
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{target.name}.tmp-{proc.pid}"]


# ---- the export tool's output --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save({"model": {"w": torch.ones(2, 3)}, "ema": {"w": torch.full((2, 3), 2.0)}, "stage": "autoencoder",
                "step": 7, "config": {"stage": "autoencoder"}}, path)
    return path


def export_error(capsys, *argv) -> str:
    from training.export import main

    with pytest.raises(SystemExit) as exit_info:
        run_reporting_user_errors(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_export_output_errors_are_one_line_and_leave_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = export_error(capsys, checkpoint, blocker / "ae.safetensors")
    assert str(blocker) in line and "is a file, not a folder" in line
    line = export_error(capsys, checkpoint, "/sys/cmd_export.safetensors")  # sysfs: not writable, even by root
    assert "/sys" in line and "cannot write" in line
    folder = tmp_path / "taken.safetensors"
    (folder / "inside").mkdir(parents=True)
    line = export_error(capsys, checkpoint, folder, "--overwrite")
    assert str(folder) in line and "is a folder" in line
    assert [p.name for p in folder.iterdir()] == ["inside"]

    def full_disk(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out" / "ae.safetensors"
    monkeypatch.setattr(os, "fsync", full_disk)  # where a full disk shows on file systems that allocate late
    line = export_error(capsys, checkpoint, target)
    monkeypatch.undo()
    assert str(target) in line and "No space left on device" in line
    assert list(target.parent.iterdir()) == []  # neither the file nor its temp file


def test_every_writer_goes_through_one_atomic_writer_and_reports_in_one_line(tmp_path, monkeypatch):
    from sampling.media import write_png

    image = np.zeros((4, 4, 3), np.uint8)
    target = tmp_path / "grid.png"
    target.write_bytes(b"the earlier grid")

    def full_disk(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(files.OutputError, match=f"^--out-dir {target}: cannot write it \\(No space left on device\\)$"):
        with files.reported("--out-dir", target):
            write_png(image, target)
    assert target.read_bytes() == b"the earlier grid" and sorted(tmp_path.iterdir()) == [target]
