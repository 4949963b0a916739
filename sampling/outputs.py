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


class OutputError(ValueError):
    """An output location that cannot be used; the message is one line."""


# The names sample.py gives its videos: index and class, or index and the prompt's words (sample.prompt_slug).
VIDEO_NAME = re.compile(r"^\d{6}_(class\d{3}|[a-z0-9-]+)\.mp4$")
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


def check_creatable(path: Path, flag: str, folder: bool) -> None:
    """One line if `path` (a folder, or a file) cannot be created or written: something in the way or no permission.

    Writability is probed by creating a file, since permission bits say nothing for root or on a read-only mount.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path:
        if folder and not path.is_dir():
            raise OutputError(f"{flag} {path}: is a file, not a folder")
        if not folder and path.is_dir():
            raise OutputError(f"{flag} {path}: is a folder, not a file")
        where = path if folder else path.parent
    elif not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a folder")
    else:
        where = existing  # the folders below it will be created
    try:
        handle, probe = tempfile.mkstemp(dir=where, prefix=".sample-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write in {where} ({exc.strerror or exc})") from None


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
    foreign = [p for p in earlier if not (VIDEO_NAME.match(p.name) and p.is_file())]
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
        earlier = sorted(frames_dir.iterdir()) if frames_dir.is_dir() else []
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


def check_outputs(args) -> list:
    """Every output location is usable; returns what of an earlier run --overwrite will replace (mp4 files and
    --frames-dir video folders)."""
    out_dir = Path(args.out_dir)
    check_creatable(out_dir, "--out-dir", folder=True)
    check_creatable(out_dir / "videos", "--out-dir", folder=True)
    for name in GRID_FILES:
        check_creatable(out_dir / name, "--out-dir", folder=False)
    if args.npz:
        check_creatable(npz_path(args.npz), "--npz", folder=False)
    earlier = earlier_videos(out_dir, args.overwrite)
    if args.frames_dir:
        frames_dir = Path(args.frames_dir)
        if frames_dir.resolve() in (out_dir.resolve(), (out_dir / "videos").resolve()):
            # The grid files and the mp4 folder would read as foreign entries to the next run's check.
            raise OutputError(f"--frames-dir {frames_dir}: give it a folder of its own, not --out-dir or its videos folder")
        check_creatable(frames_dir, "--frames-dir", folder=True)
        earlier += earlier_frames(frames_dir, args.overwrite)
    return earlier


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
