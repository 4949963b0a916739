"""sample.py's outputs: every location checked before any model loads, never mixed with an earlier run's videos,
and no file cut short by a stop signal or a full disk left behind to pass for a result; each video written as it is
finished, and the run's result (--npz, the grid) gathered from the ranks' shards."""
from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from core.distributed import all_gather_object, barrier, broadcast_object
from core.files import (CLAIM_FILE, OutputError, check_creatable, check_unclaimed, claim, os_reason, reported,
                        write_output)
from sampling.media import captioned_rows, save_video_set, write_mp4, write_png


# The names sample.py gives its videos (sampling.requests.video_names): index and class, or index and the prompt's
# words.
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
        raise OutputError(f"--frames-dir {frames_dir}: already holds {len(earlier)} entries (such as "
                          f"{earlier[0].name}); choose another --frames-dir, or pass --overwrite to replace an "
                          f"earlier run's frames")
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
            raise OutputError(f"--frames-dir {frames_dir}: give it a folder of its own, not --out-dir or its videos "
                              f"folder")
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


def claim_job_outputs(args, is_main: bool, earlier: list) -> tuple:
    """claim_outputs once per job, on rank 0: the ranks of a run share its outputs. Every rank stops with rank 0's
    error. Returns (this rank's claims, what of an earlier run --overwrite replaces)."""
    claims, error = [], None
    if is_main:
        try:
            claims, earlier = claim_outputs(args)
        except OutputError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"--out-dir {args.out_dir}: cannot claim it ({os_reason(exc)})"
    error = broadcast_object(error)
    if error:
        raise OutputError(error)
    return claims, earlier


def prepare_outputs(args, is_main: bool, earlier: list) -> None:
    """Rank 0 removes what of an earlier run --overwrite replaces; then every rank's output folders exist."""
    if earlier and is_main:
        remove_earlier_run(Path(args.out_dir), earlier)
    barrier()  # no rank writes a video that rank 0 is about to remove
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)  # the grid and the rank shards go here, mp4s or not
    if not args.no_mp4:
        (Path(args.out_dir) / "videos").mkdir(exist_ok=True)
    if args.frames_dir:
        Path(args.frames_dir).mkdir(parents=True, exist_ok=True)


def remove_earlier_run(out_dir: Path, earlier: list) -> None:
    """Removes the earlier run's videos, frame folders and grid, and says how many videos went from where."""
    for path in [*earlier, *(out_dir / name for name in GRID_FILES)]:
        remove(path)
    counts = Counter(str(path.parent) for path in earlier)
    print("removed " + " and ".join(f"{count} videos of an earlier run from {place}" for place, count in counts.items())
          + " (--overwrite)")


def video_places(args) -> list:
    """Where each video goes as it is finished: its mp4 (unless --no-mp4) and its folder of PNG frames."""
    places = [] if args.no_mp4 else [str(Path(args.out_dir) / "videos")]
    return places + ([f"{args.frames_dir} (PNG frames)"] if args.frames_dir else [])


def write_video(args, index: int, name: str, clip: np.ndarray) -> list:
    """Video `index`'s mp4 `name` (unless --no-mp4) and its folder of PNG frames (--frames-dir), each whole or not
    there; returns the first of them, the one a stopped run counts the video by."""
    mp4 = None if args.no_mp4 else Path(args.out_dir) / "videos" / name
    frames = Path(args.frames_dir) / f"{index:06d}" if args.frames_dir else None
    outputs = [path for path in (mp4, frames) if path is not None]
    with removed_if_unfinished(*outputs):  # a video counts once all its outputs are whole
        if mp4 is not None:
            with reported("--out-dir", mp4):
                write_mp4(clip, mp4, fps=args.fps)
        if frames is not None:
            with reported("--frames-dir", frames):
                write_frames(clip, frames)
    return outputs[:1]


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


# ---- the run's result: each rank's shard, then rank 0's --npz and grid -----------------------------------------
class UnsavedVideos(OutputError):
    """The final outputs could not be written; the rank shards that hold the videos are kept and named."""


class RankVideos(NamedTuple):
    """A rank's videos in uint8, batch by batch: (B, T, H, W, 3) clips, (B, H, W, 3) content frames, and the index
    of each video in the run."""
    videos: list
    content_frames: list
    indices: list


def shard_path(out_dir, rank: int) -> Path:
    return Path(out_dir) / f".shard-{rank:05d}.npz"


def write_shard(out_dir, rank: int, videos: RankVideos) -> None:
    """This rank's videos into its shard, for rank 0 to gather; if any rank cannot write its shard, all stop."""
    error = None
    try:
        write_output(shard_path(out_dir, rank), lambda handle: np.savez(
            handle, videos=np.concatenate(videos.videos) if videos.videos else np.zeros((0,), np.uint8),
            content_frames=(np.concatenate(videos.content_frames) if videos.content_frames
                            else np.zeros((0,), np.uint8)),
            indices=np.array(videos.indices)), "--out-dir")
    except OutputError as exc:
        error = str(exc)
    error = next((e for e in all_gather_object(error) if e), None)  # every rank stops, none waits at a barrier
    if error:
        raise OutputError(error)


def write_results(args, info, num_classes: int, labels: list, captions) -> None:
    """Rank 0 writes the run's result from the shards (write_final_outputs); where it cannot, every rank stops
    with UnsavedVideos, which names the shards that keep the videos."""
    error = None
    if info.is_main:
        try:
            write_final_outputs(args, Path(args.out_dir), info.world_size, num_classes, labels, captions)
        except OutputError as exc:
            # The npz is written first and the shards are removed only once it is: a full disk loses no video.
            shards = [shard_path(args.out_dir, r) for r in range(info.world_size)]
            error = (f"{exc}; the {args.num_videos} videos are kept in {', '.join(map(str, shards))} "
                     f"(arrays videos, content_frames, indices)")
    error = broadcast_object(error)
    if error:
        raise UnsavedVideos(error)


def write_final_outputs(args, out_dir: Path, world_size: int, num_classes: int, labels: list, captions) -> None:
    """Rank 0: the --npz file (first: it is the run's result) and the grid, from every rank's shard; then the
    shards are removed."""
    shards = [shard_path(out_dir, r) for r in range(world_size)]
    loaded = [np.load(path) for path in shards]
    order = np.concatenate([s["indices"] for s in loaded if len(s["indices"])])
    ranked = np.argsort(order)
    all_videos = np.concatenate([s["videos"] for s in loaded if len(s["indices"])])[ranked]
    all_contents = np.concatenate([s["content_frames"] for s in loaded if len(s["indices"])])[ranked]
    if args.npz:
        arrays = {"videos": all_videos, "labels": np.array(labels, dtype=np.int64), "content_frames": all_contents,
                  "num_classes": np.int64(num_classes)}
        if captions is not None:
            arrays["captions"] = np.array(captions, dtype=str)  # a unicode array: read back without pickle
        # Written beside its place and renamed: an earlier file stays whole until the new one is complete.
        write_output(npz_path(args.npz), lambda handle: np.savez(handle, **arrays), "--npz")
        print(f"wrote {npz_path(args.npz)}: videos {all_videos.shape} uint8")
    with reported("--out-dir", out_dir), removed_if_unfinished(*(out_dir / name for name in GRID_FILES)):
        grid = save_video_set(all_videos[: args.grid_videos], out_dir, "grid", fps=args.fps)
        if captions is not None:  # the grid's videos in rows, each with its prompt
            write_png(captioned_rows(all_videos[: args.grid_videos], captions[: args.grid_videos]),
                      out_dir / CAPTIONS_GRID)
    for path in shards:
        path.unlink(missing_ok=True)
    places = video_places(args)
    print((f"wrote {len(all_videos)} videos to {' and '.join(places)}; " if places else "")
          + f"grid: {grid['mp4']} and {grid['png']}"
          + ("" if captions is None else f"; with the prompts: {out_dir / CAPTIONS_GRID}"))
