"""How far a reader walks to follow one value: the files the motion script's config passes through, and the files
sample.py's flags pass through on their way to the mp4.

    python -m benchmarks.reading_paths [--list] [--work DIR]   # minutes on a CPU: a tiny chain, one step a stage

It runs the real code on the tiny configs (one training step of each stage, then one sampled video) and records the
call stack of every read of a key of the motion script's config (from `train_motion_diffusion.main` down), and of
every read of one of sample.py's flags and of the mp4 write (from `sample.main` down). The stacks, in the order of
the reads, make one walk through the repository's files, as a reader following the calls would take it: from one
read to the next the walk returns up to the frames the two stacks share, then goes down the new stack. Reads made
through a plain copy of a value (a dict of the config, a flag's value passed on) are not followed.

- files: the distinct files the walk passes through;
- re-entries: the times the walk goes down into a file it has already left (the reader comes back to a file);
- folder moves: the steps of the walk from a file to one in another folder.
"""
from __future__ import annotations

import argparse
import inspect
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import av
from omegaconf import DictConfig, OmegaConf

from core.cli import HelpFormatter

REPO = Path(__file__).resolve().parents[1]


class Walk:
    """The stacks of repository frames (outermost first, one entry per run of frames in the same file) seen at each
    recorded read, below the frame running `root` (a function's code object)."""

    def __init__(self, root):
        self.root = root
        self.stacks: list = []

    def record(self) -> None:
        frame, files = sys._getframe(2), []
        while frame is not None and frame.f_code is not self.root:
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(REPO) and path != Path(__file__).resolve():
                files.append(str(path.relative_to(REPO)))
            frame = frame.f_back
        if frame is None:  # not below the root: a read made before or after it ran
            return
        files.append(str(Path(self.root.co_filename).relative_to(REPO)))
        files.reverse()
        stack = [f for i, f in enumerate(files) if i == 0 or f != files[i - 1]]
        if not self.stacks or stack != self.stacks[-1]:
            self.stacks.append(stack)

    def counts(self) -> dict:
        seen, reentries, moves, current = set(), 0, 0, []
        for stack in self.stacks:
            shared = 0
            while shared < min(len(current), len(stack)) and current[shared] == stack[shared]:
                shared += 1
            at = current[shared - 1] if shared else None
            for file in stack[shared:]:
                reentries += file in seen and file != at
                moves += at is not None and Path(file).parent != Path(at).parent
                seen.add(file)
                at = file
            current = stack
        return {"files": len(seen), "re-entries": reentries, "folder moves": moves, "walk steps": len(self.stacks),
                "file list": sorted(seen), "stacks": self.stacks}


def _patched(cls, name: str, before) -> None:
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        before(self, *args)
        return original(self, *args, **kwargs)

    setattr(cls, name, wrapper)
    return original


def diffusion_config_walk(work: Path) -> dict:
    """The walk of the reads of the motion script's config during one training step (with its sample and save)."""
    import train_motion_diffusion
    from core.config import parse_config

    cfg = parse_config("motion", "reading paths", [
        "--config", "configs/tiny/motion.yaml", "--ae-ckpt", str(work / "ae/checkpoints/last.pt"),
        "--results-dir", str(work), "--exp-name", "walk-motion", "--max-steps", "1", "train.num_eval_videos=2"])
    walk = Walk(inspect.unwrap(train_motion_diffusion.main).__code__)

    def on_read(node, *key):
        if node._get_root() is cfg:
            walk.record()

    originals = {name: _patched(DictConfig, name, on_read) for name in ("__getattr__", "__getitem__", "get")}
    select = OmegaConf.select

    def select_recorded(node, key, *args, **kwargs):
        if node._get_root() is cfg:
            walk.record()
        return select(node, key, *args, **kwargs)

    OmegaConf.select = select_recorded
    try:
        train_motion_diffusion.main(cfg)
    finally:
        for name, original in originals.items():
            setattr(DictConfig, name, original)
        OmegaConf.select = select
    return walk.counts()


class _RecordingArgs(argparse.Namespace):
    walk: Walk = None

    def __getattribute__(self, name):
        if name in object.__getattribute__(self, "__dict__"):
            type(self).walk.record()
        return object.__getattribute__(self, name)


def sample_flags_walk(work: Path) -> dict:
    """The walk of sample.py's flag reads and its mp4 writes for one sampled video."""
    import sample

    args = sample.parse_args([
        "--ae-ckpt", str(work / "ae/checkpoints/last.pt"), "--motion-ckpt", str(work / "motion/checkpoints/last.pt"),
        "--content-ckpt", str(work / "content/checkpoints/last.pt"), "--num-videos", "1",
        "--out-dir", str(work / "walk-samples")])
    walk = Walk(inspect.unwrap(sample.main).__code__)
    _RecordingArgs.walk = walk
    recording = _RecordingArgs(**vars(args))
    original_open = av.open

    def open_recorded(*a, **kw):
        if kw.get("mode") == "w":
            walk.record()
        return original_open(*a, **kw)

    av.open = open_recorded
    try:
        sample.main(recording)
    finally:
        av.open = original_open
    return walk.counts()


def train_tiny_chain(work: Path) -> None:
    common = ["--results-dir", str(work), "--max-steps", "1"]
    for script, config, name, extra in (
        ("train_ae.py", "autoencoder", "ae", []),
        ("train_motion_diffusion.py", "motion", "motion", ["--ae-ckpt", str(work / "ae/checkpoints/last.pt")]),
        ("train_content_diffusion.py", "content", "content", ["--ae-ckpt", str(work / "ae/checkpoints/last.pt")]),
    ):
        subprocess.run([sys.executable, script, "--config", f"configs/tiny/{config}.yaml", "--exp-name", name,
                        *common, *extra, "train.num_eval_videos=2"], cwd=REPO, check=True, capture_output=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Files a reader walks through to follow the motion script's config "
                                                 "and sample.py's flags.", formatter_class=HelpFormatter)
    parser.add_argument("--list", action="store_true", help="also print the files of each walk")
    parser.add_argument("--stacks", action="store_true", help="also print each walk's stacks, in order")
    parser.add_argument("--work", type=Path, help="a folder for the tiny chain, kept (default: a temporary one); "
                                                  "a chain already there is used as it is")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if not (work / "content/checkpoints/last.pt").is_file():
            train_tiny_chain(work)
        for outputs in ("walk-motion", "walk-samples"):  # the walks' own, from an earlier measurement
            shutil.rmtree(work / outputs, ignore_errors=True)
        walks = {"the config, from train_motion_diffusion.main": diffusion_config_walk(work),
                 "sample.py flags to the mp4": sample_flags_walk(work)}
    for name, counts in walks.items():
        files, stacks = counts.pop("file list"), counts.pop("stacks")
        print(f"{name}: " + ", ".join(f"{value} {key}" for key, value in counts.items()))
        if args.list:
            print("    " + "\n    ".join(files))
        if args.stacks:
            print("    " + "\n    ".join(" > ".join(stack) for stack in stacks))


if __name__ == "__main__":
    main()
