"""What a sample.py run generates: each video's class (--classes, a preset's draw, or every class) or prompt
(--prompt, --prompts), the id its noise is drawn by, its given content frame, and its file name."""
from __future__ import annotations

import argparse
import difflib
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from datasets.transforms import load_image
from sampling.generation import dataset_labels, real_content_frames
from sampling.settings import DATASET_CLASSES, resolve_settings


class VideoRequests(NamedTuple):
    """Video i shows labels[i] (-1 when prompted) or captions[i] (None for classes), draws its noise by
    noise_ids[i] and animates content_frames[i] where those are given (None: the content denoiser samples them)."""
    labels: list
    captions: Optional[list]
    noise_ids: list
    content_frames: Optional[torch.Tensor]


def choose_videos(args, models, device) -> VideoRequests:
    """The classes or prompts of every video, from the flags and what the loaded models are conditioned on."""
    prompts = prompt_list(args)
    check_conditioning(args, models, prompts)
    if prompts:
        captions = [prompts[i % len(prompts)] for i in range(args.num_videos)]
        labels, noise_ids = [-1] * args.num_videos, prompt_noise_ids(prompts, args.num_videos)
    else:
        motion_cfg = models.motion.cfg
        labels = class_list(args, models.num_classes, motion_cfg.data, int(motion_cfg.train.global_seed))
        captions, noise_ids = None, list(range(args.num_videos))
    return VideoRequests(labels, captions, noise_ids, given_content_frames(args, models, labels, device))


def check_conditioning(args, models, prompts: list) -> None:
    """Prompts go to caption-conditioned models and classes to class-conditional ones."""
    if models.text is not None and not prompts:
        raise ValueError(f"{args.motion_ckpt} is conditioned on captions: pass --prompt or --prompts")
    if prompts and models.text is None:
        raise ValueError(f"--prompt/--prompts: {args.motion_ckpt} is class-conditional; pass --classes instead")
    if prompts and (args.classes or args.real_content):
        raise ValueError(f"{'--classes' if args.classes else '--real-content (real clips of each video class)'} "
                         f"needs classes; the prompts give the videos' captions instead")


def batch_conditioning(models, request: VideoRequests, batch: list, device) -> torch.Tensor:
    """The condition y of the videos `batch` indexes: their labels, or their captions encoded."""
    if request.captions is None:
        return torch.tensor([request.labels[i] for i in batch], device=device)
    return models.encode_prompts([request.captions[i] for i in batch])


def video_names(request: VideoRequests, batch: list) -> list:
    """The mp4 names of the videos `batch` indexes: the index and the class, or the index and the prompt's words."""
    if request.captions is None:
        return [f"{i:06d}_class{request.labels[i]:03d}.mp4" for i in batch]
    return [f"{i:06d}_{prompt_slug(request.captions[i])}.mp4" for i in batch]


def given_content_frames(args, models, labels: list, device):
    """(N, C, H, W) content frames of every video when the flags give them (--content-frame for all, --real-content),
    else None: the content denoiser samples them."""
    if args.content_frame:
        image = load_image(args.content_frame, models.ae_cfg.data.resolution, models.ae.clip_shape[0])
        return models.ae.encode_content(image.to(device)).expand(len(labels), -1, -1, -1)
    if args.real_content:
        cfg = models.motion.cfg
        return real_content_frames(models.ae, cfg.data, int(cfg.train.global_seed), labels, device)
    return None


# ---- classes ----------------------------------------------------------------------------------------------------
def class_choice(text: str):
    """'3', '0,2,5', 'ApplyEyeMakeup,Biking' or 'dataset' -> [3], [0, 2, 5], ['ApplyEyeMakeup', 'Biking'], 'dataset'.

    Ids are checked against the models and names looked up in the motion run's dataset once those are loaded; an
    entry of digits alone is an id.
    """
    if text.strip() == DATASET_CLASSES:
        return DATASET_CLASSES
    choices = []
    for part in text.split(","):
        part = part.strip()
        if part.isdigit():
            choices.append(int(part))
        elif not part or re.fullmatch(r"[-+]\d+", part):
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not a class id (a whole number >= 0) nor a "
                                             f"class name")
        elif part == DATASET_CLASSES:
            raise argparse.ArgumentTypeError(f"{text!r}: 'dataset' draws every label by the dataset's class "
                                             f"frequencies; give it alone")
        else:
            choices.append(part)
    return choices


def labels_by_frequency(labels: np.ndarray, num_videos: int, seed: int) -> list:
    """`num_videos` labels drawn with replacement from the training labels, i.e. by class frequency, as StyleGAN-V's
    metrics and NVlabs/CMD's evaluation draw them; a function of `seed` alone, so every rank draws the same."""
    picks = np.random.default_rng(seed).integers(0, len(labels), size=num_videos)
    return labels[picks].tolist()


def resolve_class_name(name: str, class_names: list, where: str) -> int:
    """A class name -> its 0-based id; exact first, then case-insensitive (UCF-101 itself mixes case:
    HandstandPushups in classInd.txt, HandStandPushups on disk)."""
    if name in class_names:
        return class_names.index(name)
    folded = [known.lower() for known in class_names]
    if name.lower() in folded:
        return folded.index(name.lower())
    close = difflib.get_close_matches(name, class_names, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(close)}?"
    else:
        hint = f"its classes are {', '.join(class_names[:4])}{', ...' if len(class_names) > 4 else ''}"
    raise ValueError(f"--classes: {name!r} is not a class of {where}; {hint} "
                     f"({len(class_names)} classes, ids 0..{len(class_names) - 1})")


def class_list(args, num_classes: int, data_cfg=None, seed: int = 0) -> list:
    """The label of every video: --classes round-robin (ids, or names of the motion run's dataset classes), drawn
    by the training split's class frequencies (--classes dataset, or a preset that draws so), or every class
    round-robin (the default)."""
    chosen = resolve_settings(args).classes
    dataset = None
    if chosen == DATASET_CLASSES or any(isinstance(c, str) for c in chosen or []):
        dataset = classes_dataset(data_cfg, seed)
        if dataset.num_classes != num_classes:
            raise ValueError(f"--classes {chosen if isinstance(chosen, str) else 'names'}: the motion run's "
                             f"dataset has {dataset.num_classes} classes but the models know {num_classes}")
    if chosen == DATASET_CLASSES:
        return labels_by_frequency(dataset_labels(dataset), args.num_videos, args.seed)
    if chosen:
        where = f"the motion run's {data_cfg.dataset_name} dataset"
        classes = [c if isinstance(c, int) else resolve_class_name(c, list(dataset.class_names), where)
                   for c in chosen]
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes: class id {bad[0]} is out of range; the models know classes "
                             f"0..{num_classes - 1}")
    else:
        classes = list(range(num_classes))
    return [classes[i % len(classes)] for i in range(args.num_videos)]


def classes_dataset(data_cfg, seed: int):
    """The motion run's training split (data.split): its class names and, for --classes dataset, its labels."""
    from datasets import build_dataset

    try:
        return build_dataset(data_cfg, split=data_cfg.split, seed=seed)
    except ValueError as exc:  # DatasetError: e.g. the data path of the training machine is not here
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--classes: class names and frequencies come from the motion run's training data, which "
                         f"cannot be read here ({message})") from None


# ---- prompts ----------------------------------------------------------------------------------------------------
def prompt_list(args) -> list:
    """The prompts of --prompt (in order) and --prompts FILE (one per line; blank lines and '#' lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--prompts {path}: cannot be read ({type(exc).__name__})") from None
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"--prompts {path}: holds no prompt")
    return prompts


def prompt_slug(prompt: str, limit: int = 60) -> str:
    """A prompt as a file-name part: lower-case words joined by '-' ('A red disc!' -> 'a-red-disc')."""
    return "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:limit].strip("-") or "prompt"


def prompt_noise_ids(prompts: list, num_videos: int) -> list:
    """Video i shows prompts[i % P]; its noise is keyed by (prompt, k), k = how many videos of that prompt come
    before it, so a prompt's k-th video is the same in any prompt list, batch or rank."""
    seen = Counter()
    ids = []
    for i in range(num_videos):
        prompt = prompts[i % len(prompts)]
        ids.append((zlib.crc32(prompt.encode()) << 20) + seen[prompt])  # distinct for 2 ** 20 videos per prompt
        seen[prompt] += 1
    return ids
