"""PyAV video reading: frame counting for the index and seek-based decoding of just the frames a clip needs."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from datasets.errors import VideoReadError

# Errors PyAV and the OS raise for files that are missing, truncated or not video at all.
# They are turned into VideoReadError so one bad file never stops a whole run.
_READ_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError, RuntimeError)

# How many frames past the last decodable one a request may ask for and get the last frame again.
# Some encoders announce a frame or two they never write (or write empty "repeat" packets at the end);
# a truncated file loses far more than this, so it is still detected.
END_TOLERANCE_FRAMES = 2


@dataclass(frozen=True)
class VideoInfo:
    """What the index keeps per file."""

    num_frames: int
    fps: float


class _RgbConverter:
    """yuv -> rgb24 arrays through one reusable swscale context.

    frame.to_ndarray(format="rgb24") builds a new scaler per frame; reusing one is several times faster.
    """

    def __init__(self):
        self._reformatter = VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24").to_ndarray()


@dataclass
class _StreamTiming:
    start_pts: int
    frames_per_tick: Fraction  # time_base * fps: multiply (pts - start_pts) by it to get a frame index
    fps: Fraction


def _open(path: str):
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except _READ_ERRORS as error:
        raise VideoReadError(f"cannot open: {error}") from error
    if not container.streams.video:
        container.close()
        raise VideoReadError("no video stream")
    return container


def _timing(stream) -> _StreamTiming:
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not fps or fps <= 0 or stream.time_base is None:
        raise VideoReadError("no frame rate or time base")
    start_pts = stream.start_time if stream.start_time is not None else 0
    return _StreamTiming(start_pts=start_pts, frames_per_tick=Fraction(stream.time_base) * Fraction(fps),
                         fps=Fraction(fps))


def _header_count_is_trustworthy(stream, timing: _StreamTiming) -> bool:
    """stream.frames comes from the container header; believe it only when the duration agrees."""
    frames = stream.frames or 0
    if frames <= 0:
        return False
    if stream.duration is None:
        return True
    expected = float(stream.duration * timing.frames_per_tick)
    return abs(frames - expected) <= max(2.0, 0.05 * expected)


def count_frames_by_demuxing(path: str) -> int:
    """Number of non-empty video packets (one per frame): reads the file but decodes nothing."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except _READ_ERRORS as error:
        raise VideoReadError(f"demuxing failed: {error}") from error
    finally:
        container.close()


def probe_video(path: str) -> VideoInfo:
    """Frame count and rate of one file, checked by decoding its last frame (catches truncated files)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        timing = _timing(stream)
        trusted = _header_count_is_trustworthy(stream, timing)
        header_frames = stream.frames or 0
    except _READ_ERRORS as error:
        raise VideoReadError(f"cannot read stream header: {error}") from error
    finally:
        container.close()
    if trusted:
        num_frames, source = header_frames, "header"
    else:
        num_frames, source = count_frames_by_demuxing(path), "demux"
        if header_frames > num_frames + END_TOLERANCE_FRAMES:
            # The header was written for the complete file; fewer packets means the end is missing.
            raise VideoReadError(f"truncated: header says {header_frames} frames, the file holds {num_frames}")
    if num_frames <= 0:
        raise VideoReadError("no video frames")
    try:
        decode_frames(path, [num_frames - 1])
    except VideoReadError as error:
        raise VideoReadError(
            f"truncated or damaged: {source} says {num_frames} frames but the last one does not decode ({error})"
        ) from error
    return VideoInfo(num_frames=num_frames, fps=float(timing.fps))


def _decode_targets(path: str, targets: List[int], seek: bool) -> List[np.ndarray]:
    """One pass: optionally seek before targets[0], then decode until the last target.

    Frame indices come from presentation timestamps, so a seek that lands on any keyframe is
    fine as long as it is not after targets[0]. A target that falls in a timestamp gap
    (dropped / variable-rate frame) gets the frame on screen at that moment, i.e. the previous one.
    Raises _Overshoot when the seek landed after the first target, _NoTimestamps when frames carry no pts.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        timing = _timing(stream)
        if seek and targets[0] > 0:
            # One frame before the wanted one, so rounding of the timestamp can never land us after it.
            seek_pts = timing.start_pts + int((targets[0] - 1) / timing.frames_per_tick)
            container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
        to_rgb = _RgbConverter()
        outputs: List[Optional[np.ndarray]] = [None] * len(targets)
        next_target = 0
        previous_frame = None
        previous_index = -1
        previous_array = None
        for frame in container.decode(stream):
            if frame.pts is None:
                raise _NoTimestamps()
            index = round((frame.pts - timing.start_pts) * timing.frames_per_tick)
            while next_target < len(targets) and targets[next_target] <= index:
                if targets[next_target] == index or previous_frame is None:
                    if previous_frame is None and targets[next_target] < index and seek and targets[0] > 0:
                        raise _Overshoot()
                    outputs[next_target] = to_rgb(frame)
                else:
                    if previous_array is None:
                        previous_array = to_rgb(previous_frame)
                    outputs[next_target] = previous_array
                next_target += 1
            if next_target == len(targets):
                break
            previous_frame, previous_index, previous_array = frame, index, None
        else:
            # End of stream with targets left: allow a short run past the last frame, else the file is short.
            while next_target < len(targets):
                if previous_frame is None or targets[next_target] > previous_index + END_TOLERANCE_FRAMES:
                    raise VideoReadError(
                        f"frame {targets[next_target]} requested but the stream ends after frame {previous_index}"
                    )
                if previous_array is None:
                    previous_array = to_rgb(previous_frame)
                outputs[next_target] = previous_array
                next_target += 1
        return outputs
    except VideoReadError:
        raise
    except _READ_ERRORS as error:
        raise VideoReadError(f"decoding failed: {error}") from error
    finally:
        container.close()


class _Overshoot(Exception):
    """The seek landed on a keyframe after the first wanted frame."""


class _NoTimestamps(Exception):
    """Decoded frames have no pts, so frame indices must be counted from the start."""


def _decode_by_counting(path: str, targets: List[int]) -> List[np.ndarray]:
    """Slow fallback for streams without timestamps: decode from the start and count frames."""
    wanted = set(targets)
    found = {}
    to_rgb = _RgbConverter()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                found[index] = to_rgb(frame)
            if index >= targets[-1]:
                break
    except _READ_ERRORS as error:
        raise VideoReadError(f"decoding failed: {error}") from error
    finally:
        container.close()
    missing = [index for index in targets if index not in found]
    if missing:
        raise VideoReadError(f"frame {missing[0]} requested but the stream ends earlier")
    return [found[index] for index in targets]


def decode_frames(path: str, frame_indices: Sequence[int]) -> np.ndarray:
    """Frames `frame_indices` (sorted, >= 0) of `path` as uint8 (T, H, W, 3) RGB, decoding only that range."""
    targets = [int(index) for index in frame_indices]
    if not targets:
        raise ValueError("frame_indices is empty")
    if targets[0] < 0 or any(later < earlier for earlier, later in zip(targets, targets[1:])):
        raise ValueError(f"frame_indices must be sorted and non-negative, got {targets[:4]}...")
    try:
        try:
            frames = _decode_targets(path, targets, seek=True)
        except _Overshoot:
            frames = _decode_targets(path, targets, seek=False)
    except _NoTimestamps:
        frames = _decode_by_counting(path, targets)
    return np.stack(frames)


def decode_all_frames(path: str) -> np.ndarray:
    """Every frame of `path` as uint8 (N, H, W, 3) RGB: the slow reference the tests and benchmark compare to."""
    to_rgb = _RgbConverter()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        frames = [to_rgb(frame) for frame in container.decode(stream)]
    except _READ_ERRORS as error:
        raise VideoReadError(f"decoding failed: {error}") from error
    finally:
        container.close()
    if not frames:
        raise VideoReadError("no video frames")
    return np.stack(frames)
