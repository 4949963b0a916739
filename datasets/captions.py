"""Captioned videos for text-to-video (the WebVid layout): a folder of videos plus a CSV or JSONL captions file.

Captions file: CSV with a header row (.csv) or JSON lines, one object per line (.jsonl / .json), with the columns
`path` + `caption`, or WebVid's `videoid` + `page_dir` + `name` (path "{page_dir}/{videoid}.mp4", caption = name).
An optional `split` column says train or test ("val" and "validation" mean test). Without it the held-out test split
is the rows whose path (as written in the file) has zlib.crc32(path) % 100 == 0, about 1%; train is the rest.
Relative paths resolve under data_path; absolute paths are used as they are.
"""
from __future__ import annotations

import csv
import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from datasets.errors import DatasetError
from datasets.video_folder import VideoEntry, VideoFolderDataset

CSV_EXTENSIONS = (".csv",)
JSONL_EXTENSIONS = (".jsonl", ".json")
SPLIT_VALUES = {"train": "train", "test": "test", "val": "test", "validation": "test"}
HASH_SPLIT_RULE = "no split column: test = rows with zlib.crc32(path) % 100 == 0, train = the rest"
SPLIT_COLUMN_RULE = "split column (val, validation = test)"


@dataclass(frozen=True)
class CaptionRow:
    path: str  # as written (WebVid: "{page_dir}/{videoid}.mp4"); relative to data_path unless absolute
    caption: str
    split: Optional[str]  # "train" / "test" from the split column; None without one
    line: int  # line of the captions file the row starts on


@dataclass(frozen=True)
class CaptionedEntry(VideoEntry):
    caption: str = ""


def hash_split(path: str) -> str:
    """The split of a row without a split column: a stable 1% of paths are held out for test."""
    return "test" if zlib.crc32(path.encode("utf-8")) % 100 == 0 else "train"


def row_split(row: CaptionRow) -> str:
    return row.split if row.split is not None else hash_split(row.path)


def select_split(rows: Sequence[CaptionRow], split: str) -> List[CaptionRow]:
    if split == "all":
        return list(rows)
    return [row for row in rows if row_split(row) == split]


def _csv_records(path: Path, reader) -> Iterator[Tuple[int, List[str]]]:
    """(first line, values) of each non-blank CSV record after the header.

    The reader is strict: an unterminated quote, which a lenient reader closes at the end of the file or at the
    next quote (taking the rows in between into its caption), is an error naming the row where it opened."""
    line = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise DatasetError(f"captions file {path}:{line}: not valid CSV from this row to line {reader.line_num} "
                               f"({error}; an unterminated quote?)") from None
        if any(value.strip() for value in values):
            yield line, values
        line = reader.line_num + 1


def _jsonl_records(path: Path, handle) -> Iterator[Tuple[int, dict]]:
    for line, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as error:
            raise DatasetError(f"captions file {path}:{line}: not valid JSON lines: {error}") from None
        if not isinstance(record, dict):
            kind = "a JSON array (write one object per line)" if isinstance(record, list) else type(record).__name__
            raise DatasetError(f"captions file {path}:{line}: expected one JSON object per line, got {kind}")
        yield line, {str(key).strip().lower(): value for key, value in record.items()}


def _layout(path: Path, columns) -> str:
    if {"path", "caption"} <= set(columns):
        return "path"
    if {"videoid", "page_dir", "name"} <= set(columns):
        return "webvid"
    raise DatasetError(
        f"captions file {path}: expected columns path, caption (or videoid, page_dir, name), "
        f"found {', '.join(columns) or 'none'}"
    )


def _text(path: Path, line: int, record: dict, key: str, numbers: bool = False) -> str:
    """The value of `key` as text (empty when missing or null). JSON lines may hold other types: a list or a boolean
    would become its Python repr and be trained on as a caption, so only strings (and for ids, numbers) are taken."""
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) and not (numbers and isinstance(value, (int, float)) and not isinstance(value, bool)):
        kind = type(value).__name__.replace("dict", "object").replace("list", "array")
        raise DatasetError(f"captions file {path}:{line}: '{key}' is a JSON {kind}, not a string")
    return str(value).strip()


def _row(path: Path, layout: str, line: int, record: dict, skipped: List[Tuple[str, str]]) -> Optional[CaptionRow]:
    if layout == "path":
        video, caption = _text(path, line, record, "path"), _text(path, line, record, "caption")
    else:
        videoid = _text(path, line, record, "videoid", numbers=True)
        page_dir = _text(path, line, record, "page_dir", numbers=True)
        video = f"{page_dir}/{videoid}.mp4" if videoid and page_dir else ""
        caption = _text(path, line, record, "name")
    split = None
    if "split" in record:
        split = SPLIT_VALUES.get(_text(path, line, record, "split").lower())
        if split is None:
            skipped.append((str(path), f"unknown split {_text(path, line, record, 'split')!r}: line {line}"))
            return None
    if not video:
        skipped.append((str(path), f"no path: line {line}"))
    elif not caption:
        skipped.append((str(path), f"empty caption: line {line}"))
    else:
        return CaptionRow(video, caption, split, line)
    return None


def read_captions(path) -> Tuple[List[CaptionRow], List[Tuple[str, str]]]:
    """Rows of a captions file (see the module docstring) and the rows skipped: (file, "reason: line N").

    Rows without a path, with an empty caption or an unknown split value are skipped; a missing file, an unknown
    extension, text that is not UTF-8 CSV / JSON lines, or columns that are neither set raise a one-line DatasetError.
    The file is streamed, so WebVid's 10M-row CSV is never held as text.
    """
    path = Path(path).expanduser()
    extension = path.suffix.lower()
    if extension not in CSV_EXTENSIONS + JSONL_EXTENSIONS:
        raise DatasetError(
            f"captions file {path}: unknown extension {extension!r}; "
            f"expected {', '.join(CSV_EXTENSIONS + JSONL_EXTENSIONS)}"
        )
    rows: List[CaptionRow] = []
    skipped: List[Tuple[str, str]] = []
    reader = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if extension in CSV_EXTENSIONS:
                reader = csv.reader(handle, strict=True)
                header = next(reader, None)
                if header is None:
                    raise DatasetError(f"captions file {path} is empty (expected a CSV header row)")
                columns = [name.strip().lower() for name in header]
                layout = _layout(path, columns)
                records = ((line, dict(zip(columns, values))) for line, values in _csv_records(path, reader))
            else:
                layout, records = None, _jsonl_records(path, handle)
            for line, record in records:
                layout = layout or _layout(path, list(record))  # JSON lines: decided by the first object
                row = _row(path, layout, line, record, skipped)
                if row is not None:
                    rows.append(row)
    except FileNotFoundError:
        raise DatasetError(f"captions file not found: {path}") from None
    except csv.Error as error:
        raise DatasetError(f"captions file {path}:{reader.line_num}: not valid CSV: {error}") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"captions file {path} is not UTF-8 text: {error}") from None
    except OSError as error:
        raise DatasetError(f"captions file {path} cannot be read: {error}") from None
    return rows, skipped


class CaptionedVideoDataset(VideoFolderDataset):
    """Videos listed in a captions file, clipped like VideoFolderDataset (same probing, index cache, seeded starts,
    replacement of files that break after indexing).

    Item: dict(x=float (3, T, H, W) in [-1, 1], y=0 (one class, "video"), index=int, caption=str). Rows whose file
    is missing, unreadable or shorter than a clip are skipped and counted, like malformed rows of the captions file.
    Split: the file's split column, else a stable hash of the path (see the module docstring).
    """

    def __init__(
        self,
        data_path: str,
        captions: str,
        split: str = "train",
        resolution: Sequence[int] = (64, 64),
        n_frames: int = 16,
        frame_stride: int = 1,
        seed: int = 0,
        index_cache_dir: Optional[str] = None,
    ):
        if not captions:
            raise DatasetError("data.captions is required for dataset 'captions' (a CSV or JSONL of path, caption)")
        self.captions_path = Path(captions).expanduser()
        super().__init__(
            data_path, split=split, resolution=resolution, n_frames=n_frames, frame_stride=frame_stride, seed=seed,
            index_cache_dir=index_cache_dir, name="captions",
        )

    def _list_candidates(self) -> List[Tuple[str, int, str]]:
        if not self.root.is_dir():
            raise DatasetError(f"data path is not a folder: {self.root}")
        rows, skipped = read_captions(self.captions_path)
        for where, reason in skipped:
            self._skip(where, reason)
        self.class_names = ["video"]
        self.num_classes = 1
        self.split_source = SPLIT_COLUMN_RULE if any(row.split is not None for row in rows) else HASH_SPLIT_RULE
        self.rows_read = len(rows) + len(skipped)
        self.rows_per_split = Counter(row_split(row) for row in rows)
        return [(row.path, 0, row.caption) for row in select_split(rows, self.split)]

    def _make_entry(self, candidate: Tuple[str, int, str], num_frames: int) -> CaptionedEntry:
        relative_path, label, caption = candidate
        return CaptionedEntry(self.root / relative_path, label, num_frames, caption)

    def _after_indexing(self) -> None:
        pass

    def _item(self, index: int, clip) -> dict:
        return {**super()._item(index, clip), "caption": self.entries[index].caption}

    def caption_of(self, index: int) -> str:
        return self.entries[index].caption

    def summary(self) -> str:
        lines = [
            f"dataset: captions  path: {self.root}",
            f"captions: {self.captions_path}  ({self.rows_read} rows, {sum(self.rows_per_split.values())} usable rows)",
            f"split rule: {self.split_source}",
        ]
        for split in ("train", "test"):
            marker = "  <- this dataset" if split == self.split else ""
            lines.append(f"  {split:5s}: {self.rows_per_split.get(split, 0):6d} rows{marker}")
        lines += [
            f"clips: {self.n_frames} frames, stride {self.frame_stride}, "
            f"resolution {self.resolution[0]}x{self.resolution[1]}",
            f"this split ({self.split}): {len(self.entries)} usable videos",
            *self._skipped_lines(),
        ]
        lines.append(f"index cache: {self.index_stats['cache_file']}")
        return "\n".join(lines)
