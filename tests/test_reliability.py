"""Reliability of the real entry scripts: kill -9, torchrun restarts, SIGTERM, full disk, bad input, bad videos,
determinism."""
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.chain import perturbed_autoencoder
from tests.helpers.failures import assert_one_line_error, assert_untouched, snapshot
from tests.helpers.processes import LAUNCHED, REPO, child_env, free_port, run_python
from core import checkpoint as ckpt_io
from sampling.media import write_mp4
from training.optim import lr_factor

pytestmark = pytest.mark.slow  # trains or launches scripts for minutes: scheduled first (conftest.py)

# Every script runs CPU-sized: 16x16 clips of 4 frames, batch 4, a one-block autoencoder, losses logged every step.
SHRINK = ["train.global_batch_size=4", "data.resolution=[16,16]", "data.n_frames=4", "data.num_workers=0",
          "train.log_every=1", "train.num_eval_videos=2"]
AE = ["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", *SHRINK, "model.depth=1", "model.hidden_size=32"]
DIFFUSION_SHRINK = [*SHRINK, "diffusion.sample_steps=2", "train.sample_every=100000"]
AE_STEPS = 40  # the shared autoencoder run; its log is the reference for determinism and the torchrun restart
MOTION_REF = ["--max-steps", 20, "--ckpt-every", 2, "train.keep_last=2"]  # the kill -9 test's configuration


def motion_args(ae_ckpt):
    return ["train_motion_diffusion.py", "--config", "configs/tiny/motion.yaml", "--ae-ckpt", ae_ckpt,
            *DIFFUSION_SHRINK]


def content_args(ae_ckpt):
    return ["train_content_diffusion.py", "--config", "configs/tiny/content.yaml", "--ae-ckpt", ae_ckpt,
            *DIFFUSION_SHRINK]


# ---- process helpers ---------------------------------------------------------------------------------------------
def launch(args, output: Path, env=None, **popen_kwargs) -> subprocess.Popen:
    """Starts `python <args>` from the repo root with stdout+stderr going to `output` (a pipe could fill and block)."""
    handle = open(output, "w")
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=child_env(env), stdout=handle,
                            stderr=subprocess.STDOUT, text=True, **popen_kwargs)
    handle.close()  # the child holds its own copy
    proc.output_path = output
    LAUNCHED.append(proc)
    return proc


def output_of(proc) -> str:
    return Path(proc.output_path).read_text()


def wait_until(predicate, proc, timeout=180.0, poll=0.005) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"process ended (exit {proc.returncode}) before the awaited moment:\n{output_of(proc)[-4000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting:\n{output_of(proc)[-4000:]}")
        time.sleep(poll)


def kill_9(proc) -> None:
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, expected a kill:\n{output_of(proc)[-3000:]}"


def run_script(args, env=None, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """Like tests.helpers.processes.run_python(check=False), with extra subprocess arguments (preexec_fn)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=child_env(env), capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def children_of(pid: int) -> dict:
    """{child pid: its RANK} of the processes whose parent is `pid` (torchrun's workers), read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != pid:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # the process ended while being read
            continue
        ranks = [item.split(b"=", 1)[1].decode() for item in environ if item.startswith(b"RANK=")]
        found[int(entry.name)] = int(ranks[0]) if ranks else None
    return found


# ---- log and checkpoint helpers ----------------------------------------------------------------------------------
STEP_LINE = re.compile(r"\] (step (\d{7}) \| [^|]*)(?: \| .*steps/s.*| \| speed n/a)?$")  # without the speed


def step_lines(log: Path) -> list:
    """(step, 'step NNNNNNN | k=v ...') for every training log line of log.txt, in order (repeats kept)."""
    lines = []
    for line in log.read_text().splitlines():
        match = STEP_LINE.search(line)
        if match:
            lines.append((int(match.group(2)), match.group(1)))
    return lines


def logged_values(text: str) -> dict:
    return {key: float(value) for key, value in re.findall(r"(\w+)=([^\s]+)", text.split("|", 1)[1])}


def last_logged_step(log: Path) -> int:
    lines = step_lines(log) if log.exists() else []
    return lines[-1][0] if lines else 0


def resumed_steps(log: Path) -> list:
    return ([int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", log.read_text())]
            if log.exists() else [])


def temp_files(ckpt_dir: Path) -> list:
    return sorted(p.name for p in ckpt_dir.iterdir() if ".tmp-" in p.name) if ckpt_dir.is_dir() else []


def load(path) -> dict:
    return ckpt_io.safe_torch_load(path)


def assert_states_close(got: dict, want: dict, atol: float, keys=("model", "ema")) -> None:
    for key in keys:
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            assert torch.allclose(got[key][name], want[key][name], atol=atol, rtol=0), \
                f"{key}.{name} differs by {(got[key][name] - want[key][name]).abs().max().item():.3g}"


def assert_optimizer_close(got: dict, want: dict, atol: float) -> None:
    assert got["step"] == want["step"]
    for index, state in want["opt"]["state"].items():
        for name, value in state.items():
            assert torch.allclose(got["opt"]["state"][index][name].float(), value.float(), atol=atol, rtol=0), \
                f"optimizer state {index}.{name} differs"


# ---- video files -------------------------------------------------------------------------------------------------
def write_clip(path: Path, n_frames: int, seed: int) -> None:
    """A small real video (32x32, moving gradient) through the repo's own mp4 writer."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, 32, 32, 3)).astype(np.int64)
    frames = ((base + 9 * np.arange(n_frames)[:, None, None, None]) % 256).astype(np.uint8)
    write_mp4(frames, path, fps=8)


# ---- the shared trained runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One autoencoder, one motion and one content run (CPU-tiny), shared read-only; tests copy what they change."""
    results = tmp_path_factory.mktemp("trained") / "results"
    run_python([*AE, "--results-dir", results, "--exp-name", "ae", "--max-steps", AE_STEPS, "--ckpt-every", 10])
    ae_ckpt = results / "ae" / "checkpoints" / "last.pt"
    run_python([*motion_args(ae_ckpt), "--results-dir", results, "--exp-name", "motion", *MOTION_REF])
    run_python([*content_args(ae_ckpt), "--results-dir", results, "--exp-name", "content", "--max-steps", 1])
    return SimpleNamespace(results=results, ae_dir=results / "ae", ae_ckpt=ae_ckpt,
                           motion_dir=results / "motion",
                           motion_ckpt=results / "motion" / "checkpoints" / "last.pt",
                           content_dir=results / "content",
                           content_ckpt=results / "content" / "checkpoints" / "last.pt")


def copy_run(run_dir: Path, results: Path) -> Path:
    target = results / run_dir.name
    shutil.copytree(run_dir, target)
    return target


# ---- 1. kill -9 at random moments, torn checkpoint writes ---------------------------------------------------------
def test_kill_9_and_torn_checkpoints_resume_exactly(trained, tmp_path):
    """Motion stage (noise, timesteps and label dropout all draw from the RNG) killed three times, then a torn last.pt:
    the resumed run ends bit-for-bit where the uninterrupted one did, and every logged loss matches it."""
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    results = tmp_path / "results"
    args = [*motion_args(trained.ae_ckpt), "--results-dir", results, *MOTION_REF]
    run_dir = results / "run"
    ckpt_dir, log = run_dir / "checkpoints", run_dir / "log.txt"
    kills = []

    def record_kill(proc):
        last_step = last_logged_step(log)
        kill_9(proc)
        found = ckpt_io.latest_checkpoint_in_run(run_dir)
        kills.append((last_step, load(found)["step"], temp_files(ckpt_dir)))

    # A: killed the moment the step-4 checkpoint appears (last.pt is being written right then).
    proc = launch([*args, "--exp-name", "run"], tmp_path / "a.out")
    wait_until(lambda: (ckpt_dir / "0000004.pt").exists(), proc, poll=0.001)
    record_kill(proc)
    # B: killed while one of its own checkpoint temp files exists, i.e. in the middle of a checkpoint write
    # (should the polling miss every write, it is killed mid-training at step 14 instead).
    proc = launch([*args, "--resume", "auto"], tmp_path / "b.out")
    wait_until(lambda: any(name.endswith(f"tmp-{proc.pid}") for name in temp_files(ckpt_dir))
               or last_logged_step(log) >= 14, proc, poll=0.0005)
    record_kill(proc)
    # C: killed at a random moment of training.
    proc = launch([*args, "--resume", "auto"], tmp_path / "c.out")
    wait_until(lambda: len(resumed_steps(log)) == 2, proc)
    time.sleep(rng.uniform(0.0, 0.4))
    record_kill(proc)
    # A torn last.pt (as a non-atomic writer would leave it) and a stale temp file beside it.
    last = ckpt_dir / "last.pt"
    torn = last.read_bytes()[: last.stat().st_size // 2]
    last.unlink()  # last.pt is a hard link to the newest step file: a torn last.pt is a new, half-written file
    last.write_bytes(torn)
    (ckpt_dir / ".last.pt.tmp-999999").write_bytes(b"\x00" * 1000)
    newest_step_file = ckpt_io.step_checkpoints(ckpt_dir)[-1]
    run_python([*args, "--resume", "auto"])

    note = f"(RELIABILITY_SEED={seed}; kills at (last logged step, newest complete checkpoint, temp files): {kills})"
    # Each restart continued from the newest complete checkpoint, losing at most the steps since it was written.
    assert resumed_steps(log) == [complete for _, complete, _ in kills], note
    for last_step, complete, _ in kills:
        assert last_step - complete <= 2, f"more than ckpt_every=2 steps lost {note}"
    # The torn last.pt was passed over.
    assert f"resumed from {newest_step_file} at step {int(newest_step_file.stem)}" in log.read_text(), note

    reference_ckpt = load(trained.motion_ckpt)
    final = load(ckpt_dir / "last.pt")
    assert final["step"] == reference_ckpt["step"] == 20
    assert_states_close(final, reference_ckpt, atol=1e-6)
    assert_optimizer_close(final, reference_ckpt, atol=1e-6)
    assert torch.equal(final["rng"][0]["torch"], reference_ckpt["rng"][0]["torch"]), note

    reference = dict(step_lines(trained.motion_dir / "log.txt"))
    chain = step_lines(log)
    assert sorted({step for step, _ in chain}) == list(range(1, 21)), note
    for step, text in chain:  # steps redone after a kill repeat the same losses
        assert text == reference[step], f"step {step}: {text} != {reference[step]} {note}"


def test_requeue_after_kill_during_first_checkpoint_write(trained, tmp_path):
    """A job killed while writing its first checkpoint is requeued with the same command (exp name + resume=auto):
    it must start over in its folder (there is nothing to resume) and finish like an uninterrupted run."""
    results = tmp_path / "results"
    args = [*AE, "--results-dir", results, "--exp-name", "ae", "--max-steps", AE_STEPS, "--ckpt-every", 10,
            "train.resume=auto"]
    ckpt_dir = results / "ae" / "checkpoints"
    proc = launch(args, tmp_path / "first.out")
    wait_until(lambda: ckpt_dir.is_dir() and any(ckpt_dir.iterdir()), proc, poll=0.0005)
    kill_9(proc)
    # Make the state exactly "killed inside the first write", whichever instant the kill actually hit.
    for complete in ckpt_dir.glob("*.pt"):
        complete.unlink()
    if not temp_files(ckpt_dir):
        (ckpt_dir / ".0000010.pt.tmp-999999").write_bytes(b"partial")
    proc = run_python(args, check=False)
    assert proc.returncode == 0, f"requeued job failed:\n{proc.stderr[-3000:]}"
    assert_states_close(load(ckpt_dir / "last.pt"), load(trained.ae_ckpt), atol=1e-6)


def test_resume_clears_stale_checkpoint_temp_files(trained, tmp_path):
    """Every kill during a save leaves a temp file as large as a checkpoint; a resumed run must remove them,
    or repeated pre-emptions fill the disk (and then the next save fails)."""
    results = tmp_path / "results"
    run_dir = copy_run(trained.ae_dir, results)
    (run_dir / "checkpoints" / ".last.pt.tmp-999999").write_bytes(trained.ae_ckpt.read_bytes()[:100_000])
    (run_dir / "checkpoints" / f".{AE_STEPS:07d}.pt.tmp-999998").write_bytes(b"")
    run_python([*AE, "--results-dir", results, "--resume", "auto", "--max-steps", AE_STEPS + 1, "--ckpt-every", 10])
    assert ckpt_io.load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == AE_STEPS + 1
    assert temp_files(run_dir / "checkpoints") == []


# ---- 2. torchrun restart ----------------------------------------------------------------------------------------
def test_torchrun_restart_resumes_by_itself(trained, tmp_path):
    """Rank 0 of a 2-process run is SIGKILLed after the step-10 checkpoint; torchrun --max-restarts=1 relaunches the
    group, which resumes (train.resume=auto) and finishes; its losses follow the single-process reference run."""
    results = tmp_path / "results"
    log = results / "run" / "log.txt"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", f"--master_port={free_port()}",
                "--max-restarts=1"]
    proc = launch([*launcher, *AE, "--results-dir", results, "--exp-name", "run", "--max-steps", 60,
                   "--ckpt-every", 10, "train.resume=auto"], tmp_path / "torchrun.out")
    try:
        wait_until(lambda: last_logged_step(log) >= 12, proc)
        workers = children_of(proc.pid)
        assert sorted(r for r in workers.values() if r is not None) == [0, 1], workers
        os.kill(next(pid for pid, rank in workers.items() if rank == 0), signal.SIGKILL)
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the restarted group hung (see the end of the output):\n{output_of(proc)[-4000:]}")
    finally:
        if proc.poll() is None:  # torchrun starts its workers in sessions of their own: end them one by one
            for pid in children_of(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output_of(proc)[-4000:]

    resumed = resumed_steps(log)
    assert len(resumed) == 1 and 10 <= resumed[0] < AE_STEPS, log.read_text()[-3000:]
    assert "done at step 60" in log.read_text()
    assert load(results / "run" / "checkpoints" / "last.pt")["step"] == 60
    # DDP sums gradients in another order than one process: equal to float tolerance, not bit-for-bit.
    reference = dict(step_lines(trained.ae_dir / "log.txt"))
    for step, text in step_lines(log):
        if step <= AE_STEPS:
            got, want = logged_values(text), logged_values(reference[step])
            assert all(math.isclose(got[k], want[k], rel_tol=2e-3, abs_tol=1e-4) for k in want), (text, reference[step])
    assert_states_close(load(results / "run" / "checkpoints" / f"{AE_STEPS:07d}.pt"), load(trained.ae_ckpt), atol=1e-3)


# ---- 3. SIGTERM -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, signal_number", [("main process", signal.SIGTERM), ("process group", signal.SIGTERM),
                                                    ("process group", signal.SIGINT)],
                         ids=["SIGTERM to the trainer", "SIGTERM to its process group", "SIGINT to its process group"])
def test_stop_signal_checkpoints_and_exits_cleanly(tmp_path, target, signal_number):
    """Pre-emption: SIGTERM to the trainer (Kubernetes) or to its whole process group, DataLoader workers included
    (Slurm's scancel); Ctrl-C (SIGINT to the terminal's process group): a checkpoint of the last finished step,
    a log line saying so, exit code 0."""
    log = tmp_path / "run" / "log.txt"
    proc = launch([*AE, "--results-dir", tmp_path, "--exp-name", "run", "--max-steps", 100000, "--ckpt-every", 100000,
                   "data.num_workers=1"], tmp_path / "out.txt", start_new_session=True)
    wait_until(lambda: last_logged_step(log) >= 5, proc)
    if target == "main process":
        proc.send_signal(signal_number)
    else:
        os.killpg(proc.pid, signal_number)
    proc.wait(timeout=120)
    output = output_of(proc)
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    name = signal.Signals(signal_number).name
    match = re.search(rf"received {name}: checkpoint at step (\d+) saved, exiting cleanly", log.read_text())
    assert match, log.read_text()[-2000:]
    saved = ckpt_io.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["step"] == int(match.group(1)) == last_logged_step(log) >= 5


# ---- 4. non-finite loss on a real script -------------------------------------------------------------------------
def test_nonfinite_loss_skipped_then_one_line_stop(tmp_path):
    """lr=inf turns every weight into NaN after the first update: the NaN losses are skipped with a warning each,
    and the third in a row ends the run with one line."""
    proc = run_script([*AE, "--results-dir", tmp_path, "--exp-name", "run", "--max-steps", 20, "optim.lr=inf",
                       "train.max_nonfinite_steps=3"])
    assert_one_line_error(proc, "3 non-finite losses in a row", exit_code=1)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("non-finite loss/gradient, update skipped") == 3


# ---- 5. no space left while saving ---------------------------------------------------------------------------------
def test_full_disk_while_saving_keeps_previous_checkpoint(trained, tmp_path):
    """A write limit below a checkpoint's size (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk):
    the run stops with one line naming the checkpoint, last.pt is untouched and loads, no temp file is left."""
    run_dir = copy_run(trained.ae_dir, tmp_path / "results")
    ckpt_dir = run_dir / "checkpoints"
    before = (ckpt_dir / "last.pt").read_bytes()
    limit = (ckpt_dir / "last.pt").stat().st_size // 3  # logs, previews and TensorBoard events stay far below it

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = run_script([*AE, "--results-dir", tmp_path / "results", "--resume", run_dir, "--max-steps", AE_STEPS + 5,
                       "--ckpt-every", 10], preexec_fn=limit_file_size)
    assert (ckpt_dir / "last.pt").read_bytes() == before
    assert ckpt_io.load_checkpoint(ckpt_dir / "last.pt")["step"] == AE_STEPS
    assert temp_files(ckpt_dir) == []
    line = assert_one_line_error(proc, exit_code=1)
    assert f"{AE_STEPS + 5:07d}.pt" in line or "last.pt" in line, line


# ---- 6. bad input: one line naming the culprit, nothing overwritten -----------------------------------------------
def _bad_videos(folder: Path) -> Path:
    (folder / "Alpha").mkdir(parents=True)
    (folder / "Alpha" / "zero.mp4").write_bytes(b"")
    (folder / "Alpha" / "noise.avi").write_bytes(
        np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    return folder


def bad_input_case(name: str, trained, tmp: Path):
    """(args, culprits named in the error line, exit code or None, folder that must stay untouched or None)."""
    results = tmp / "results"
    if name == "missing data path":
        path = tmp / "no_such_folder"
        return [*AE, "--results-dir", results, "--dataset-name", "folder", "--data-path", path], [path], 1, None
    if name == "data path not given":
        return [*AE, "--results-dir", results, "--dataset-name", "folder"], ["data.data_path"], 2, None
    if name == "empty data folder":
        path = tmp / "empty"
        path.mkdir()
        return [*AE, "--results-dir", results, "--dataset-name", "folder", "--data-path", path], [path], 1, None
    if name == "no usable videos":
        path = _bad_videos(tmp / "videos")
        return ([*AE, "--results-dir", results, "--dataset-name", "folder", "--data-path", path],
                [path, "no usable videos"], 1, None)
    if name == "ae-ckpt is a motion checkpoint":
        return ([*content_args(trained.motion_ckpt), "--results-dir", results, "--max-steps", 1],
                [trained.motion_ckpt, "'motion' checkpoint"], 1, trained.motion_dir)
    def sample(ae, motion, content):
        return ["sample.py", "--ae-ckpt", ae, "--motion-ckpt", motion, "--content-ckpt", content, "--num-videos", 1,
                "--out-dir", tmp / "samples", "--quiet"]

    if name == "sample motion-ckpt is a content checkpoint":
        return (sample(trained.ae_ckpt, trained.content_ckpt, trained.content_ckpt),
                [trained.content_ckpt, "'content' checkpoint"], 1, trained.content_dir)
    if name == "sample ae-ckpt is a motion checkpoint":
        return (sample(trained.motion_ckpt, trained.motion_ckpt, trained.content_ckpt),
                [trained.motion_ckpt, "'motion' checkpoint"], 1, trained.motion_dir)
    if name == "sample content-ckpt is a motion checkpoint":
        return (sample(trained.ae_ckpt, trained.motion_ckpt, trained.motion_ckpt),
                [trained.motion_ckpt, "'motion' checkpoint"], 1, trained.motion_dir)
    if name == "ae-ckpt auto finds no autoencoder":
        return ([*motion_args("auto"), "--results-dir", results, "--max-steps", 1], ["ae_ckpt=auto", results], 1, None)
    if name == "resume from another stage":
        run_dir = copy_run(trained.content_dir, results)
        path = run_dir / "checkpoints" / "last.pt"
        return ([*motion_args(trained.ae_ckpt), "--results-dir", results, "--max-steps", 25, "--resume", path],
                [path, "'content' checkpoint"], 1, run_dir)
    if name == "resume from a torn file":
        run_dir = copy_run(trained.ae_dir, results)
        path = run_dir / "checkpoints" / "0000030.pt"
        path.write_bytes(path.read_bytes()[:5000])
        return ([*AE, "--results-dir", results, "--max-steps", 45, "--resume", path],
                [path, "cannot be read"], 1, run_dir)
    if name == "ae frames differ from data":
        return ([*motion_args(trained.ae_ckpt), "--results-dir", results, "data.n_frames=8"],
                [trained.ae_ckpt, "4x16x16", "8x16x16"], 1, trained.ae_dir)
    if name == "ae resolution differs from data":
        return ([*content_args(trained.ae_ckpt), "--results-dir", results, "data.resolution=[32,32]"],
                [trained.ae_ckpt, "4x16x16", "4x32x32"], 1, trained.ae_dir)
    if name == "unknown config key":
        return [*motion_args(trained.ae_ckpt), "--results-dir", results, "model.depthh=3"], ["model.depthh"], 2, None
    if name == "class id out of range":
        image = tmp / "frame.png"
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(image)
        return (["sample.py", "--ae-ckpt", trained.ae_ckpt, "--motion-ckpt", trained.motion_ckpt,
                 "--content-frame", image, "--classes", "1,9", "--num-videos", 2, "--out-dir", tmp / "samples",
                 "--quiet"], ["9", "--classes"], 1, None)
    if name == "resume with another model size":
        run_dir = copy_run(trained.ae_dir, results)
        return ([*AE, "--results-dir", results, "--resume", run_dir, "--max-steps", AE_STEPS + 2,
                 "model.hidden_size=64"], [run_dir, "model.hidden_size: 32 -> 64"], 1, run_dir)
    if name == "resume with another DiT":
        run_dir = copy_run(trained.motion_dir, results)
        return ([*motion_args(trained.ae_ckpt), "--results-dir", results, "--resume", run_dir, "--max-steps", 25,
                 "--model", "MotionDiT-S/2"], ["model.name: MotionDiT-T/2 -> MotionDiT-S/2"], 1, run_dir)
    if name == "resume with another autoencoder":
        run_dir = copy_run(trained.motion_dir, results)
        other = perturbed_autoencoder(trained.ae_ckpt, tmp / "other_ae.pt")
        return ([*motion_args(other), "--results-dir", results, "--resume", run_dir, "--max-steps", 25],
                [run_dir, other, "another autoencoder"], 1, run_dir)
    if name == "resume auto of a named run with other data":
        run_dir = copy_run(trained.ae_dir, results)
        return ([*AE, "--results-dir", results, "--exp-name", "ae", "--resume", "auto", "--max-steps", AE_STEPS + 2,
                 "data.synthetic_size=64"], [run_dir, "data.synthetic_size"], 1, run_dir)
    if name == "sample with another autoencoder":
        other = perturbed_autoencoder(trained.ae_ckpt, tmp / "other_ae.pt")
        return (["sample.py", "--ae-ckpt", other, "--motion-ckpt", trained.motion_ckpt, "--content-ckpt",
                 trained.content_ckpt, "--num-videos", 1, "--out-dir", tmp / "samples", "--quiet"],
                [trained.motion_ckpt, trained.ae_ckpt, "--allow-ae-mismatch"], 1, None)
    if name == "foreign weights of the right keys":
        foreign = tmp / "foreign_ae.pt"
        ckpt = load(trained.ae_ckpt)
        key = sorted(ckpt["ema"])[3]
        for name_ in ("model", "ema"):
            ckpt[name_][key] = torch.zeros(tuple(ckpt[name_][key].shape) + (2,))
        torch.save(ckpt, foreign)
        return ([*motion_args(foreign), "--results-dir", results, "--max-steps", 1], [foreign, f"'{key}'"], 1, None)
    if name == "results dir under a file":
        blocker = tmp / "a_file"
        blocker.write_text("not a folder")
        return ([*AE, "--results-dir", blocker / "results", "--max-steps", 1],
                ["--results-dir", blocker / "results"], 1, None)
    if name == "results dir on a pseudo file system":
        return ([*AE, "--results-dir", "/proc/cmd_results", "--max-steps", 1],
                ["--results-dir", "/proc/cmd_results"], 1, None)
    if name == "results folder holds a run":
        run_dir = copy_run(trained.ae_dir, results)
        return ([*AE, "--results-dir", results, "--exp-name", "ae", "--max-steps", 2],
                [run_dir, "already holds a run"], 1, run_dir)
    raise KeyError(name)


BAD_INPUTS = ["missing data path", "data path not given", "empty data folder", "no usable videos",
              "ae-ckpt is a motion checkpoint", "ae-ckpt auto finds no autoencoder",
              "sample ae-ckpt is a motion checkpoint", "sample motion-ckpt is a content checkpoint",
              "sample content-ckpt is a motion checkpoint", "resume from another stage",
              "resume from a torn file", "ae frames differ from data", "ae resolution differs from data",
              "unknown config key", "class id out of range", "results folder holds a run",
              "resume with another model size", "resume with another DiT", "resume with another autoencoder",
              "resume auto of a named run with other data", "sample with another autoencoder",
              "foreign weights of the right keys", "results dir under a file", "results dir on a pseudo file system"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_overwrites_nothing(trained, tmp_path, case):
    args, culprits, exit_code, protected = bad_input_case(case, trained, tmp_path)
    before = snapshot(protected) if protected is not None else None
    proc = run_script(args)
    assert_one_line_error(proc, *culprits, exit_code=exit_code)
    if protected is not None:
        assert_untouched(protected, before)


def test_resume_from_a_file_outside_any_run_folder_writes_only_under_results(trained, tmp_path):
    """A checkpoint copied somewhere (a download, a backup) and given to --resume: the continued run must go to a run
    folder under results_dir, not into whatever folder sits two levels above the file."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copy(trained.ae_ckpt, downloads / "ae.pt")
    results = tmp_path / "results"
    run_python([*AE, "--results-dir", results, "--resume", downloads / "ae.pt", "--max-steps", AE_STEPS + 1,
                "--ckpt-every", 10])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "results"]
    assert [p.name for p in downloads.iterdir()] == ["ae.pt"]
    finals = list(results.glob("*/checkpoints/last.pt"))
    assert len(finals) == 1 and load(finals[0])["step"] == AE_STEPS + 1


class _RunsCode:
    """A pickle that runs a shell command when it is unpickled: what a hostile checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_unrun(trained, tmp_path):
    """A .pt with the right entries whose pickle runs a command: every loader refuses it in one line, nothing runs."""
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "run" / "checkpoints" / "last.pt"
    hostile.parent.mkdir(parents=True)
    ckpt = load(trained.ae_ckpt)
    ckpt["payload"] = _RunsCode(marker)
    torch.save(ckpt, hostile)
    with pytest.raises(ckpt_io.CheckpointError, match="pickled object .*never run code"):
        ckpt_io.load_checkpoint(hostile)
    assert ckpt_io.latest_checkpoint_in_run(tmp_path / "run") is None  # passed over like a torn file
    for args in (["sample.py", "--ae-ckpt", hostile, "--motion-ckpt", trained.motion_ckpt, "--content-ckpt",
                  trained.content_ckpt, "--num-videos", 1, "--out-dir", tmp_path / "samples", "--quiet"],
                 [*AE, "--results-dir", tmp_path / "results", "--resume", hostile, "--max-steps", AE_STEPS + 1]):
        assert_one_line_error(run_script(args), hostile, "never run code", exit_code=1)
    assert not marker.exists(), "loading the checkpoint ran its code"


def test_checkpoints_of_an_older_version_with_numpy_rng_state_still_load(trained, tmp_path):
    """Checkpoints from before the RNG states were tensors hold numpy's state tuple: they load weights-only and
    resume with that exact numpy stream."""
    legacy = load(trained.ae_ckpt)
    state = np.random.RandomState(7).get_state()
    legacy["rng"] = [{**legacy["rng"][0], "numpy": state}]
    legacy.pop("samples_seen")
    legacy["data_position"] = AE_STEPS * 4
    path = tmp_path / "legacy.pt"
    torch.save(legacy, path)
    loaded = ckpt_io.load_checkpoint(path)
    assert np.array_equal(loaded["rng"][0]["numpy"][1], state[1])
    from training.checkpointing import samples_seen as _samples_seen, set_rng_state as _set_rng_state

    _set_rng_state(loaded["rng"][0])
    assert np.random.rand() == np.random.RandomState(7).rand()
    assert _samples_seen(loaded) == AE_STEPS * 4


def test_resume_applies_a_changed_learning_rate_and_batch_size_and_says_so(trained, tmp_path):
    """The rule: optimiser and batch settings changed on resume apply, the log says so, the checkpoint records what
    trained, and the data stream continues at the exact clip (counted in clips, not steps)."""
    run_dir = copy_run(trained.ae_dir, tmp_path / "results")
    old_lr = load(trained.ae_ckpt)["config"]["optim"]["lr"]
    run_python([*AE, "--results-dir", tmp_path / "results", "--resume", run_dir, "--max-steps", AE_STEPS + 2,
                "--ckpt-every", 1, "optim.lr=1e-5", "train.global_batch_size=8"])
    log = (run_dir / "log.txt").read_text()
    assert f"resume: optim.lr {old_lr} -> 1e-05 (applied)" in log, log[-2000:]
    assert f"resume: train.global_batch_size 4 -> 8 (applied); the data stream continues at clip {AE_STEPS * 4}" in log
    for step, seen in ((AE_STEPS + 1, AE_STEPS * 4 + 8), (AE_STEPS + 2, AE_STEPS * 4 + 16)):
        ckpt = load(run_dir / "checkpoints" / f"{step:07d}.pt")
        assert ckpt["samples_seen"] == seen
        assert ckpt["config"]["optim"]["lr"] == 1e-5
        # the update that reached `step` ran at the new rate times the schedule's factor (the tiny config warms up)
        factor = lr_factor(SimpleNamespace(**ckpt["config"]["optim"]), step - 1, AE_STEPS + 2)
        for group in ckpt["opt"]["param_groups"]:
            assert group["base_lr"] == 1e-5
            assert group["lr"] == pytest.approx(1e-5 * factor, rel=1e-12)


def test_resume_auto_passes_over_a_run_with_other_data_and_leaves_it_alone(trained, tmp_path):
    results = tmp_path / "results"
    other = copy_run(trained.ae_dir, results)
    before = snapshot(other)
    run_python([*AE, "--results-dir", results, "--resume", "auto", "--max-steps", 2, "data.synthetic_size=64"])
    assert_untouched(other, before)
    new_runs = [p for p in results.iterdir() if p != other]
    assert [p.name for p in new_runs] == ["000-autoencoder"]
    log = (new_runs[0] / "log.txt").read_text()
    assert f"resume auto: not continuing {other}: its settings differ (data.synthetic_size: " in log, log[-2000:]
    assert load(new_runs[0] / "checkpoints" / "last.pt")["step"] == 2


def _claim(results, barrier, queue):
    from training.run_folder import claim_run_dir

    barrier.wait()
    queue.put(claim_run_dir(Path(results), "motion").path.name)


def test_run_folders_claimed_at_the_same_instant_are_distinct(tmp_path):
    """Runs started together in one --results-dir (no --exp-name) each get their own NNN-stage folder."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for index in range(300):
        (tmp_path / f"{index:03d}-content").mkdir()
    barrier, queue = context.Barrier(6), context.Queue()
    workers = [context.Process(target=_claim, args=(tmp_path, barrier, queue)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    names = sorted(queue.get(timeout=5) for _ in workers)
    assert names == [f"{index:03d}-motion" for index in range(300, 306)], names


def test_a_second_start_with_the_same_exp_name_stops_and_the_first_run_loses_nothing(trained, tmp_path):
    """A double-submitted job: the second start (and a --resume of the run) stops in one line naming the folder
    and the live process, writing nothing; once that process is killed (-9), --resume auto continues its run."""
    results = tmp_path / "results"
    run_dir = results / "run"
    ckpt_dir = run_dir / "checkpoints"
    args = [*AE, "--results-dir", results, "--exp-name", "run", "--ckpt-every", 2]
    first = launch([*args, "--max-steps", 100000], tmp_path / "first.out")
    wait_until(lambda: (ckpt_dir / "0000004.pt").exists(), first)
    config = (run_dir / "config.yaml").read_bytes()
    for extra in ([], ["--resume", "auto"], ["--resume", run_dir]):
        proc = run_script([*args, "--max-steps", 3, *extra])
        line = assert_one_line_error(proc, run_dir, f"pid {first.pid}", exit_code=1)
        assert "in use by" in line
    assert first.poll() is None, output_of(first)[-3000:]
    assert (run_dir / "config.yaml").read_bytes() == config
    assert (run_dir / "log.txt").read_text().count(" run in ") == 1  # no other start logged into the run
    kill_9(first)
    newest = load(ckpt_io.latest_checkpoint_in_run(run_dir))["step"]
    assert newest >= 4
    run_python([*args, "--resume", "auto", "--max-steps", newest + 2])
    assert resumed_steps(run_dir / "log.txt") == [newest]
    assert load(ckpt_dir / "last.pt")["step"] == newest + 2
    assert not (run_dir / ".cmd-claim").exists()


def test_a_failed_start_leaves_no_run_folder(trained, tmp_path):
    """A wrong data path or an unusable checkpoint found after the run folder was made: the folder goes again."""
    results = tmp_path / "results"
    proc = run_script([*AE, "--results-dir", results, "--dataset-name", "folder", "--data-path", tmp_path / "nope"])
    assert_one_line_error(proc, tmp_path / "nope", exit_code=1)
    proc = run_script([*content_args(trained.motion_ckpt), "--results-dir", results, "--exp-name", "named"])
    assert_one_line_error(proc, trained.motion_ckpt, exit_code=1)
    assert sorted(results.iterdir()) == []


def test_a_wrong_data_path_under_torchrun_is_one_line_on_every_rank(tmp_path):
    results = tmp_path / "results"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", f"--master_port={free_port()}"]
    proc = run_script([*launcher, *AE, "--results-dir", results, "--dataset-name", "folder", "--data-path",
                       tmp_path / "nope"])
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all(str(tmp_path / "nope") in line for line in errors), output[-4000:]
    # torchrun itself reports a failed worker with its own traceback; the workers' code shows none.
    assert "DistBackendError" not in output and "gloo" not in output, output[-4000:]
    assert f'File "{REPO}' not in output, output[-4000:]
    assert not results.exists() or sorted(results.iterdir()) == []  # checked before a run folder is claimed


# ---- 7. damaged videos in the training data --------------------------------------------------------------------------
def test_training_over_damaged_videos_finishes_and_reports_skips(tmp_path):
    data = tmp_path / "videos"
    write_clip(data / "Alpha" / "good_a.mp4", 12, seed=1)
    write_clip(data / "Beta" / "good_b.mp4", 12, seed=2)
    write_clip(data / "Alpha" / "short.mp4", 2, seed=3)  # a clip needs 4 frames
    (data / "Beta" / "zero.mp4").write_bytes(b"")
    write_clip(data / "Beta" / "truncated.mp4", 30, seed=4)
    truncated = data / "Beta" / "truncated.mp4"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (data / "Alpha" / "corrupt.avi").write_bytes(
        np.random.default_rng(5).integers(0, 255, 8192, dtype=np.uint8).tobytes())
    proc = run_python([*AE, "--results-dir", tmp_path / "results", "--exp-name", "run", "--dataset-name", "folder",
                       "--data-path", data, "--max-steps", 3, "data.num_classes=null"], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "results" / "run" / "log.txt").read_text()
    assert re.search(r"\b2 videos, 2 classes, 4 skipped\b", log), log[-3000:]
    for bad in ("Alpha/short.mp4", "Beta/zero.mp4", "Beta/truncated.mp4", "Alpha/corrupt.avi"):
        assert re.search(rf"skipping \S*{re.escape(bad)}: ", log), f"{bad} not reported:\n{log[-3000:]}"
    assert "done at step 3" in log


# ---- 8. determinism ------------------------------------------------------------------------------------------------
def test_same_seed_and_config_give_the_same_losses(trained, tmp_path):
    run_python([*AE, "--results-dir", tmp_path, "--exp-name", "ae", "--max-steps", 20, "--ckpt-every", 10])
    again = step_lines(tmp_path / "ae" / "log.txt")
    first = step_lines(trained.ae_dir / "log.txt")[:20]
    assert [step for step, _ in again] == list(range(1, 21))
    assert again == first
    losses = [logged_values(text)["loss"] for _, text in first]
    assert len(set(losses)) > 10 and losses[-1] < losses[0]  # a real, changing signal, not a constant
