"""Checkpoint I/O: a save writes its bytes once, sampling maps checkpoints and reads only the weights, exported
.safetensors weights stand in for the .pt files everywhere a checkpoint is sampled or encoded with."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers.processes import REPO, child_env, run_python
from core import checkpoint as ckpt_io

# CPU-sized runs, as in test_reliability.py: 16x16 clips of 4 frames, batch 4, a one-block autoencoder.
SHRINK = ["train.global_batch_size=4", "data.resolution=[16,16]", "data.n_frames=4", "data.num_workers=0",
          "train.num_eval_videos=2"]
AE = ["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", *SHRINK, "model.depth=1", "model.hidden_size=32",
      "train.eval_every=100000"]
DIFFUSION = [*SHRINK, "diffusion.sample_steps=2", "train.sample_every=100000"]
BIG = 16 * 2**20  # float32 elements of the fake optimizer state: 64 MiB


def motion_args(ae_ckpt):
    return ["train_motion_diffusion.py", "--config", "configs/tiny/motion.yaml", "--ae-ckpt", ae_ckpt, *DIFFUSION]


def content_args(ae_ckpt):
    return ["train_content_diffusion.py", "--config", "configs/tiny/content.yaml", "--ae-ckpt", ae_ckpt, *DIFFUSION]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An autoencoder run (a checkpoint every step, keep_last=1) and a motion and a content run on top of it.

    Two training steps leave the EMA decoder near its zero-initialised output (every video one flat grey), so the
    denoisers are trained on a copy of the autoencoder with noise on its EMA weights: its videos differ per pixel,
    and comparing two sampling runs means something.
    """
    root = tmp_path_factory.mktemp("checkpoint_io")
    results = root / "results"
    run_python([*AE, "--results-dir", results, "--exp-name", "ae", "--max-steps", 2, "--ckpt-every", 1,
                "train.keep_last=1"])
    ckpt = ckpt_io.safe_torch_load(results / "ae" / "checkpoints" / "last.pt")
    generator = torch.Generator().manual_seed(0)
    ckpt["ema"] = {key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point()
                   else value for key, value in ckpt["ema"].items()}
    ae_ckpt = root / "ae.pt"
    torch.save(ckpt, ae_ckpt)
    run_python([*motion_args(ae_ckpt), "--results-dir", results, "--exp-name", "motion", "--max-steps", 2])
    run_python([*content_args(ae_ckpt), "--results-dir", results, "--exp-name", "content", "--max-steps", 1])
    return SimpleNamespace(root=root, results=results, ae_dir=results / "ae", ae_ckpt=ae_ckpt,
                           motion_ckpt=results / "motion" / "checkpoints" / "last.pt",
                           content_ckpt=results / "content" / "checkpoints" / "last.pt")


@pytest.fixture(scope="module")
def exported(trained):
    """The three checkpoints exported: the autoencoder through the command line, the denoisers in-process."""
    from training.export import export_checkpoint

    out = trained.root / "exported"
    proc = run_python(["-m", "training.export", trained.ae_ckpt, out / "ae.safetensors"])
    assert proc.stdout.strip().startswith("exported the ema weights of"), proc.stdout
    export_checkpoint(trained.motion_ckpt, out / "motion.safetensors")
    export_checkpoint(trained.content_ckpt, out / "content.safetensors")
    return SimpleNamespace(ae=out / "ae.safetensors", motion=out / "motion.safetensors",
                           content=out / "content.safetensors")


def one_line_error(proc) -> str:
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- one write per save ------------------------------------------------------------------------------------------
def test_a_save_writes_the_checkpoint_once_and_last_pt_names_it(trained):
    ckpt_dir = trained.ae_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["0000002.pt", "last.pt"]  # step 1 pruned, no temp file
    step_file, last = ckpt_dir / "0000002.pt", ckpt_dir / "last.pt"
    # One file under two names: its bytes were written once.
    assert last.stat().st_ino == step_file.stat().st_ino and last.stat().st_nlink == 2
    assert ckpt_io.load_checkpoint(last)["step"] == 2


def test_last_pt_stays_complete_when_pruning_deletes_its_step_file(trained, tmp_path):
    ckpt = ckpt_io.load_checkpoint(trained.ae_dir / "checkpoints" / "last.pt")
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_io.atomic_torch_save(ckpt, ckpt_dir / "0000002.pt")
    ckpt_io.atomic_link(ckpt_dir / "0000002.pt", ckpt_dir / "last.pt")
    for step in (3, 4):  # newer step files, written while last.pt still names step 2 (a save killed before its link)
        ckpt_io.atomic_torch_save({**ckpt, "step": step}, ckpt_dir / f"{step:07d}.pt")
    ckpt_io.prune_checkpoints(ckpt_dir, keep_last=1)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["0000004.pt", "last.pt"]
    survivor = ckpt_io.load_checkpoint(ckpt_dir / "last.pt")
    assert survivor["step"] == 2
    for key, value in ckpt["ema"].items():
        assert torch.equal(survivor["ema"][key], value)
    # Relinking to the newest: last.pt's old bytes go with their last name; no temp name is left behind.
    ckpt_io.atomic_link(ckpt_dir / "0000004.pt", ckpt_dir / "last.pt")
    ckpt_io.atomic_link(ckpt_dir / "0000004.pt", ckpt_dir / "last.pt")  # already the same file: rename does nothing
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["0000004.pt", "last.pt"]
    assert ckpt_io.load_checkpoint(ckpt_dir / "last.pt")["step"] == 4


def test_without_hard_links_last_pt_is_a_complete_copy(trained, tmp_path, monkeypatch):
    src = tmp_path / "0000002.pt"
    src.write_bytes((trained.ae_dir / "checkpoints" / "0000002.pt").read_bytes())
    (tmp_path / "last.pt").write_bytes(b"the previous checkpoint")

    def no_link(errno_value):
        def link(*_args, **_kwargs):
            raise OSError(errno_value, os.strerror(errno_value))
        return link

    monkeypatch.setattr(os, "link", no_link(errno.ENOSPC))  # a real failure: raised, last.pt untouched
    with pytest.raises(OSError):
        ckpt_io.atomic_link(src, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == b"the previous checkpoint"
    monkeypatch.setattr(os, "link", no_link(errno.EXDEV))  # no hard link possible: a full copy instead
    ckpt_io.atomic_link(src, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == src.read_bytes()
    assert (tmp_path / "last.pt").stat().st_ino != src.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000002.pt", "last.pt"]


# ---- sampling reads the weights only -----------------------------------------------------------------------------
def with_huge_optimizer_state(path: Path, target: Path) -> dict:
    """The checkpoint at `path` with a 64 MiB optimizer state (a real one is twice the weights)."""
    ckpt = ckpt_io.safe_torch_load(path)
    ckpt["opt"] = {"state": {0: {"exp_avg": torch.rand(BIG), "exp_avg_sq": torch.rand(BIG)}}, "param_groups": []}
    torch.save(ckpt, target)
    return ckpt


def resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_loading_for_sampling_maps_the_file_and_reads_no_optimizer_state(trained, tmp_path, monkeypatch):
    from sampling.generation import load_denoiser
    from core.frozen_autoencoder import load_autoencoder

    ae_ckpt = with_huge_optimizer_state(trained.ae_ckpt, tmp_path / "ae.pt")
    motion_ckpt = with_huge_optimizer_state(trained.motion_ckpt, tmp_path / "motion.pt")
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        before = resident_mib()
        result = real_load(*args, **kwargs)
        loads.append((kwargs.get("mmap"), resident_mib() - before))
        return result

    monkeypatch.setattr(torch, "load", recording_load)
    ae, _ = load_autoencoder(tmp_path / "ae.pt", "cpu")
    motion, _, scaler = load_denoiser(tmp_path / "motion.pt", "motion", ae, "cpu")
    assert [mmap for mmap, _ in loads] == [True, True]
    # Unmapped, each load would bring the 128 MiB optimizer state into memory.
    assert all(grown < 16 for _, grown in loads), loads
    # The EMA weights, not the raw model's.
    for model, ckpt in ((ae, ae_ckpt), (motion, motion_ckpt)):
        assert any(not torch.equal(ckpt["model"][key], ckpt["ema"][key]) for key in ckpt["ema"])
        for key, value in model.state_dict().items():
            assert torch.equal(value, ckpt["ema"][key]), key
    assert torch.equal(scaler.stats["motion"][1], motion_ckpt["latent_stats"]["motion_std"])


# ---- exported weights ----------------------------------------------------------------------------------------------
def test_export_holds_the_ema_weights_config_and_latent_stats(trained, exported, tmp_path):
    from safetensors import safe_open

    original = ckpt_io.safe_torch_load(trained.motion_ckpt)
    with safe_open(str(exported.motion), framework="pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
    assert metadata["cmd.stage"] == "motion" and metadata["cmd.weights"] == "ema"
    assert metadata["cmd.ae_fingerprint"] == original["config"]["ae_fingerprint"]
    assert keys == set(original["ema"]) | {f"latent_stats.{key}" for key in original["latent_stats"]}
    for key, value in original["ema"].items():
        assert torch.equal(tensors[key], value) and tensors[key].is_contiguous()
    assert exported.motion.stat().st_size < trained.motion_ckpt.stat().st_size / 2  # no raw weights, no optimizer

    # The shared loader gives it the shape of a checkpoint, found by its content under any name.
    renamed = tmp_path / "motion_weights.bin"
    renamed.write_bytes(exported.motion.read_bytes())
    loaded = ckpt_io.load_stage_checkpoint(renamed, "motion")
    assert loaded["config"] == original["config"] and loaded["step"] == original["step"]
    for key, value in original["latent_stats"].items():
        assert torch.equal(loaded["latent_stats"][key], value)
    with pytest.raises(ckpt_io.CheckpointError, match="'motion' checkpoint, but a 'content' checkpoint"):
        ckpt_io.load_stage_checkpoint(exported.motion, "content")

    # An exported autoencoder has the original's weight fingerprint, which the denoisers recorded.
    ae = ckpt_io.model_weights(ckpt_io.load_stage_checkpoint(exported.ae, "autoencoder"))
    assert ckpt_io.weights_fingerprint(ae) == original["config"]["ae_fingerprint"]
    assert ckpt_io.weights_fingerprint(ae) == ckpt_io.weights_fingerprint(
        ckpt_io.model_weights(ckpt_io.safe_torch_load(trained.ae_ckpt)))


def sample(tmp_path: Path, name: str, ae, motion, content) -> dict:
    npz = tmp_path / f"{name}.npz"
    run_python(["sample.py", "--ae-ckpt", ae, "--motion-ckpt", motion, "--content-ckpt", content, "--num-videos", 3,
                "--content-steps", 2, "--motion-steps", 2, "--out-dir", tmp_path / name, "--npz", npz, "--quiet"])
    with np.load(npz) as data:
        return {key: data[key] for key in data.files}


def test_sample_py_with_exported_weights_makes_the_same_videos(trained, exported, tmp_path):
    from_pt = sample(tmp_path, "pt", trained.ae_ckpt, trained.motion_ckpt, trained.content_ckpt)
    from_export = sample(tmp_path, "safetensors", exported.ae, exported.motion, exported.content)
    assert len(np.unique(from_pt["videos"])) > 50  # not one flat colour: the comparison below is a real one
    assert from_pt.keys() == from_export.keys()
    for key, value in from_pt.items():
        assert np.array_equal(value, from_export[key]), key


def test_diffusion_training_takes_an_exported_autoencoder(trained, exported, tmp_path):
    results = tmp_path / "results"
    run_python([*motion_args(exported.ae), "--results-dir", results, "--exp-name", "m", "--max-steps", 1])
    ckpt = ckpt_io.load_checkpoint(results / "m" / "checkpoints" / "last.pt")
    assert ckpt["config"]["ae_fingerprint"] == ckpt_io.safe_torch_load(trained.motion_ckpt)["config"]["ae_fingerprint"]


def test_resume_from_exported_weights_is_refused_in_one_line(trained, tmp_path):
    from safetensors.torch import save_file

    # Written here rather than by the exporter, so that only the refusal is tested.
    original = ckpt_io.safe_torch_load(trained.motion_ckpt)
    weights = tmp_path / "motion.safetensors"
    save_file({key: value.contiguous() for key, value in original["ema"].items()}, str(weights),
              metadata={"cmd.format": "cmd-weights-1", "cmd.stage": "motion", "cmd.step": "2",
                        "cmd.config": json.dumps(original["config"])})
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, *map(str, [*motion_args(trained.ae_ckpt), "--results-dir", results,
                                                      "--resume", weights, "--max-steps", 3])],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    line = one_line_error(proc)
    assert line.startswith(f"error: --resume {weights}: exported weights hold no optimizer state"), line
    assert not results.exists() or not any(results.iterdir())


# ---- malformed checkpoint dictionaries: one line naming the file and the entry, in every reader --------------------
def _first_weight(ckpt: dict) -> str:
    return next(iter(ckpt["ema"]))


MALFORMED = {
    "config a list": (lambda c: c.update(config=[1, 2]), "checkpoint entry 'config' is a list, not a mapping"),
    "model a list": (lambda c: c.update(model=[1, 2], ema=None), "checkpoint entry 'model' is a list"),
    "ema a list": (lambda c: c.update(ema=[1, 2]), "checkpoint entry 'ema' is a list"),
    "a weight a string": (lambda c: c["ema"].update({_first_weight(c): "x"}),
                          "checkpoint entry 'ema' holds a str under"),
    "config.train a string": (lambda c: c["config"].update(train="x"), "'config' does not fit the motion config"),
    "step a string": (lambda c: c.update(step="12"), "checkpoint entry 'step' is a str, not a whole number"),
    "optimizer a list": (lambda c: c.update(opt=[1]), "checkpoint entry 'opt' is not an optimizer state"),
    "stage a number": (lambda c: c.update(stage=3), "checkpoint entry 'stage' is an int"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_dictionaries_are_one_line_in_every_reader(trained, tmp_path, case):
    """Export, sampling and --resume read checkpoints through one loader; a dictionary of the wrong layout (once an
    AttributeError traceback in each) is refused there, naming the file and the entry."""
    from training.export import export_checkpoint

    mutate, expected = MALFORMED[case]
    ckpt = ckpt_io.safe_torch_load(trained.motion_ckpt)
    mutate(ckpt)
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    readers = {"export": lambda: export_checkpoint(path, tmp_path / "out.safetensors"),
               "sampling": lambda: ckpt_io.load_for_sampling(path, "motion"),
               "resume": lambda: ckpt_io.resolve_resume(str(path), tmp_path / "results", "motion")}
    for reader, read in readers.items():
        with pytest.raises(ckpt_io.CheckpointError) as info:
            read()
        message = str(info.value)
        assert str(path) in message and expected in message and "\n" not in message, (reader, message)
    assert not (tmp_path / "out.safetensors").exists()


def test_sample_py_with_a_malformed_autoencoder_checkpoint_is_one_line(trained, tmp_path):
    ckpt = ckpt_io.safe_torch_load(trained.ae_ckpt)
    ckpt["model"] = ["not", "weights"]
    bad = tmp_path / "ae.pt"
    torch.save(ckpt, bad)
    proc = subprocess.run([sys.executable, "sample.py", "--ae-ckpt", str(bad), "--motion-ckpt",
                           str(trained.motion_ckpt), "--content-ckpt", str(trained.content_ckpt), "--num-videos", "1",
                           "--out-dir", str(tmp_path / "out")], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert one_line_error(proc) == f"error: {bad}: checkpoint entry 'model' is a list, not a dict of tensors"
    assert not (tmp_path / "out" / "videos").exists() or not any((tmp_path / "out" / "videos").iterdir())


# ---- exported metadata that does not describe its tensors: refused before any model is built ----------------------
def tampered_export(source: Path, out: Path, key: str, value) -> Path:
    """A copy of an export whose metadata config has `key` (dotted) set to `value`, its tensors untouched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    config = json.loads(metadata["cmd.config"])
    *parents, last = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[last] = value
    save_file(tensors, str(out), metadata={**metadata, "cmd.config": json.dumps(config)})
    return out


@pytest.mark.parametrize("stage, key, value, expected", [
    # 2**20 x 2**20 pixels: positional tables of petabytes (the build itself once died in a MemoryError).
    ("ae", "data.resolution", [2**20, 2**20], "more than this machine's"),
    ("ae", "data.n_frames", 10**12, "more than this machine's"),
    ("ae", "model.hidden_size", 10**6, "tensor 'patch_embed.weight' has shape (32, 3, 4, 4), the model expects "
                                       "(1000000, 3, 4, 4)"),
    ("ae", "model.num_heads", 7, "its config does not describe a model: hidden size 32 is not divisible by "
                                 "num_heads 7"),
    ("motion", "data.num_classes", 10**9, "the model expects (1000000001, 128)"),
])
def test_export_whose_metadata_does_not_describe_its_tensors_is_refused_before_building(trained, exported, tmp_path,
                                                                                        stage, key, value, expected):
    from core.frozen_autoencoder import load_autoencoder
    from sampling.generation import load_denoiser

    bad = tampered_export(getattr(exported, stage), tmp_path / f"{stage}.safetensors", key, value)
    with pytest.raises(ckpt_io.CheckpointError) as info:
        if stage == "ae":
            load_autoencoder(bad, "cpu")
        else:
            load_denoiser(bad, stage, load_autoencoder(exported.ae, "cpu")[0], "cpu")
    message = str(info.value)
    assert message.startswith(f"{bad}: ") and expected in message and "\n" not in message, message


# ---- non-finite weights and samples: one line, nothing written as if it were a video --------------------------------
def with_a_nan(source: Path, out: Path) -> tuple:
    """A copy of a .pt checkpoint or an export with one NaN in its first EMA weight: (copy, that weight's name)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if source.suffix == ".safetensors":
        with safe_open(str(source), framework="pt") as handle:
            metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
        name = sorted(tensors)[0]
        tensors[name].view(-1)[0] = float("nan")
        save_file(tensors, str(out), metadata=metadata)
    else:
        ckpt = ckpt_io.safe_torch_load(source)
        name = sorted(ckpt["ema"])[0]
        ckpt["ema"][name].view(-1)[0] = float("nan")
        torch.save(ckpt, out)
    return out, name


@pytest.mark.parametrize("which", ["ae .pt", "motion .safetensors"])
def test_weights_with_a_nan_are_refused_when_loaded_for_sampling(trained, exported, tmp_path, which):
    stage, kind = which.split()
    source = trained.ae_ckpt if kind == ".pt" else exported.motion
    bad, name = with_a_nan(source, tmp_path / f"bad{kind}")
    with pytest.raises(ckpt_io.CheckpointError) as info:
        ckpt_io.load_for_sampling(bad, "autoencoder" if stage == "ae" else stage)
    assert str(info.value) == (f"{bad}: weight '{name}' holds 1 non-finite value (NaN or inf) of "
                               f"{ckpt_io.load_checkpoint(source)['ema'][name].numel()}; these weights cannot sample")


def test_sample_py_with_a_nan_in_an_exported_denoiser_writes_nothing(trained, exported, tmp_path):
    bad, name = with_a_nan(exported.content, tmp_path / "content.safetensors")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "sample.py", "--ae-ckpt", str(exported.ae), "--motion-ckpt",
                           str(exported.motion), "--content-ckpt", str(bad), "--num-videos", "1", "--npz",
                           str(out / "all.npz"), "--out-dir", str(out)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert one_line_error(proc).startswith(f"error: {bad}: weight '{name}' holds 1 non-finite value")
    assert not out.exists() or not any(out.rglob("*.mp4")) and not any(out.rglob("*.npz"))


def test_non_finite_samples_are_an_error_and_are_not_written(trained, tmp_path, monkeypatch):
    """Whatever makes a sample NaN (weights, guidance, a numerical blow-up), it is refused before it is written:
    as uint8 it would pass for a black video."""
    import sample
    import sampling.batches

    real_generate = sampling.batches.generate

    def generate_with_a_nan(models, labels, seed, indices, *args, **kwargs):
        videos, content = real_generate(models, labels, seed, indices, *args, **kwargs)
        if 1 in indices:
            videos[list(indices).index(1)].view(-1)[0] = float("nan")
        return videos, content

    monkeypatch.setattr(sampling.batches, "generate", generate_with_a_nan)
    out = tmp_path / "out"
    args = sample.parse_args(["--ae-ckpt", str(trained.ae_ckpt), "--motion-ckpt", str(trained.motion_ckpt),
                              "--content-ckpt", str(trained.content_ckpt), "--num-videos", "3", "--batch-size", "1",
                              "--out-dir", str(out), "--npz", str(out / "all.npz"), "--quiet"])
    with pytest.raises(ValueError) as info:
        sample.main(args)
    assert str(info.value) == ("sampling produced non-finite values (NaN or inf) in video 1; nothing of it was written "
                               "(guidance scales: content 2, motion 3)")
    # The video before it is whole and stays; the NaN one, those after it, the grid and the npz are never written.
    assert sorted(path.name for path in out.rglob("*") if path.is_file()) == ["000000_class000.mp4"]


def test_a_guidance_scale_in_an_exports_config_that_would_overflow_is_refused(trained, exported, tmp_path):
    from sampling.generation import load_models

    bad = tampered_export(exported.motion, tmp_path / "motion.safetensors", "diffusion.cfg_scale", 1e300)
    with pytest.raises(ValueError) as info:
        load_models(exported.ae, bad)
    assert str(info.value) == ("the motion model's guidance scale 1e+300 is not in 0..100 (its checkpoint's "
                               "diffusion.cfg_scale)")
