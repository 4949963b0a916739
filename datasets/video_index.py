"""Video-folder listing (classes, UCF-101 split lists) and the on-disk cache of per-file frame counts."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from datasets import video_decode
from datasets.errors import DatasetError, VideoReadError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov")
SPLIT_LIST_FOLDER = "ucftraintestlist"  # compared lower-case: the official download spells it ucfTrainTestlist
SPLITS = ("train", "test", "all")
FOLDS = (1, 2, 3)
# Bump when the probe changes what it returns, so old cache entries are not trusted.
PROBE_VERSION = 1
CACHE_FOLDER_NAME = ".cmd_index_cache"


@dataclass
class FolderListing:
    """What is on disk before any file is opened: classes, every video, and the split lists if present."""

    root: Path
    class_names: List[str]
    videos: List[Tuple[str, int]]  # (path relative to root, label), all videos of known classes
    split_list_dir: Optional[Path] = None
    split_videos: Dict[str, List[Tuple[str, int]]] = field(default_factory=dict)  # "train"/"test" of the fold
    missing_listed: List[Tuple[str, str]] = field(default_factory=list)  # (listed path, list file) not on disk
    ignored_folders: List[str] = field(default_factory=list)  # folders with videos but no classInd entry

    def videos_of_split(self, split: str) -> List[Tuple[str, int]]:
        if split == "all" or split not in self.split_videos:
            return self.videos
        return self.split_videos[split]


def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def _videos_under(folder: Path, root: Path) -> List[str]:
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(files):
            if _is_video(name):
                found.append(Path(directory, name).relative_to(root).as_posix())
    return found


def find_split_list_dir(root: Path) -> Optional[Path]:
    """ucfTrainTestlist inside the data folder, or beside it (the official archives unpack side by side)."""
    for parent in (root, root.parent):
        try:
            entries = sorted(parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.lower() == SPLIT_LIST_FOLDER and entry.is_dir():
                return entry
    return None


def _read_class_index(path: Path) -> List[str]:
    """classInd.txt lines "1 ApplyEyeMakeup" (1-based) -> class names in label order."""
    by_number = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{path}:{line_number}: expected '<number> <class name>', got {line.strip()!r}")
        by_number[int(parts[0])] = parts[1]
    if sorted(by_number) != list(range(1, len(by_number) + 1)):
        raise DatasetError(f"{path}: class numbers must run 1..N without gaps")
    return [by_number[number] for number in range(1, len(by_number) + 1)]


def _read_split_list(path: Path) -> List[str]:
    """trainlist01.txt ("Class/v_x.avi 1") or testlist01.txt ("Class/v_x.avi") -> relative paths."""
    entries = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts:
            entries.append(parts[0].replace("\\", "/"))
    return entries


def list_video_folder(root: Path, fold: int = 1) -> FolderListing:
    """Classes and videos of a class-folder tree, plus the fold's split lists when ucfTrainTestlist exists."""
    if fold not in FOLDS:
        raise DatasetError(f"fold must be one of {FOLDS}, got {fold}")
    if not root.exists():
        raise DatasetError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"data path is not a folder: {root}")
    videos_by_folder: Dict[str, List[str]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name.lower() != SPLIT_LIST_FOLDER:
            videos = _videos_under(entry, root)
            if videos:
                videos_by_folder[entry.name] = videos
    if not videos_by_folder:
        raise DatasetError(f"no class folders with videos ({', '.join(VIDEO_EXTENSIONS)}) in data path: {root}")

    split_list_dir = find_split_list_dir(root)
    class_index_file = split_list_dir / "classInd.txt" if split_list_dir else None
    if class_index_file is not None and class_index_file.is_file():
        class_names = _read_class_index(class_index_file)
    else:
        class_names = sorted(videos_by_folder)
    # UCF-101 mixes case between classInd and folders (HandstandPushups vs HandStandPushups), so match lower-case.
    label_of = {name.lower(): label for label, name in enumerate(class_names)}
    listing = FolderListing(root=root, class_names=class_names, videos=[], split_list_dir=split_list_dir)
    for folder, videos in videos_by_folder.items():
        label = label_of.get(folder.lower())
        if label is None:
            listing.ignored_folders.append(folder)
            continue
        listing.videos.extend((relative_path, label) for relative_path in videos)

    if split_list_dir is not None:
        on_disk = {relative_path.lower(): (relative_path, label) for relative_path, label in listing.videos}
        for split in ("train", "test"):
            list_file = split_list_dir / f"{split}list0{fold}.txt"
            if not list_file.is_file():
                continue
            chosen = []
            for listed in _read_split_list(list_file):
                match = on_disk.get(listed.lower())
                if match is None:
                    listing.missing_listed.append((listed, list_file.name))
                else:
                    chosen.append(match)
            listing.split_videos[split] = chosen
    return listing


# ---------------------------------------------------------------------------------------------- cache


def _cache_candidates(root: Path, index_cache_dir: Optional[str]) -> List[Path]:
    if index_cache_dir:
        return [Path(index_cache_dir).expanduser()]
    return [root / CACHE_FOLDER_NAME, Path.home() / ".cache" / "cmd"]


def _cache_file_name(root: Path) -> str:
    # One file per data folder, so several datasets can share a cache directory.
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return f"index_{digest}.json"


def _load_cache(root: Path, candidates: Sequence[Path]) -> Tuple[Dict[str, dict], Optional[Path]]:
    name = _cache_file_name(root)
    for directory in candidates:
        path = directory / name
        if not path.is_file():
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable index cache %s: %s", path, error)
            continue
        if payload.get("probe_version") == PROBE_VERSION and isinstance(payload.get("files"), dict):
            return payload["files"], path
    return {}, None


def _writable_directory(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def _save_cache(root: Path, candidates: Sequence[Path], files: Dict[str, dict]) -> Optional[Path]:
    payload = {"probe_version": PROBE_VERSION, "root": str(root.resolve()), "files": files}
    for directory in candidates:
        if not _writable_directory(directory):
            continue
        path = directory / _cache_file_name(root)
        try:
            # Temp file + rename: ranks that build the index at the same time never see half a file.
            handle, temporary = tempfile.mkstemp(dir=directory, prefix=".index_", suffix=".tmp")
            with os.fdopen(handle, "w") as stream:
                json.dump(payload, stream)
            os.replace(temporary, path)
            return path
        except OSError as error:
            logger.warning("cannot write index cache in %s: %s", directory, error)
    logger.warning("index cache not saved: no writable directory among %s", [str(path) for path in candidates])
    return None


@dataclass
class ProbeResult:
    num_frames: Optional[int]  # None when the file is unreadable
    fps: Optional[float]
    error: Optional[str]


def _probe_one(path: Path) -> ProbeResult:
    try:
        info = video_decode.probe_video(str(path))
    except VideoReadError as error:
        return ProbeResult(None, None, str(error))
    return ProbeResult(info.num_frames, info.fps, None)


def probe_videos(
    root: Path,
    relative_paths: Sequence[str],
    index_cache_dir: Optional[str] = None,
    max_threads: Optional[int] = None,
    cached_only: bool = False,
) -> Tuple[Dict[str, ProbeResult], Dict[str, object]]:
    """Frame count (or read error) of each file, reusing cache entries whose size and mtime still match.

    Returns (results by relative path, stats: probed / reused / cache_file). With cached_only, files without a
    valid cache entry are left out of the results instead of being probed.
    """
    candidates = _cache_candidates(root, index_cache_dir)
    cached, cache_file = _load_cache(root, candidates)
    results: Dict[str, ProbeResult] = {}
    signatures: Dict[str, Tuple[int, int]] = {}
    to_probe: List[str] = []
    for relative_path in relative_paths:
        try:
            status = (root / relative_path).stat()
        except OSError as error:
            results[relative_path] = ProbeResult(None, None, f"cannot stat: {error}")
            continue
        signatures[relative_path] = (status.st_size, status.st_mtime_ns)
        entry = cached.get(relative_path)
        if entry is not None and (entry.get("size"), entry.get("mtime_ns")) == signatures[relative_path]:
            results[relative_path] = ProbeResult(entry.get("frames"), entry.get("fps"), entry.get("error"))
        else:
            to_probe.append(relative_path)
    if cached_only:
        return results, {"probed": 0, "reused": len(results), "cache_file": cache_file}
    if to_probe:
        logger.info("indexing %d video files under %s (%d reused from cache)", len(to_probe), root, len(results))
        # Decoding in PyAV releases the GIL, so threads give a real speed-up on a 13k-file first start.
        threads = max_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            probed = list(pool.map(_probe_one, [root / relative_path for relative_path in to_probe]))
        files = {key: value for key, value in cached.items() if (root / key).exists()}
        for relative_path, result in zip(to_probe, probed):
            results[relative_path] = result
            size, mtime_ns = signatures[relative_path]
            files[relative_path] = {
                "size": size,
                "mtime_ns": mtime_ns,
                "frames": result.num_frames,
                "fps": result.fps,
                "error": result.error,
            }
        cache_file = _save_cache(root, candidates, files) or cache_file
    stats = {"probed": len(to_probe), "reused": len(relative_paths) - len(to_probe), "cache_file": cache_file}
    return results, stats
