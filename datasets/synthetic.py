"""Built-in "moving shapes" dataset: class = shape of the main object x its direction of motion, drawn with numpy.
Each clip also has a caption ("a red disc moving left") for text-to-video runs."""
from __future__ import annotations

import colorsys
import math
import re
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.errors import DatasetError
from datasets.transforms import parse_resolution
from datasets.video_folder import split_index_and_epoch

SHAPES = ("square", "disc", "triangle")
DIRECTIONS = ("right", "left", "down", "up")
# Unit (dy, dx) per direction, in image coordinates (y grows downwards).
DIRECTION_VECTORS = {"right": (0.0, 1.0), "left": (0.0, -1.0), "down": (1.0, 0.0), "up": (-1.0, 0.0)}
MAX_CLASSES = len(SHAPES) * len(DIRECTIONS)
# Each split draws from its own seed stream, so held-out clips never repeat training clips.
SPLIT_STREAMS = {"train": 0, "all": 0, "test": 1}
# Hue names, one per sixth of the hue circle, centred on the HSV primaries and secondaries (hue 0 = red).
COLOR_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")
# Last key of the rng that decides whether a caption names the colour: a stream apart from the pixels' one.
CAPTION_STREAM = 1


def class_name(label: int) -> str:
    return f"{SHAPES[label % len(SHAPES)]}-{DIRECTIONS[label // len(SHAPES)]}"


def caption_for_label(label: int) -> str:
    """Colour-free caption of a class, e.g. "a disc moving left" (prompts for sampling)."""
    if not 0 <= int(label) < MAX_CLASSES:
        raise ValueError(f"label must be in 0..{MAX_CLASSES - 1}, got {label}")
    return f"a {SHAPES[label % len(SHAPES)]} moving {DIRECTIONS[label // len(SHAPES)]}"


def label_from_caption(caption: str) -> Optional[int]:
    """Class label from the one shape word and the one direction word of a caption (whole words, any case);
    None when either is missing or more than one is named."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    shapes = [index for index, shape in enumerate(SHAPES) if shape in words]
    directions = [index for index, direction in enumerate(DIRECTIONS) if direction in words]
    if len(shapes) != 1 or len(directions) != 1:
        return None
    return directions[0] * len(SHAPES) + shapes[0]


def color_name(rgb: Sequence[float]) -> str:
    """Name of the hue bin of an RGB colour in [0, 1] (one of COLOR_NAMES)."""
    hue = colorsys.rgb_to_hsv(*(float(value) for value in rgb))[0]  # [0, 1)
    return COLOR_NAMES[int(math.floor(hue * 6 + 0.5)) % 6]


def _bounce(start: np.ndarray, velocity: np.ndarray, low: float, high: float, times: np.ndarray) -> np.ndarray:
    """Positions over time of a point moving at constant velocity and reflecting off [low, high]."""
    length = high - low
    if length <= 0:
        return np.full((times.shape[0],) + np.shape(start), (low + high) / 2)
    unfolded = start - low + np.multiply.outer(times, velocity)
    folded = np.mod(unfolded, 2 * length)
    return low + length - np.abs(length - folded)  # triangle wave: out and back between the walls


def shape_coverage(kind: str, center_y: np.ndarray, center_x: np.ndarray, radius: float,
                   height: int, width: int) -> np.ndarray:
    """Per-frame pixel coverage in [0, 1] (T, H, W) of a shape of half-size `radius`,
    edges anti-aliased over one pixel."""
    center_y = np.asarray(center_y, dtype=np.float32)
    center_x = np.asarray(center_x, dtype=np.float32)
    radius = np.float32(radius)
    dy = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None] - center_y[:, None, None]  # (T, H, 1)
    dx = (np.arange(width, dtype=np.float32) + 0.5)[None, None, :] - center_x[:, None, None]  # (T, 1, W)
    if kind == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy)) - radius
    elif kind == "disc":
        distance = np.sqrt(dx * dx + dy * dy) - radius
    elif kind == "triangle":
        # Apex up at (cy - r), base from cx - r to cx + r at cy + r: half the area of the square.
        distance = np.maximum(dy - radius, (2 * np.abs(dx) - dy - radius) * np.float32(1 / math.sqrt(5.0)))
    else:
        raise ValueError(f"unknown shape {kind!r}; choices: {SHAPES}")
    return np.clip(0.5 - distance, 0.0, 1.0)


def _bright_color(rng: np.random.Generator) -> np.ndarray:
    """A saturated, light colour, so objects stand out from the darker background."""
    hue = rng.uniform(0, 6)
    saturation = rng.uniform(0.6, 1.0)
    value = rng.uniform(0.8, 1.0)
    ramp = np.clip(np.abs(np.mod(hue + np.array([0.0, 4.0, 2.0]), 6) - 3) - 1, 0, 1)  # HSV -> RGB hue ramp
    return (value * (1 - saturation + saturation * ramp)).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Static dark texture (H, W, 3): a base colour plus two random sinusoidal gratings."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    image = np.broadcast_to(rng.uniform(0.1, 0.4, size=3).astype(np.float32), (height, width, 3)).copy()
    for _ in range(2):
        angle = rng.uniform(0, math.pi)
        frequency = rng.uniform(1.0, 4.0) * 2 * math.pi
        grating = np.sin(frequency * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 2 * math.pi))
        image += grating[..., None] * rng.uniform(0.02, 0.07, size=3).astype(np.float32)
    return image


def render_moving_shapes(
    label: int, rng: np.random.Generator, n_frames: int, height: int, width: int, max_distractors: int = 2
) -> np.ndarray:
    """One clip as float32 (3, T, H, W) in [0, 1]; the main (largest, topmost) object encodes the label."""
    return render_moving_shapes_with_color(label, rng, n_frames, height, width, max_distractors)[0]


def render_moving_shapes_with_color(
    label: int, rng: np.random.Generator, n_frames: int, height: int, width: int, max_distractors: int = 2
) -> Tuple[np.ndarray, np.ndarray]:
    """render_moving_shapes plus the main object's RGB colour (3,) in [0, 1]; the same draws from `rng`.

    How many values are drawn does not depend on height, width or n_frames, so the colour of a clip is the same
    at every resolution and length (SyntheticMovingShapes.caption_of renders a tiny clip to find it).
    """
    kind = SHAPES[label % len(SHAPES)]
    direction_y, direction_x = DIRECTION_VECTORS[DIRECTIONS[label // len(SHAPES)]]
    times = np.arange(n_frames, dtype=np.float32)
    smaller_side = min(height, width)
    # Channels first throughout, so the result needs no transpose before becoming a (C, T, H, W) tensor.
    background = _background(rng, height, width).transpose(2, 0, 1)[:, None]  # (3, 1, H, W)
    video = np.broadcast_to(background, (3, n_frames, height, width)).copy()

    for _ in range(int(rng.integers(0, max_distractors + 1))):
        radius = max(1.0, smaller_side * rng.uniform(0.06, 0.11))
        position = rng.uniform([radius, radius], [height - radius, width - radius])
        velocity = rng.normal(size=2) * smaller_side / 24
        path_y = _bounce(position[0], velocity[0], radius, height - radius, times)
        path_x = _bounce(position[1], velocity[1], radius, width - radius, times)
        coverage = shape_coverage(SHAPES[int(rng.integers(0, len(SHAPES)))], path_y, path_x, radius, height, width)
        video += coverage[None] * (_bright_color(rng)[:, None, None, None] - video)

    # The main object crosses 35-60% of the free range in the class direction during the clip, starting on the
    # far side, so its motion is never undone by a bounce; across the motion it drifts slowly and bounces.
    radius = max(1.5, smaller_side * rng.uniform(0.14, 0.2))
    low = np.array([radius, radius])
    high = np.array([max(radius, height - radius), max(radius, width - radius)])
    free = high - low
    direction = np.array([direction_y, direction_x])
    along = np.abs(direction)
    travel = rng.uniform(0.35, 0.6) * free
    offset_along = rng.uniform(0, 1 - 0.6, size=2) * free
    start_along = np.where(direction >= 0, low + offset_along, high - offset_along)
    start_across = rng.uniform(low, high)
    start = np.where(along > 0, start_along, start_across)
    steps = max(n_frames - 1, 1)
    velocity = np.where(along > 0, direction * travel / steps, rng.uniform(-0.15, 0.15, size=2) * free / steps)
    path_y = _bounce(start[0], velocity[0], low[0], high[0], times)
    path_x = _bounce(start[1], velocity[1], low[1], high[1], times)
    coverage = shape_coverage(kind, path_y, path_x, radius, height, width)
    main_color = _bright_color(rng)
    video += coverage[None] * (main_color[:, None, None, None] - video)
    return np.clip(video, 0.0, 1.0), main_color


class SyntheticMovingShapes(Dataset):
    """`size` clips; clip i has label i % num_classes and depends only on (seed, split, i).

    Item: dict(x=float (3, T, H, W) in [-1, 1], y=int label, index=int, caption=str). The epoch is accepted (an
    (index, epoch) key) for interface parity with video datasets but does not change the clip: a fixed set.
    Caption: "a {shape} moving {direction}", half of them (by a separate rng stream, so pixels do not depend on it)
    with the main object's colour named: "a {color} {shape} moving {direction}".
    """

    def __init__(
        self,
        size: int = 4096,
        num_classes: Union[int, None] = None,
        resolution: Sequence[int] = (64, 64),
        n_frames: int = 16,
        split: str = "train",
        seed: int = 0,
        max_distractors: int = 2,
    ):
        num_classes = MAX_CLASSES if num_classes is None else int(num_classes)
        if not 1 <= num_classes <= MAX_CLASSES:
            raise DatasetError(f"data.num_classes must be in 1..{MAX_CLASSES} for the synthetic dataset, "
                               f"got {num_classes}")
        if split not in SPLIT_STREAMS:
            raise DatasetError(f"split must be one of {tuple(SPLIT_STREAMS)}, got {split!r}")
        if size < 1 or n_frames < 1:
            raise DatasetError(f"data.synthetic_size and data.n_frames must be >= 1, got {size} and {n_frames}")
        self.size = int(size)
        self.num_classes = num_classes
        self.class_names = [class_name(label) for label in range(num_classes)]
        self.resolution: Tuple[int, int] = parse_resolution(resolution)
        self.n_frames = int(n_frames)
        self.split = split
        self.seed = int(seed)
        self.max_distractors = int(max_distractors)

    def __len__(self) -> int:
        return self.size

    def label_of(self, index: int) -> int:
        return index % self.num_classes

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic clips")

    def _render(self, index: int, n_frames: int, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, SPLIT_STREAMS[self.split], index])
        return render_moving_shapes_with_color(self.label_of(index), rng, n_frames, height, width, self.max_distractors)

    def _caption(self, index: int, main_color: np.ndarray) -> str:
        caption = caption_for_label(self.label_of(index))
        caption_rng = np.random.default_rng([self.seed, SPLIT_STREAMS[self.split], index, CAPTION_STREAM])
        if caption_rng.random() < 0.5:
            caption = f"a {color_name(main_color)} {caption[2:]}"
        return caption

    def caption_of(self, index: int) -> str:
        """The caption of clip `index`, from a 4x4 one-frame render (the colour does not depend on the size)."""
        self._check_index(index)
        return self._caption(index, self._render(index, 1, 4, 4)[1])

    def __getitem__(self, key) -> dict:
        index, _ = split_index_and_epoch(key)
        self._check_index(index)
        height, width = self.resolution
        clip, main_color = self._render(index, self.n_frames, height, width)  # (3, T, H, W)
        clip *= 2.0
        clip -= 1.0
        caption = self._caption(index, main_color)
        return {"x": torch.from_numpy(clip), "y": self.label_of(index), "index": index, "caption": caption}

    def summary(self) -> str:
        return "\n".join(
            [
                f"dataset: synthetic moving shapes  split: {self.split} (seed stream {SPLIT_STREAMS[self.split]})",
                f"clips: {self.size}, {self.n_frames} frames, resolution {self.resolution[0]}x{self.resolution[1]}",
                f"classes: {self.num_classes} ({', '.join(self.class_names)})",
                "captions: 'a [colour] {shape} moving {direction}', colour named in half of them",
                "skipped: 0",
            ]
        )
