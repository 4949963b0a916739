"""Video-folder listing (classes, UCF-101 split lists) and the on-disk cache of per-file frame counts."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Tuple

from datasets import video_decode
from datasets.errors import DatasetError, VideoReadError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov")
SPLIT_LIST_FOLDER = "ucftraintestlist"  # compared lower-case: the official download spells it ucfTrainTestlist
SPLITS = ("train", "test", "all")
FOLDS = (1, 2, 3)
# Bump when the probe changes what it returns, so old cache entries are not trusted. Only per-file probe results
# are cached (keyed by relative path, size and mtime); classes, labels and the file list are rebuilt on every start,
# so changing how the tree is listed (symlink aliases, empty classes) needs no bump: stale keys are never looked up.
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
    empty_classes: List[str] = field(default_factory=list)  # classes (folders or classInd entries) without videos
    skipped_links: List[Tuple[str, str]] = field(default_factory=list)  # (path relative to root, why) aliases/loops

    def videos_of_split(self, split: str) -> List[Tuple[str, int]]:
        if split == "all" or split not in self.split_videos:
            return self.videos
        return self.split_videos[split]


def is_video_name(name: str) -> bool:
    """A video file by its name; hidden files (e.g. macOS "._clip.mp4" resource forks) are not videos."""
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def _is_within(path: str, folder: str) -> bool:
    """True when real path `path` is `folder` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_order(relative_path: str) -> List[Tuple[int, str]]:
    """Sort key giving os.walk's top-down order (a folder's files, then its sorted subfolders), as before symlinks
    were resolved: dataset indices, and so the seeded clip starts, stay those of existing runs."""
    *folders, name = relative_path.split("/")[1:]
    return [(1, folder) for folder in folders] + [(0, name)]


class _ClassTreeWalk:
    """Class folders and their videos, each file on disk indexed once, found by real path.

    Every real (non-link) folder and video under the class folders is listed first; only then are symlinks resolved,
    so a real folder always wins over a link to it whatever the two names' sort order. A symlink (or a folder reached
    through one) is then skipped, with one warning line naming it and its target, when:
    - its target is the data root, or a folder containing the data root or the link itself (a loop);
    - its real path was already indexed (an alias: `C -> .`, `Dup -> Apple`, a second link to the same folder);
    - it is broken (missing target or a chain of links that loops).
    A link to a folder or video that nothing else indexes, typically a class folder kept on another disk, is followed:
    such trees are a common way to assemble a dataset, and indexing the target once cannot duplicate anything.
    Among several links to the same outside target the first in tree order (sorted names) wins.
    """

    def __init__(self, root: Path):
        self.root = root
        self.root_real = os.path.realpath(root)
        self.seen: Dict[str, str] = {}  # real path -> path relative to root under which it was indexed
        self.videos: Dict[str, List[str]] = {}  # class folder -> video paths relative to root
        self.pending_links: Deque[str] = deque()  # relative paths, resolved after every real entry is known
        self.skipped: List[Tuple[str, str]] = []

    def run(self) -> None:
        for entry in self._entries(self.root):
            if entry.name.lower() == SPLIT_LIST_FOLDER:
                continue
            if entry.is_symlink():
                self.pending_links.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                self._add_folder(entry.name, os.path.join(self.root_real, entry.name))
        # Links found inside followed links are appended and resolved in turn; `seen` makes every step finite.
        while self.pending_links:
            self._resolve_link(self.pending_links.popleft())

    def _entries(self, folder: Path) -> List[os.DirEntry]:
        try:
            with os.scandir(folder) as iterator:
                return sorted((entry for entry in iterator if not entry.name.startswith(".")), key=lambda e: e.name)
        except OSError as error:
            logger.warning("cannot list folder %s, its videos are left out: %s", folder, error)
            return []

    def _skip(self, relative: str, target: str, reason: str, is_link: bool = True) -> None:
        self.skipped.append((relative, reason))
        # Not a link itself: a real entry inside a followed outside tree that an earlier link already indexed.
        kind = "symlink" if is_link else "path reached through a symlink"
        logger.warning("skipping %s %s -> %s: %s", kind, self.root / relative, target, reason)

    def _add_folder(self, relative: str, real: str, is_link: bool = False) -> None:
        if real in self.seen:
            self._skip(relative, real, f"alias of {self.seen[real]}, already indexed", is_link)
            return
        self.seen[real] = relative
        if "/" not in relative:  # a class folder, kept even if it holds no videos
            self.videos.setdefault(relative, [])
        self._walk(relative, real)

    def _add_video(self, relative: str, real: str, is_link: bool = False) -> None:
        if real in self.seen:
            self._skip(relative, real, f"alias of {self.seen[real]}, already indexed", is_link)
            return
        self.seen[real] = relative
        self.videos[relative.split("/", 1)[0]].append(relative)

    def _walk(self, relative: str, real: str) -> None:
        for entry in self._entries(self.root / relative):
            child, child_real = f"{relative}/{entry.name}", os.path.join(real, entry.name)
            if entry.is_symlink():
                self.pending_links.append(child)
            elif entry.is_dir(follow_symlinks=False):
                self._add_folder(child, child_real)
            elif is_video_name(entry.name):
                self._add_video(child, child_real)

    def _resolve_link(self, relative: str) -> None:
        path = self.root / relative
        try:
            real = os.path.realpath(path, strict=True)
        except OSError as error:
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            self._skip(relative, target, f"broken link ({error.strerror or error})")
            return
        if _is_within(self.root_real, real):
            self._skip(relative, real, "loops back to the data root (its target contains the data root)")
            return
        if _is_within(os.path.realpath(path.parent), real):
            self._skip(relative, real, "loops back to a folder that contains the link")
            return
        if real in self.seen:
            self._skip(relative, real, f"alias of {self.seen[real]}, already indexed")
            return
        if os.path.isdir(real):
            self._add_folder(relative, real, is_link=True)
        elif "/" in relative and is_video_name(relative.rsplit("/", 1)[-1]) and os.path.isfile(real):
            self._add_video(relative, real, is_link=True)
        # Links to other files (notes, videos loose in the data root) are ignored like real files of that kind.


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
    """Classes and videos of a class-folder tree, plus the fold's split lists when ucfTrainTestlist exists.

    Class ids follow classInd.txt when present, else the sorted class folder names, empty folders included, so a
    class losing its videos never renumbers the others (`empty_classes` names such classes). Symlinks are followed
    only when they reach something not already indexed; aliases and loops are skipped and listed in `skipped_links`
    (see _ClassTreeWalk).
    """
    if fold not in FOLDS:
        raise DatasetError(f"fold must be one of {FOLDS}, got {fold}")
    if not root.exists():
        raise DatasetError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"data path is not a folder: {root}")
    walk = _ClassTreeWalk(root)
    walk.run()
    videos_by_folder = {folder: sorted(videos, key=_walk_order) for folder, videos in sorted(walk.videos.items())}
    if not any(videos_by_folder.values()):
        raise DatasetError(f"no class folders with videos ({', '.join(VIDEO_EXTENSIONS)}) in data path: {root}")

    split_list_dir = find_split_list_dir(root)
    class_index_file = split_list_dir / "classInd.txt" if split_list_dir else None
    if class_index_file is not None and class_index_file.is_file():
        class_names = _read_class_index(class_index_file)
    else:
        # Empty folders count: dropping one would renumber every later class and silently break old checkpoints.
        class_names = sorted(videos_by_folder)
    # UCF-101 mixes case between classInd and folders (HandstandPushups vs HandStandPushups), so match lower-case.
    label_of = {name.lower(): label for label, name in enumerate(class_names)}
    listing = FolderListing(root=root, class_names=class_names, videos=[], split_list_dir=split_list_dir)
    listing.skipped_links = walk.skipped
    for folder, videos in videos_by_folder.items():
        label = label_of.get(folder.lower())
        if label is None:
            if videos:
                listing.ignored_folders.append(folder)
            continue
        listing.videos.extend((relative_path, label) for relative_path in videos)
    with_videos = {label for _, label in listing.videos}
    listing.empty_classes = [name for label, name in enumerate(class_names) if label not in with_videos]

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
