"""Class-folder video dataset (UCF-101 and any folder of .avi/.mp4/.mkv/.webm/.mov): random clips decoded with PyAV."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import video_decode
from datasets.errors import DatasetError, VideoReadError
from datasets.transforms import frames_to_clip, parse_resolution
from datasets.video_index import SPLITS, list_video_folder, probe_videos

logger = logging.getLogger(__name__)

# How many following items __getitem__ tries when a file fails to decode, before giving up.
MAX_REPLACEMENT_TRIES = 64


@dataclass(frozen=True)
class VideoEntry:
    path: Path
    label: int
    num_frames: int


def split_index_and_epoch(key: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """Accept an int index (epoch 0) or an (index, epoch) pair from an epoch-aware sampler."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise ValueError(f"dataset key must be an index or (index, epoch), got {key!r}")
        return int(key[0]), int(key[1])
    return int(key), 0


class VideoFolderDataset(Dataset):
    """Clips of `n_frames` frames, `frame_stride` apart, from a random start that depends only on (seed, epoch, index).

    Item: dict(x=float (3, T, H, W) in [-1, 1], y=int label, index=int of the video the clip came from).
    """

    def __init__(
        self,
        data_path: str,
        split: str = "train",
        fold: int = 1,
        resolution: Sequence[int] = (64, 64),
        n_frames: int = 16,
        frame_stride: int = 1,
        seed: int = 0,
        index_cache_dir: Optional[str] = None,
        name: str = "folder",
    ):
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
        if n_frames < 1 or frame_stride < 1:
            raise DatasetError(f"n_frames and frame_stride must be >= 1, got {n_frames} and {frame_stride}")
        if not data_path:
            raise DatasetError(f"data.data_path is required for dataset {name!r}")
        self.name = name
        self.root = Path(data_path).expanduser()
        self.split = split
        self.fold = fold
        self.resolution = parse_resolution(resolution)
        self.n_frames = n_frames
        self.frame_stride = frame_stride
        self.clip_span = (n_frames - 1) * frame_stride + 1  # frames from first to last used frame
        self.seed = seed
        self.index_cache_dir = index_cache_dir
        self.skipped: List[Tuple[str, str]] = []  # (path, reason) for every file left out or replaced
        self._failed_indices: Dict[int, str] = {}

        candidates = self._list_candidates()
        paths = [candidate[0] for candidate in candidates]
        results, self.index_stats = probe_videos(self.root, paths, index_cache_dir)
        self._probe_results = results

        self.entries: List[VideoEntry] = []
        for candidate in candidates:
            relative_path = candidate[0]
            result = results[relative_path]
            if result.error is not None:
                self._skip(relative_path, f"unreadable: {result.error}")
            elif result.num_frames < self.clip_span:
                self._skip(relative_path, f"too short: {result.num_frames} frames, a clip needs {self.clip_span}")
            else:
                self.entries.append(self._make_entry(candidate, result.num_frames))
        self._after_indexing()
        if not self.entries:
            first = f"; first skip: {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            raise DatasetError(
                f"no usable videos for split {split!r} in {self.root} "
                f"({len(candidates)} found, {len(self.skipped)} skipped{first})"
            )
        logger.info(
            "%s %s split (%s): %d videos, %d classes, %d skipped; index: %d probed, %d from cache %s",
            self.name, split, self.split_source, len(self.entries), self.num_classes, len(self.skipped),
            self.index_stats["probed"], self.index_stats["reused"], self.index_stats["cache_file"],
        )

    # Hooks a subclass with another listing (datasets.captions) overrides; probing, skipping and loading are shared.

    def _list_candidates(self) -> List[Tuple]:
        """(path relative to root, label, ...) of every video of this split; sets class_names and num_classes."""
        self.listing = list_video_folder(self.root, self.fold)
        self.class_names = list(self.listing.class_names)
        self.num_classes = len(self.class_names)
        self.split_source = self._describe_split_source()
        return self.listing.videos_of_split(self.split)

    def _make_entry(self, candidate: Tuple, num_frames: int) -> VideoEntry:
        relative_path, label = candidate
        return VideoEntry(self.root / relative_path, label, num_frames)

    def _after_indexing(self) -> None:
        """Skips and warnings that need no probe: listed files not on disk, ignored folders, empty classes."""
        for listed, list_file in self.listing.missing_listed:
            if list_file.startswith(self.split):
                self._skip(listed, f"listed in {list_file} but not found")
        if self.listing.ignored_folders:
            logger.warning("%s: folders without a classInd.txt entry ignored: %s", self.root,
                           self.listing.ignored_folders)
        if self.listing.empty_classes:
            # Their labels stay reserved (num_classes counts them) so the other classes keep their ids.
            logger.warning(
                "%s: classes with no videos (label kept, nothing to train on): %s",
                self.root, self.listing.empty_classes,
            )

    def _item(self, index: int, clip: torch.Tensor) -> dict:
        return {"x": clip, "y": self.entries[index].label, "index": index}

    def _describe_split_source(self) -> str:
        listing = self.listing
        if self.split == "all":
            return "all videos"
        if self.split in listing.split_videos:
            return f"{listing.split_list_dir / f'{self.split}list0{self.fold}.txt'}"
        # Without split lists a held-out set does not exist; train and test both see everything.
        logger.warning(
            "%s: no %slist0%d.txt found (looked for ucfTrainTestlist in and beside the data path); "
            "split %r uses all videos",
            self.root, self.split, self.fold, self.split,
        )
        return "all videos (no split list found)"

    def _skip(self, path: str, reason: str) -> None:
        self.skipped.append((str(path), reason))
        logger.warning("skipping %s: %s", path, reason)

    def __len__(self) -> int:
        return len(self.entries)

    def clip_start(self, index: int, epoch: int) -> int:
        """First frame of the clip for (seed, epoch, index): the same on every worker, rank and restart."""
        entry = self.entries[index]
        generator = np.random.default_rng([self.seed, epoch, index])
        return int(generator.integers(0, entry.num_frames - self.clip_span + 1))

    def clip_frame_indices(self, index: int, epoch: int) -> List[int]:
        start = self.clip_start(index, epoch)
        return list(range(start, start + self.clip_span, self.frame_stride))

    def _load(self, index: int, epoch: int) -> torch.Tensor:
        frames = video_decode.decode_frames(str(self.entries[index].path), self.clip_frame_indices(index, epoch))
        return frames_to_clip(frames, self.resolution)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> dict:
        index, epoch = split_index_and_epoch(key)
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for {len(self.entries)} videos")
        # A file that broke after indexing is replaced by the next one, so a long run never dies on one file.
        for attempt in range(min(MAX_REPLACEMENT_TRIES, len(self.entries))):
            current = (index + attempt) % len(self.entries)
            if current in self._failed_indices:
                continue
            try:
                clip = self._load(current, epoch)
            except VideoReadError as error:
                self._failed_indices[current] = str(error)
                self._skip(str(self.entries[current].path),
                           f"failed after indexing, replaced by another video: {error}")
                continue
            return self._item(current, clip)
        raise DatasetError(f"{MAX_REPLACEMENT_TRIES} videos in a row failed to decode from index {index} "
                           f"in {self.root}")

    def _skipped_lines(self) -> List[str]:
        """The summary's account of the skipped files: their count by reason, then the first ten."""
        lines = [f"skipped: {len(self.skipped)}"]
        reasons = Counter(reason.split(":")[0] for _, reason in self.skipped)
        lines += [f"  {count:6d} {reason}" for reason, count in reasons.most_common()]
        lines += [f"    {path}: {reason}" for path, reason in self.skipped[:10]]
        if len(self.skipped) > 10:
            lines.append(f"    ... {len(self.skipped) - 10} more")
        return lines

    def summary(self) -> str:
        listing = self.listing
        lines = [
            f"dataset: {self.name}  path: {self.root}",
            f"split lists: {listing.split_list_dir or 'none found (train/test use all videos)'}  fold: {self.fold}",
            f"classes: {self.num_classes} ({', '.join(self.class_names[:5])}{', ...' if self.num_classes > 5 else ''})",
            f"clips: {self.n_frames} frames, stride {self.frame_stride}, "
            f"resolution {self.resolution[0]}x{self.resolution[1]}",
        ]
        # Other splits are reported from the index cache (the CLI indexes split "all", so it sees everything).
        others = [path for path, _ in listing.videos if path not in self._probe_results]
        cached, _ = probe_videos(self.root, others, self.index_cache_dir, cached_only=True) if others else ({}, None)
        results = {**cached, **self._probe_results}
        for split in SPLITS:
            videos = listing.videos_of_split(split)
            known = [results.get(path) for path, _ in videos]
            usable = sum(
                1 for result in known
                if result is not None and result.error is None and result.num_frames >= self.clip_span
            )
            probed = sum(1 for result in known if result is not None)
            state = (f"{usable} usable of {probed} indexed"
                     + ("" if probed == len(videos) else " (rest not indexed yet)"))
            source = "split list" if split in listing.split_videos else "all videos"
            marker = "  <- this dataset" if split == self.split else ""
            lines.append(f"  {split:5s}: {len(videos):6d} videos ({source}), {state}{marker}")
        lines.append(f"this split: {len(self.entries)} videos")
        lines += self._skipped_lines()
        if listing.empty_classes:
            lines.append(f"classes with no videos: {', '.join(listing.empty_classes)}")
        if listing.skipped_links:
            lines.append(f"symlinks skipped (aliases, loops, broken): {len(listing.skipped_links)}")
            for path, reason in listing.skipped_links[:10]:
                lines.append(f"    {path}: {reason}")
        lines.append(f"index cache: {self.index_stats['cache_file']}")
        return "\n".join(lines)
