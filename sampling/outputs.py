"""sample.py's outputs: every location checked before any model loads, never mixed with an earlier run's videos,
and no file cut short by a stop signal or a full disk left behind to pass for a result."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from core.files import CLAIM_FILE, OutputError, check_creatable, check_unclaimed, claim  # noqa: F401 (OutputError: API)


# The names sample.py gives its videos: index and class, or index and the prompt's words (sample.prompt_slug).
VIDEO_NAME = re.compile(r"^\d{6}_(class\d{3}|[a-z0-9-]+)\.mp4$")
# What a killed writer leaves beside it (core.files.temp_path): its own, removed with the run's videos.
TEMP_VIDEO = re.compile(r"^\.\d{6}_(class\d{3}|[a-z0-9-]+)\.mp4\.tmp-\d+$")
CAPTIONS_GRID = "grid_captions.png"  # text-to-video: the grid's videos in rows, each with its prompt
GRID_FILES = ("grid.mp4", "grid.png", CAPTIONS_GRID)
# --frames-dir: DIR/000000/000.png ..., one folder per video, the layout StyleGAN-V's metric scripts read;
# a folder being written is hidden (.000000.partial-PID) and renamed when complete.
FRAME_FOLDER = re.compile(r"^(\d{6}|\.\d{6}\.partial-\d+)$")
FRAME_NAME = re.compile(r"^\d{3,}\.png$")


def npz_path(npz) -> Path | None:
    """The file np.savez writes for `npz`: it appends .npz to a name without it."""
    if npz is None:
        return None
    npz = Path(npz)
    return npz if npz.suffix == ".npz" else npz.with_name(npz.name + ".npz")


def files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def earlier_videos(out_dir: Path, overwrite: bool) -> list:
    """The videos of an earlier run in out_dir/videos, to be removed (with --overwrite) or refused (without it):
    a run that added its videos to another run's would report a count that the folder does not show."""
    videos = out_dir / "videos"
    try:
        earlier = sorted(videos.iterdir()) if videos.is_dir() else []
    except OSError as exc:
        raise OutputError(f"--out-dir {out_dir}: cannot list {videos} ({exc.strerror or exc})") from None
    if earlier and not overwrite:
        raise OutputError(f"--out-dir {out_dir}: {videos} already holds {files(len(earlier))} of an earlier run; "
                          f"choose another --out-dir, or pass --overwrite to replace them")
    foreign = [p for p in earlier if not ((VIDEO_NAME.match(p.name) or TEMP_VIDEO.match(p.name)) and p.is_file())]
    if foreign:
        raise OutputError(f"--overwrite: {videos} holds {files(len(foreign))} that sample.py did not write (such as "
                          f"{foreign[0].name}), which it does not remove: choose another --out-dir")
    return earlier


def frame_folder_is_ours(path: Path) -> bool:
    """A video folder sample.py wrote: a six-digit name and nothing but numbered PNG frames in it."""
    if not (FRAME_FOLDER.match(path.name) and path.is_dir() and not path.is_symlink()):
        return False
    return all(FRAME_NAME.match(frame.name) and frame.is_file() for frame in path.iterdir())


def earlier_frames(frames_dir: Path, overwrite: bool) -> list:
    """The video folders of an earlier run in --frames-dir, removed with --overwrite and refused without it: the
    metric scripts read every folder there, so a smaller run written over a larger one would be scored with it."""
    try:
        earlier = sorted(p for p in frames_dir.iterdir() if p.name != CLAIM_FILE) if frames_dir.is_dir() else []
        foreign = [path for path in earlier if not frame_folder_is_ours(path)]
    except OSError as exc:
        raise OutputError(f"--frames-dir {frames_dir}: cannot list it ({exc.strerror or exc})") from None
    if earlier and not overwrite:
        raise OutputError(f"--frames-dir {frames_dir}: already holds {len(earlier)} entries (such as {earlier[0].name}); "
                          f"choose another --frames-dir, or pass --overwrite to replace an earlier run's frames")
    if foreign:
        raise OutputError(f"--overwrite: {frames_dir} holds {len(foreign)} entries that sample.py did not write (such "
                          f"as {foreign[0].name}), which it does not remove: choose another --frames-dir")
    return earlier


def _places(args) -> list:
    """(flag, path, is a folder, what to do instead) of every output location of a sample.py run."""
    places = [("--out-dir", Path(args.out_dir), True, "choose another --out-dir")]
    if args.frames_dir:
        places.append(("--frames-dir", Path(args.frames_dir), True, "choose another --frames-dir"))
    if args.npz:
        places.append(("--npz", npz_path(args.npz), False, "choose another --npz file"))
    return places


def check_outputs(args) -> list:
    """Every output location is usable and held by no other live process; returns what of an earlier run
    --overwrite will replace (mp4 files and --frames-dir video folders; an existing --npz file is replaced by the
    new one when it is complete)."""
    for flag, path, folder, hint in _places(args):
        check_unclaimed(path, flag, f"{hint}, or wait for it to end", folder)
    out_dir = Path(args.out_dir)
    check_creatable(out_dir, "--out-dir", folder=True)
    check_creatable(out_dir / "videos", "--out-dir", folder=True)
    for name in GRID_FILES:
        check_creatable(out_dir / name, "--out-dir", folder=False)
    earlier = []
    if args.npz:
        npz = npz_path(args.npz)
        check_creatable(npz, "--npz", folder=False)
        if npz.exists() and not args.overwrite:
            raise OutputError(f"--npz {npz}: exists; choose another file, or pass --overwrite to replace it")
    earlier += earlier_videos(out_dir, args.overwrite)
    if args.frames_dir:
        frames_dir = Path(args.frames_dir)
        if frames_dir.resolve() in (out_dir.resolve(), (out_dir / "videos").resolve()):
            # The grid files and the mp4 folder would read as foreign entries to the next run's check.
            raise OutputError(f"--frames-dir {frames_dir}: give it a folder of its own, not --out-dir or its videos folder")
        check_creatable(frames_dir, "--frames-dir", folder=True)
        earlier += earlier_frames(frames_dir, args.overwrite)
    return earlier


def claim_outputs(args) -> tuple:
    """Claims every output location for this process (core.files.claim), so that a second sample.py started into
    one of them at the same time stops with one line instead of mixing its videos with these; then checks them
    again, now that no other run can change them. Returns (the claims, what check_outputs returns)."""
    claims = []
    try:
        for flag, path, folder, hint in _places(args):
            claims.append(claim(path, flag, f"{hint}, or wait for it to end", folder))
        return claims, check_outputs(args)
    except BaseException:
        for held in claims:
            held.release()
        raise


def write_frames(clip: np.ndarray, folder: Path) -> Path:
    """uint8 (T, H, W, 3) -> folder/000.png, 001.png, ...; written under a hidden name and renamed when complete."""
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    digits = max(3, len(str(len(clip) - 1)))
    try:
        partial.mkdir(parents=True)
        for t, frame in enumerate(clip):
            Image.fromarray(frame).save(partial / f"{t:0{digits}d}.png")
        os.rename(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def removed_if_unfinished(*paths):
    """A file cut short (a stop signal, a full disk) would pass for a result: it is removed unless it was finished."""
    try:
        yield
    except BaseException:
        for path in paths:
            remove(Path(path))
        raise
