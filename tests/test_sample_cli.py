"""sample.py at its trust boundary: flags, the --content-frame image, output folders, earlier runs, stop signals,
and the autoencoder identity check. Every refusal is one line naming the flag or path, before any model loads."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sampling.requests
from datasets.transforms import load_image
from sampling.generation import dataset_labels
from sampling.outputs import OutputError, check_outputs
from sampling.requests import class_list, labels_by_frequency
from sampling.settings import SampleSettings, resolve_settings, stage_options
from tests.helpers.chain import TINY_AE, TINY_DIFFUSION, perturbed_autoencoder, train
from tests.helpers.processes import REPO, child_env, run_python
from sampling.media import write_mp4

pytestmark = pytest.mark.slow  # trains or launches scripts for minutes: scheduled first (conftest.py)

N_FRAMES, RESOLUTION = 10, 16  # the clips of tests.helpers.chain.TINY_DATA


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One tiny autoencoder, motion and content checkpoint (single process, 2 steps each), shared by every test."""
    tmp = tmp_path_factory.mktemp("sample_cli")
    train(tmp, "train_ae.py", "autoencoder", "ae", 2, *TINY_AE, "train.eval_every=2")
    ae = tmp / "ae" / "checkpoints" / "last.pt"
    train(tmp, "train_motion_diffusion.py", "motion", "motion", 2, "--ae-ckpt", ae, *TINY_DIFFUSION)
    train(tmp, "train_content_diffusion.py", "content", "content", 2, "--ae-ckpt", ae, *TINY_DIFFUSION)
    return {"ae": ae, "motion": tmp / "motion" / "checkpoints" / "last.pt",
            "content": tmp / "content" / "checkpoints" / "last.pt"}


def sample_args(ckpts, out_dir, *extra):
    args = ["sample.py", "--ae-ckpt", ckpts["ae"], "--motion-ckpt", ckpts["motion"], "--content-steps", 2,
            "--motion-steps", 2, "--out-dir", out_dir, "--quiet", *extra]
    if "--content-frame" not in extra:
        args += ["--content-ckpt", ckpts["content"]]
    return args


def run_sample(ckpts, out_dir, *extra):
    return run_python(sample_args(ckpts, out_dir, *extra), check=False, timeout=300)


def one_line_error(proc, *culprits, exit_code=1) -> str:
    """The last stderr line is the only message: `error: ...` (or argparse's `...: error: ...`), naming each culprit."""
    assert proc.returncode == exit_code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "error: " in line, proc.stderr[-3000:]
    for culprit in culprits:
        assert str(culprit) in line, f"{culprit!r} not named in: {line}"
    return line


def mp4s(folder: Path) -> list:
    return sorted(folder.glob("*.mp4")) if folder.is_dir() else []


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


# ---- 1. flags: refused by the parser, naming the flag, exit 2 -------------------------------------------------------
BASE = ["--ae-ckpt", "ae.pt", "--motion-ckpt", "motion.pt"]


@pytest.mark.parametrize("flag, value", [("--num-videos", "0"), ("--num-videos", "-3"), ("--batch-size", "0"),
                                         ("--batch-size", "-2"), ("--classes", "dataset,1"), ("--classes", "1,,2"),
                                         ("--classes", "-1"), ("--grid-videos", "0"), ("--fps", "0"),
                                         ("--motion-steps", "0"), ("--content-steps", "-1"), ("--num-videos", "2.5"),
                                         ("--motion-cfg-scale", "nan"), ("--motion-cfg-scale", "1e300"),
                                         ("--content-cfg-scale", "-2"), ("--seed", str(2**64)), ("--seed", "-1"),
                                         ("--seed", "x"), ("--preset", "euler"),
                                         ("--motion-sampler", "dpm"), ("--precision", "fp16")])
def test_bad_flag_value_is_refused_by_the_parser_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        sample.parse_args([*BASE, f"{flag}={value}"])
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}:" in line and value in line, line


def test_good_flag_values_parse():
    args = sample.parse_args([*BASE, "--num-videos", "3", "--batch-size", "1", "--classes", "2, 0"])
    assert (args.num_videos, args.batch_size, args.classes) == (3, 1, [2, 0])
    assert sample.parse_args([*BASE, "--seed", str(2**64 - 1)]).seed == 2**64 - 1


def test_every_seed_the_parser_accepts_seeds_every_video():
    """The generators' seeds are derived from --seed and the video index; the largest seed must not overflow them."""
    from sampling.generation import video_generators

    first = video_generators(2**64 - 1, [0, 2**52], 1, "cpu")
    again = video_generators(2**64 - 1, [0, 2**52], 1, "cpu")
    draws = [[torch.randn(3, generator=g).tolist() for g in generators] for generators in (first, again)]
    assert draws[0] == draws[1]
    # Seeds within the generator's range keep their noise (videos of earlier runs stay reproducible).
    assert video_generators(5, [3], 0, "cpu")[0].initial_seed() == 5 * 1_000_003 + 3 * 2


def test_the_fast_preset_is_the_default_and_stage_flags_override_a_preset():
    from sampling.generation import SAMPLING_PRESETS, SamplingOptions

    default = sample.parse_args(BASE)
    for stage in ("content", "motion"):
        assert stage_options(default, stage) == SAMPLING_PRESETS["fast"][stage]
        assert stage_options(default, stage).sampler == "dpm++2m"
    args = sample.parse_args([*BASE, "--preset", "ddim", "--motion-steps", "7", "--content-sampler", "ddpm",
                              "--content-cfg-scale", "3"])
    assert stage_options(args, "motion") == SamplingOptions(7, "ddim", None)
    assert stage_options(args, "content") == SamplingOptions(50, "ddpm", 3.0)
    assert resolve_settings(args).precision == "auto" and not args.compile


@pytest.mark.parametrize("preset, content, motion, precision, classes", [
    # The paper's protocol: DDIM (eta 0) 50 / 100 steps, (1 + w) eps(c) - w eps(null) with w = 4 (s = 5), motion
    # unguided, fp32, labels by class frequency.
    ("paper", (50, "ddim", 5.0), (100, "ddim", 1.0), "fp32", "dataset"),
    # NVlabs/CMD's evaluation: ancestral DDPM respaced to 50 steps for both stages, DiT-style guidance 4.0.
    ("reference", (50, "ddpm", 4.0), (50, "ddpm", 1.0), "fp32", "dataset"),
    ("fast", (15, "dpm++2m", None), (15, "dpm++2m", None), "auto", None),
    ("ddim", (50, "ddim", None), (100, "ddim", None), "auto", None),
])
def test_each_preset_resolves_to_its_protocol_and_flags_override_it(preset, content, motion, precision, classes):
    from sampling.generation import SamplingOptions

    settings = resolve_settings(sample.parse_args([*BASE, "--preset", preset]))
    assert settings == SampleSettings(SamplingOptions(*content), SamplingOptions(*motion), precision, classes)
    overridden = resolve_settings(sample.parse_args([
        *BASE, "--preset", preset, "--precision", "bf16", "--classes", "3", "--content-cfg-scale", "2",
        "--motion-steps", "7"]))
    assert overridden == SampleSettings(SamplingOptions(content[0], content[1], 2.0),
                                               SamplingOptions(7, motion[1], motion[2]), "bf16", [3])


def test_paper_preset_draws_labels_by_the_class_frequencies(monkeypatch):
    monkeypatch.setattr(sampling.requests, "classes_dataset", lambda data_cfg, seed: SkewedDataset())
    data_cfg = type("DataConfig", (), {"dataset_name": "UCF101", "split": "train"})()
    n = 4000
    for preset in ("paper", "reference"):
        labels = class_list(sample.parse_args([*BASE, "--preset", preset, "--num-videos", str(n)]), 4, data_cfg)
        counts = np.bincount(labels, minlength=4)
        # Each count is binomial(n, p): within 5 standard deviations of n p; class 3 has no training clip.
        for count, p in zip(counts, [0.80, 0.15, 0.05, 0.0]):
            assert abs(count - n * p) <= 5 * np.sqrt(n * p * (1 - p)), (preset, counts)
    fast = class_list(sample.parse_args([*BASE, "--num-videos", "8"]), 4, data_cfg)
    assert fast == [0, 1, 2, 3] * 2  # the default preset: every class round-robin


@pytest.mark.parametrize("preset, protocol", [
    ("paper", "content ddim 50 steps, guidance s=5; motion ddim 100 steps, guidance s=1"),
    ("reference", "content ddpm 50 steps, guidance s=4; motion ddpm 50 steps, guidance s=1"),
])
def test_preset_runs_end_to_end_with_its_samplers_guidance_and_labels(ckpts, tmp_path, preset, protocol):
    """sample.py states what it ran, read from the loaded denoisers (sampler, respaced steps, guidance), and the
    videos' labels are drawn by the motion run's training frequencies."""
    from datasets import build_dataset
    from core.checkpoint import load_stage_checkpoint
    from core.config import config_from_dict

    npz = tmp_path / "s.npz"
    proc = run_python(["sample.py", "--ae-ckpt", ckpts["ae"], "--motion-ckpt", ckpts["motion"], "--content-ckpt",
                       ckpts["content"], "--preset", preset, "--num-videos", 3, "--seed", 4, "--no-mp4",
                       "--npz", npz, "--out-dir", tmp_path / "out"], check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("sampling: "))
    assert line == f"sampling: preset {preset}; {protocol}; fp32; labels by class frequency"
    motion_cfg = config_from_dict("motion", load_stage_checkpoint(ckpts["motion"], "motion")["config"])
    train_split = build_dataset(motion_cfg.data, motion_cfg.data.split, int(motion_cfg.train.global_seed))
    assert np.load(npz)["labels"].tolist() == labels_by_frequency(dataset_labels(train_split), 3, 4)


def test_zero_videos_stops_before_any_model_loads_and_leaves_nothing(ckpts, tmp_path):
    # Before: "need at least one array to concatenate" after loading every model, and a stray .shard-00000.npz.
    out = tmp_path / "out"
    proc = run_sample(ckpts, out, "--num-videos", 0)
    one_line_error(proc, "--num-videos", exit_code=2)
    assert not out.exists()


# ---- 2. the --content-frame image ---------------------------------------------------------------------------------
def test_content_frame_that_is_not_an_image_is_one_line(ckpts, tmp_path):
    frame = tmp_path / "notes.png"
    frame.write_text("these are not pixels\n")
    proc = run_sample(ckpts, tmp_path / "out", "--content-frame", frame, "--num-videos", 1)
    one_line_error(proc, frame, "--content-frame")
    assert mp4s(tmp_path / "out" / "videos") == []


def test_16_bit_content_frame_is_scaled_not_clipped_to_white(ckpts, tmp_path):
    # A 16-bit grey ramp: PIL's convert("RGB") clips every value above 255 to white.
    ramp = np.linspace(0, 65535, RESOLUTION * RESOLUTION).round().astype(np.uint16).reshape(RESOLUTION, RESOLUTION)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    npz = tmp_path / "deep.npz"
    proc = run_sample(ckpts, tmp_path / "out", "--content-frame", tmp_path / "deep.png", "--num-videos", 1,
                      "--npz", npz)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(npz)["content_frames"][0].astype(int)  # (H, W, 3): the given frame as the models saw it
    want = np.round(ramp / 257.0).astype(int)
    assert np.abs(got - want[..., None]).max() <= 1


def _image(mode: str) -> tuple:
    """(image of `mode`, the 8-bit RGB a person sees in it) for a 16x16 test pattern."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (RESOLUTION, RESOLUTION)).astype(np.uint8)
    rgb = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3)).astype(np.uint8)
    alpha = np.where(np.arange(RESOLUTION)[:, None] < RESOLUTION // 2, 255, 0).astype(np.uint8).repeat(RESOLUTION, 1)
    grey3 = np.repeat(grey[..., None], 3, -1)
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257), grey3
    if mode == "I":  # a 16-bit PGM/PNG as older Pillows and other formats open it: int32 holding 0..65535
        return Image.fromarray(grey.astype(np.int32) * 257), grey3
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255), grey3
    if mode == "L":
        return Image.fromarray(grey), grey3
    if mode == "P":
        return Image.fromarray(rgb).quantize(64), None  # compared against its own palette below
    # Transparent pixels show the background (white); opaque ones their colour.
    white = np.full_like(rgb, 255)
    if mode == "LA":
        return Image.fromarray(np.stack([grey, alpha], -1), "LA"), np.where(alpha[..., None] > 0, grey3, white)
    if mode == "RGBA":
        image = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
        return image, np.where(alpha[..., None] > 0, rgb, white)
    raise KeyError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "L", "P", "LA", "RGBA"])
def test_content_frame_modes_become_the_8_bit_rgb_they_show(tmp_path, mode):
    image, want = _image(mode)
    assert image.mode == mode
    if want is None:
        want = np.asarray(image.convert("RGB"))
    path = tmp_path / f"frame_{mode.replace(';', '')}.tiff"
    image.save(path)
    assert Image.open(path).mode == mode  # the mode the file opens as is the one under test
    got = load_image(path, (RESOLUTION, RESOLUTION))  # (3, H, W) in [-1, 1]
    got = ((got.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)
    assert np.abs(got - want.astype(int)).max() <= 1


def test_content_frame_of_unknown_brightness_is_refused_in_one_line(tmp_path):
    # Floats in [0, 1000]: no white level to scale by; clipping would show a white square.
    path = tmp_path / "hdr.tiff"
    ramp = np.linspace(0, 1000, RESOLUTION * RESOLUTION, dtype=np.float32).reshape(RESOLUTION, RESOLUTION)
    Image.fromarray(ramp).save(path)
    with pytest.raises(ValueError) as refused:
        load_image(path, (RESOLUTION, RESOLUTION))
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


# ---- 3. output locations: checked before any model loads ----------------------------------------------------------
def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a read-only one, or (as root, which ignores permission bits)
    a sysfs folder; skips where neither exists."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable folder here")


def output_case(name: str, tmp_path: Path) -> tuple:
    """(extra flags, the path the error must name)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    paths = {"out-dir under a file": ("--out-dir", lambda: a_file / "samples"),
             "out-dir is a file": ("--out-dir", lambda: a_file),
             "out-dir not writable": ("--out-dir", lambda: _unwritable_folder(tmp_path) / "samples"),
             "npz under a file": ("--npz", lambda: a_file / "samples.npz"),
             "npz folder not writable": ("--npz", lambda: _unwritable_folder(tmp_path) / "samples.npz")}
    flag, path = paths[name]
    path = path()
    return [flag, path], path


@pytest.mark.parametrize("case", ["out-dir under a file", "out-dir is a file", "out-dir not writable",
                                  "npz under a file", "npz folder not writable"])
def test_unusable_output_location_is_refused_before_sampling(ckpts, tmp_path, case):
    extra, culprit = output_case(case, tmp_path)
    out = tmp_path / "out"
    proc = run_sample(ckpts, out, "--num-videos", 2, *extra)  # a second --out-dir wins over the first
    one_line_error(proc, culprit)
    # Nothing was sampled (before, a bad --npz failed only after every video, leaving them and a hidden shard).
    assert not out.exists()


def test_npz_goes_to_a_new_folder_and_keeps_its_name(ckpts, tmp_path):
    npz = tmp_path / "new" / "deeper" / "samples"  # numpy would write samples.npz; say so and create the folder
    proc = run_sample(ckpts, tmp_path / "out", "--num-videos", 1, "--npz", npz)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {npz}.npz" in proc.stdout
    assert np.load(f"{npz}.npz")["videos"].shape == (1, N_FRAMES, RESOLUTION, RESOLUTION, 3)


# ---- 4. an out-dir that holds an earlier run --------------------------------------------------------------------
def _earlier_run(out: Path, count: int) -> list:
    clip = np.zeros((N_FRAMES, RESOLUTION, RESOLUTION, 3), np.uint8)
    paths = [write_mp4(clip, out / "videos" / f"{i:06d}_class{i % 4:03d}.mp4") for i in range(count)]
    (out / "grid.png").write_bytes(b"earlier grid")
    return paths


def test_out_dir_with_an_earlier_run_is_refused_and_left_alone(ckpts, tmp_path):
    out = tmp_path / "out"
    earlier = _earlier_run(out, 6)
    before = {p: p.read_bytes() for p in [*earlier, out / "grid.png"]}
    proc = run_sample(ckpts, out, "--num-videos", 2)
    one_line_error(proc, out / "videos", "6 files", "--overwrite", "--out-dir")
    assert {p: p.read_bytes() for p in before} == before and len(mp4s(out / "videos")) == 6


def test_overwrite_replaces_the_earlier_run_and_says_so(ckpts, tmp_path):
    out = tmp_path / "out"
    _earlier_run(out, 6)
    proc = run_sample(ckpts, out, "--num-videos", 2, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed 6 videos of an earlier run" in proc.stdout
    assert [p.name for p in mp4s(out / "videos")] == ["000000_class000.mp4", "000001_class001.mp4"]
    assert "wrote 2 videos" in proc.stdout
    assert (out / "grid.png").read_bytes() != b"earlier grid"


def test_overwrite_keeps_files_it_did_not_write(ckpts, tmp_path):
    out = tmp_path / "out"
    _earlier_run(out, 2)
    (out / "videos" / "notes.txt").write_text("mine")
    proc = run_sample(ckpts, out, "--num-videos", 1, "--overwrite")
    one_line_error(proc, out / "videos", "notes.txt")
    assert (out / "videos" / "notes.txt").read_text() == "mine" and len(mp4s(out / "videos")) == 2


# ---- 5. Ctrl-C and SIGTERM while sampling -------------------------------------------------------------------------
@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_stop_signal_keeps_finished_videos_and_says_how_many(ckpts, tmp_path, signal_number, exit_code):
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, *map(str, sample_args(ckpts, out, "--num-videos", 100000,
                                                                      "--batch-size", 1, "--npz", tmp_path / "s.npz"))],
                                cwd=REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not mp4s(out / "videos"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal_number)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == exit_code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, output[-3000:]
    line = lines[0]
    videos = mp4s(out / "videos")
    name = signal.Signals(signal_number).name
    assert line.startswith(f"stopped by {name}: {len(videos)} of 100000 videos written to {out / 'videos'}"), line
    assert all(frame_count(path) == N_FRAMES for path in videos)  # a video cut short is removed, not left torn
    assert not list(out.glob(".shard-*")) and not (tmp_path / "s.npz").exists()
    assert not list(tmp_path.glob(".s.npz*"))


# ---- 6. outputs in use, an existing --npz, a full disk ---------------------------------------------------------------
def start_sampling(ckpts, out: Path, log: Path, *extra) -> subprocess.Popen:
    """A long sample.py run (one video per batch), started once its first video is written."""
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, *map(str, sample_args(ckpts, out, "--num-videos", 100000,
                                                                      "--batch-size", 1, *extra))],
                                cwd=REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not mp4s(out / "videos"):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(log.read_text()[-3000:])
        time.sleep(0.01)
    return proc


def test_a_second_run_into_outputs_in_use_stops_in_one_line_naming_the_other(ckpts, tmp_path):
    """Two sample.py runs into one --out-dir (or onto one --npz) at the same time: the second stops before any
    model loads, naming the folder and the first run's process; the first run's outputs are its alone."""
    out, npz = tmp_path / "out", tmp_path / "first.npz"
    first = start_sampling(ckpts, out, tmp_path / "first.log", "--npz", npz)
    try:
        same_out = run_sample(ckpts, out, "--num-videos", 2, "--seed", 9)
        line = one_line_error(same_out, "--out-dir", out, f"pid {first.pid}")
        same_npz = run_sample(ckpts, tmp_path / "other", "--num-videos", 2, "--npz", npz, "--overwrite")
        one_line_error(same_npz, "--npz", npz, f"pid {first.pid}")
        assert not (tmp_path / "other").exists()
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, (tmp_path / "first.log").read_text()[-3000:]
    assert "in use by" in line and all("_class" in p.name for p in mp4s(out / "videos"))
    assert not (out / ".cmd-claim").exists()  # released when the first run stopped
    # After a kill -9 the claim is no one's: a later run is told about the earlier videos, not about a process.
    killed = start_sampling(ckpts, tmp_path / "killed", tmp_path / "killed.log")
    killed.kill()
    killed.wait()
    one_line_error(run_sample(ckpts, tmp_path / "killed", "--num-videos", 1), "earlier run", "--overwrite")
    proc = run_sample(ckpts, tmp_path / "killed", "--num-videos", 1, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "killed" / "videos").iterdir()] == ["000000_class000.mp4"]


def test_an_existing_npz_is_replaced_only_with_overwrite(ckpts, tmp_path):
    npz = tmp_path / "s.npz"
    npz.write_bytes(b"an earlier result")
    one_line_error(run_sample(ckpts, tmp_path / "out", "--num-videos", 1, "--npz", npz), "--npz", npz, "--overwrite")
    assert npz.read_bytes() == b"an earlier result" and not (tmp_path / "out").exists()
    proc = run_sample(ckpts, tmp_path / "out", "--num-videos", 1, "--npz", npz, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(npz)["videos"].shape == (1, N_FRAMES, RESOLUTION, RESOLUTION, 3)


# sample.py with a full disk at the writes of the files whose names contain `sys.argv[1]`: their fsync fails with
# ENOSPC, where a full disk shows on file systems that allocate blocks late.
FULL_DISK = """
import errno, os, runpy, sys
fsync, pattern = os.fsync, sys.argv[1]
def full_disk(fd):
    if pattern in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return fsync(fd)
os.fsync = full_disk
sys.argv = sys.argv[2:]
runpy.run_path("sample.py", run_name="__main__")
"""


def test_a_full_disk_is_one_line_and_loses_no_finished_video(ckpts, tmp_path):
    """At the final --npz write of a --no-mp4 run the videos are kept in the rank shards, which the line names
    (the npz is written first and the shards removed only once it is); at an mp4 the finished videos stay."""
    out, npz = tmp_path / "out", tmp_path / "s.npz"
    proc = run_python(["-c", FULL_DISK, ".s.npz.tmp", *sample_args(ckpts, out, "--num-videos", 3, "--no-mp4",
                                                                   "--npz", npz)], check=False, timeout=300)
    shard = out / ".shard-00000.npz"
    line = one_line_error(proc, "--npz", npz, "No space left on device", shard)
    assert "3 videos are kept" in line
    assert not npz.exists() and not list(tmp_path.glob(".s.npz*"))
    with np.load(shard) as kept:
        assert kept["videos"].shape == (3, N_FRAMES, RESOLUTION, RESOLUTION, 3)
        assert sorted(kept["indices"].tolist()) == [0, 1, 2]

    proc = run_python(["-c", FULL_DISK, "000002_", *sample_args(ckpts, tmp_path / "mp4", "--num-videos", 4)],
                      check=False, timeout=300)
    one_line_error(proc, "--out-dir", "000002_class002.mp4", "No space left on device")
    videos = mp4s(tmp_path / "mp4" / "videos")
    assert [p.name for p in videos] == ["000000_class000.mp4", "000001_class001.mp4"]
    assert all(frame_count(path) == N_FRAMES for path in videos)
    assert sorted(p.name for p in (tmp_path / "mp4" / "videos").iterdir()) == [p.name for p in videos]


# ---- 6. denoisers trained with another autoencoder --------------------------------------------------------------
@pytest.fixture(scope="module")
def other_ae(ckpts, tmp_path_factory):
    """The autoencoder with other weights of the same shapes, so another fingerprint."""
    return perturbed_autoencoder(ckpts["ae"], tmp_path_factory.mktemp("other_ae") / "other.pt")


def test_another_autoencoder_is_refused_unless_allowed(ckpts, other_ae, tmp_path):
    args = sample_args({**ckpts, "ae": other_ae}, tmp_path / "refused", "--num-videos", 1)
    one_line_error(run_python(args, check=False), ckpts["motion"], "--allow-ae-mismatch")
    args = sample_args({**ckpts, "ae": other_ae}, tmp_path / "allowed", "--num-videos", 1, "--allow-ae-mismatch")
    proc = run_python(args, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(mp4s(tmp_path / "allowed" / "videos")) == 1


# ---- 7. FVD as papers report it: guidance convention, labels, frame folders ----------------------------------------
def test_ucf101_guidance_is_the_reference_evaluations_and_every_flag_states_the_convention(capsys):
    from core.config import load_config

    # DiT's convention, eps(null) + s (eps(c) - eps(null)): NVlabs/CMD's evaluation runs the content model at 4.0 (the
    # paper's "w = 4.0"; its (1 + w) formula would be 5.0) and the motion model unguided (docs/METHOD.md).
    content = load_config("content", "configs/ucf101/content.yaml", ["ae_ckpt=ae.pt", "data.data_path=/data/UCF-101"])
    motion = load_config("motion", "configs/ucf101/motion.yaml", ["ae_ckpt=ae.pt", "data.data_path=/data/UCF-101"])
    assert (content.diffusion.cfg_scale, motion.diffusion.cfg_scale) == (4.0, 1.0)
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    parser_help = " ".join(capsys.readouterr().out.split())
    for flag in ("--content-cfg-scale", "--motion-cfg-scale"):
        assert flag in parser_help
    assert "eps(null) + s * (eps(c) - eps(null))" in parser_help and "s = 1 + w" in parser_help
    assert "0-based" in parser_help  # --classes: UCF-101's classInd.txt numbers from 1


def test_classes_flag_takes_ids_names_or_dataset():
    assert sample.parse_args([*BASE, "--classes", "dataset"]).classes == "dataset"
    classes = sample.parse_args([*BASE, "--classes", "ApplyEyeMakeup, 3,Biking"]).classes
    assert classes == ["ApplyEyeMakeup", 3, "Biking"]


class SkewedDataset:
    """Training labels 0 x 80, 1 x 15, 2 x 5, 3 x 0: what --classes dataset must reproduce."""
    num_classes = 4
    class_names = ["ApplyEyeMakeup", "Biking", "HandstandPushups", "YoYo"]
    entries = [type("Entry", (), {"label": label})() for label in [0] * 80 + [1] * 15 + [2] * 5]


def labels_for(monkeypatch, classes: str, num_videos: int = 4000, seed: int = 0) -> list:
    monkeypatch.setattr(sampling.requests, "classes_dataset", lambda data_cfg, seed: SkewedDataset())
    args = sample.parse_args([*BASE, "--classes", classes, "--num-videos", str(num_videos), "--seed", str(seed)])
    return class_list(args, 4, type("DataConfig", (), {"dataset_name": "UCF101", "split": "train"})())


def test_classes_dataset_draws_labels_by_the_training_split_frequencies(monkeypatch):
    labels = labels_for(monkeypatch, "dataset")
    counts = np.bincount(labels, minlength=4) / len(labels)
    assert np.abs(counts - [0.80, 0.15, 0.05, 0.0]).max() < 0.03  # not round-robin's 0.25 each
    assert labels == labels_for(monkeypatch, "dataset")  # deterministic given --seed
    assert labels != labels_for(monkeypatch, "dataset", seed=1)


def test_classes_by_name_resolve_through_the_dataset_and_a_wrong_name_lists_valid_ones(monkeypatch):
    assert labels_for(monkeypatch, "Biking,handstandpushups,0", num_videos=4) == [1, 2, 0, 1]  # case-insensitive
    with pytest.raises(ValueError) as refused:
        labels_for(monkeypatch, "Bikeing", num_videos=1)
    message = str(refused.value)
    assert "\n" not in message and "'Bikeing'" in message and "Biking" in message and "ids 0..3" in message


def test_frames_dir_output_is_checked_before_models_load(tmp_path):
    def check(*extra):
        return check_outputs(sample.parse_args([*BASE, "--out-dir", str(tmp_path / "out"), *map(str, extra)]))

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for bad in (a_file, a_file / "frames", tmp_path / "out"):
        with pytest.raises(OutputError) as refused:
            check("--frames-dir", bad)
        assert "--frames-dir" in str(refused.value) and str(bad) in str(refused.value)
    frames = tmp_path / "frames"
    (frames / "000000").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(frames / "000000" / "000.png")
    with pytest.raises(OutputError) as refused:  # an earlier run: refused without --overwrite
        check("--frames-dir", frames)
    assert str(frames) in str(refused.value) and "--overwrite" in str(refused.value)
    assert check("--frames-dir", frames, "--overwrite") == [frames / "000000"]
    (frames / "notes.txt").write_text("mine")  # never removed, even with --overwrite
    with pytest.raises(OutputError, match="notes.txt"):
        check("--frames-dir", frames, "--overwrite")
    with pytest.raises(ValueError, match="--no-mp4"):  # nothing but a grid would be kept
        sample.main(sample.parse_args([*BASE, "--content-ckpt", "c.pt", "--no-mp4", "--out-dir", str(tmp_path / "o")]))
    assert not (tmp_path / "o").exists()


def test_frames_dir_no_mp4_and_dataset_labels_end_to_end(ckpts, tmp_path):
    from datasets import build_dataset
    from core.checkpoint import load_stage_checkpoint
    from core.config import config_from_dict

    out, frames, npz = tmp_path / "out", tmp_path / "frames", tmp_path / "s.npz"
    proc = run_sample(ckpts, out, "--num-videos", 3, "--classes", "dataset", "--frames-dir", frames, "--no-mp4",
                      "--npz", npz, "--seed", 5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote 3 videos to {frames} (PNG frames)" in proc.stdout
    assert mp4s(out / "videos") == [] and (out / "grid.png").is_file()
    saved = np.load(npz)
    assert sorted(p.name for p in frames.iterdir()) == ["000000", "000001", "000002"]
    for index, video in enumerate(saved["videos"]):  # lossless PNG frames, the npz's videos exactly
        names = sorted(p.name for p in (frames / f"{index:06d}").iterdir())
        assert names == [f"{t:03d}.png" for t in range(N_FRAMES)]
        got = np.stack([np.asarray(Image.open(frames / f"{index:06d}" / name)) for name in names])
        np.testing.assert_array_equal(got, video)
    motion_cfg = config_from_dict("motion", load_stage_checkpoint(ckpts["motion"], "motion")["config"])
    train_split = build_dataset(motion_cfg.data, motion_cfg.data.split, int(motion_cfg.train.global_seed))
    want = labels_by_frequency(dataset_labels(train_split), 3, 5)
    assert saved["labels"].tolist() == want

    # --overwrite replaces the earlier run's frame folders (000002 is not left behind); class names work end to end.
    proc = run_sample(ckpts, out, "--num-videos", 2, "--classes", "disc-right,0", "--frames-dir", frames,
                      "--npz", npz, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed 3 videos of an earlier run from {frames}" in proc.stdout
    assert sorted(p.name for p in frames.iterdir()) == ["000000", "000001"]
    assert [p.name for p in mp4s(out / "videos")] == ["000000_class001.mp4", "000001_class000.mp4"]
    assert np.load(npz)["labels"].tolist() == [1, 0]


def test_real_content_and_content_frame_are_exclusive(python_runner, tmp_path):
    ae = tmp_path / "never_read.pt"  # the flags are refused before any checkpoint is opened
    proc = python_runner(["sample.py", "--ae-ckpt", ae, "--motion-ckpt", ae, "--real-content", "--content-frame",
                          "x.png", "--out-dir", tmp_path], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "choose one" in proc.stderr
