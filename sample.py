"""Generates videos: class -> content frame (content DiT) -> motion latent (motion DiT) -> autoencoder decode.

    python sample.py --ae-ckpt AE.pt --content-ckpt CONTENT.pt --motion-ckpt MOTION.pt --num-videos 16 --out-dir out
    torchrun --nproc_per_node=8 sample.py ... --preset paper --num-videos 2048 --npz out/samples.npz  # FVD
    python sample.py --ae-ckpt AE.pt --motion-ckpt MOTION.pt --content-frame photo.png --classes 3   # image-to-video
    python sample.py --ae-ckpt AE.pt --motion-ckpt MOTION.pt --real-content --npz motion_only.npz  # motion-only
    torchrun --nproc_per_node=8 sample.py ... --preset paper --num-videos 10000 --no-mp4 --frames-dir out/frames
    python sample.py ... --prompt "a red disc moving left" --num-videos 4     # text-to-video (caption-conditioned)
"""
import argparse
import difflib
import re
import signal
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.transforms import load_image, to_uint8_videos
from diffusion import SAMPLERS
from core.cli import HelpFormatter, guidance_scale, positive_int, run_reporting_user_errors, seed_int
from core.distributed import all_gather_object, barrier, broadcast_object, cleanup_distributed, setup_distributed
from core.files import OutputError, os_reason, reported, write_output
from sampling.generation import (PRECISIONS, SAMPLING_PRESETS, SamplingOptions, compile_models, generate, load_models,
                                 dataset_labels, real_content_frames, set_precision)
from sampling.media import captioned_rows, save_video_set, write_mp4, write_png
from sampling.outputs import (CAPTIONS_GRID, GRID_FILES, check_outputs, claim_outputs, npz_path, remove,
                              removed_if_unfinished, write_frames)


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
            raise ValueError(f"--classes: class id {bad[0]} is out of range; the models know classes 0..{num_classes - 1}")
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


# ---- stop signals -----------------------------------------------------------------------------------------------
class StopSignal(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM arrived. A BaseException, like KeyboardInterrupt: `except Exception` blocks
    (write_mp4 has one) must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    def handler(signum, frame):
        # Later signals (a second Ctrl-C, torchrun's SIGTERM after the terminal's SIGINT) must not cut the cleanup
        # short; it only removes a few files.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise StopSignal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


# ---- sampling ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def main(args):
    if args.content_frame and args.real_content:
        raise ValueError("--content-frame and --real-content both give the content frames: choose one")
    if not (args.content_frame or args.real_content or args.content_ckpt):
        raise ValueError("--content-ckpt is required unless --content-frame gives the content frame")
    if args.no_mp4 and not (args.npz or args.frames_dir):
        raise ValueError("--no-mp4 would keep only the grid of a sampling run: pass --npz or --frames-dir to keep the videos")
    prompt_list(args)  # an unreadable or empty --prompts file stops here, before any model loads
    # Before setup_distributed: its rendezvous waits for every rank, so all ranks check before any can write.
    earlier = check_outputs(args)
    info = setup_distributed()
    claims, error = [], None
    if info.is_main:  # one claim per job: the ranks of this run share its outputs
        try:
            claims, earlier = claim_outputs(args)
        except OutputError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"--out-dir {args.out_dir}: cannot claim it ({os_reason(exc)})"
    error = broadcast_object(error)
    if error:
        raise OutputError(error)
    stop_on_signals()
    out_dir = Path(args.out_dir)
    written = []  # this rank's finished videos
    keep_shard = False
    try:
        sample_videos(args, info, earlier, written)
    except StopSignal as stop:
        # Every file in `written` is a whole video; the one being written when the signal came was removed.
        count = sum(path.exists() for path in written)
        total = len(range(info.rank, args.num_videos, info.world_size))
        rank = f"rank {info.rank}: " if info.world_size > 1 else ""
        print(f"{rank}stopped by {stop}: {count} of {total} videos written to {' and '.join(video_places(args))}; grid"
              f"{' and --npz' if args.npz else ''} files are written only by a finished run", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None
    except UnsavedVideos:
        keep_shard = True
        raise
    finally:
        if not keep_shard:  # rank 0 has read them all, or the run failed before they were complete
            (out_dir / f".shard-{info.rank:05d}.npz").unlink(missing_ok=True)
        for held in claims:
            held.release()
    cleanup_distributed()


class UnsavedVideos(OutputError):
    """The final outputs could not be written; the rank shards that hold the videos are kept and named."""


def check_finite_samples(models, indices: list, videos: torch.Tensor, contents: torch.Tensor) -> None:
    """Refuses a batch with a NaN or infinite value before any of it is written: converted to uint8 it would pass
    for a black video."""
    bad = [index for index, video, content in zip(indices, videos, contents)
           if not (bool(torch.isfinite(video).all()) and bool(torch.isfinite(content).all()))]
    if bad:
        scales = ", ".join(f"{stage} {denoiser.cfg_scale:g}" for stage, denoiser in
                           (("content", models.content), ("motion", models.motion)) if denoiser is not None)
        raise ValueError(f"sampling produced non-finite values (NaN or inf) in video{'s' * (len(bad) > 1)} "
                         f"{', '.join(map(str, bad[:4]))}{', ...' if len(bad) > 4 else ''}; nothing of "
                         f"{'them' if len(bad) > 1 else 'it'} was written (guidance scales: {scales})")


@dataclass(frozen=True)
class SampleSettings:
    """What a sample.py run samples with: --preset's settings, each replaced by its flag where one is given."""
    content: SamplingOptions
    motion: SamplingOptions
    precision: str  # one of PRECISIONS
    classes: object  # --classes' value: ids and names, DATASET_CLASSES, or None (every class round-robin)


def resolve_settings(args) -> SampleSettings:
    """The one place where --preset and the flags that override it become the settings a run samples with."""
    preset = SAMPLING_PRESETS[args.preset]

    def stage(name: str) -> SamplingOptions:
        chosen = preset[name]
        steps, sampler, scale = (getattr(args, f"{name}_{key}") for key in ("steps", "sampler", "cfg_scale"))
        return SamplingOptions(steps or chosen.steps, sampler or chosen.sampler,
                               chosen.cfg_scale if scale is None else scale)

    return SampleSettings(stage("content"), stage("motion"), args.precision or preset.precision or "auto",
                          preset.labels if args.classes is None else args.classes)


def stage_options(args, stage: str) -> SamplingOptions:
    """The `stage`'s sampler, steps and guidance: --<stage>-sampler/-steps/-cfg-scale where given, else --preset's
    (a guidance of None: the checkpoint's)."""
    return getattr(resolve_settings(args), stage)


def protocol_line(args, models, settings: SampleSettings, precision: tuple, prompts: list) -> str:
    """One line stating what this run samples with, for the record beside any number computed from its videos."""
    stages = [(name, denoiser) for name, denoiser in (("content", models.content), ("motion", models.motion))
              if denoiser is not None]
    parts = [f"{name} {d.sampler.method} {d.sampler.diffusion.num_timesteps} steps, guidance s={d.cfg_scale:g}"
             for name, d in stages]
    bf16, tf32 = precision
    arithmetic = "bf16 autocast" if bf16 else "tf32" if tf32 else "fp32"
    labels = ("prompts" if prompts else "by class frequency" if settings.classes == DATASET_CLASSES
              else "every class round-robin" if not settings.classes else "given classes round-robin")
    return f"sampling: preset {args.preset}; {'; '.join(parts)}; {arithmetic}; labels {labels}"


def describe_presets() -> str:
    return "; ".join(f"'{name}': {preset.about}" for name, preset in SAMPLING_PRESETS.items())


def video_places(args) -> list:
    """Where each video goes as it is finished: its mp4 (unless --no-mp4) and its folder of PNG frames."""
    places = [] if args.no_mp4 else [str(Path(args.out_dir) / "videos")]
    return places + ([f"{args.frames_dir} (PNG frames)"] if args.frames_dir else [])


def sample_videos(args, info, earlier: list, written: list) -> None:
    device = info.device
    # Content frames given by --content-frame or --real-content need no content denoiser.
    content_ckpt = None if args.content_frame or args.real_content else args.content_ckpt
    settings = resolve_settings(args)
    models = load_models(args.ae_ckpt, args.motion_ckpt, content_ckpt, device, args.allow_ae_mismatch,
                         settings.motion, settings.content, vae=args.vae, text_encoder=args.text_encoder)
    bf16, tf32 = set_precision(models, settings.precision, device)
    if args.compile:
        compile_models(models)
    motion_cfg = models.motion.cfg
    prompts = prompt_list(args)
    if models.text is not None and not prompts:
        raise ValueError(f"{args.motion_ckpt} is conditioned on captions: pass --prompt or --prompts")
    if prompts and models.text is None:
        raise ValueError(f"--prompt/--prompts: {args.motion_ckpt} is class-conditional; pass --classes instead")
    if prompts and (args.classes or args.real_content):
        raise ValueError(f"{'--classes' if args.classes else '--real-content (real clips of each video class)'} "
                         f"needs classes; the prompts give the videos' captions instead")
    if prompts:
        captions = [prompts[i % len(prompts)] for i in range(args.num_videos)]
        labels, noise_ids = [-1] * args.num_videos, prompt_noise_ids(prompts, args.num_videos)
    else:
        labels = class_list(args, models.num_classes, motion_cfg.data, int(motion_cfg.train.global_seed))
        captions, noise_ids = None, list(range(args.num_videos))
    given_content = given_content_frames(args, models, labels, device)
    if info.is_main and not args.quiet:
        print(protocol_line(args, models, settings, (bf16, tf32), prompts))

    out_dir = Path(args.out_dir)
    # --overwrite removes the earlier run only now that the models loaded: a typo in a flag must not cost it.
    if earlier and info.is_main:
        for path in [*earlier, *(out_dir / name for name in GRID_FILES)]:
            remove(path)
        counts = Counter(str(path.parent) for path in earlier)
        print("removed " + " and ".join(f"{count} videos of an earlier run from {place}" for place, count in counts.items())
              + " (--overwrite)")
    barrier()  # no rank writes a video that rank 0 is about to remove
    out_dir.mkdir(parents=True, exist_ok=True)  # the grid and the rank shards go here, mp4s or not
    if not args.no_mp4:
        (out_dir / "videos").mkdir(exist_ok=True)
    if args.frames_dir:
        Path(args.frames_dir).mkdir(parents=True, exist_ok=True)
    mine = list(range(info.rank, args.num_videos, info.world_size))
    batches = [mine[i : i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    videos, contents, indices = [], [], []
    show_steps = info.is_main and not args.quiet
    for batch in tqdm(batches, desc=f"sampling (rank {info.rank})", disable=not show_steps):
        if captions is None:
            y = torch.tensor([labels[i] for i in batch], device=device)
            names = [f"{i:06d}_class{labels[i]:03d}.mp4" for i in batch]
        else:
            y = models.encode_prompts([captions[i] for i in batch])
            names = [f"{i:06d}_{prompt_slug(captions[i])}.mp4" for i in batch]
        decoded, z_c = generate(models, y, args.seed, [noise_ids[i] for i in batch],
                                None if given_content is None else given_content[batch], progress=show_steps)
        check_finite_samples(models, batch, decoded, z_c)
        clips = to_uint8_videos(decoded)
        contents.append(to_uint8_videos(models.ae.decode_content(z_c).float().unsqueeze(2))[:, 0])
        for index, name, clip in zip(batch, names, clips):
            mp4 = None if args.no_mp4 else out_dir / "videos" / name
            frames = Path(args.frames_dir) / f"{index:06d}" if args.frames_dir else None
            outputs = [path for path in (mp4, frames) if path is not None]
            with removed_if_unfinished(*outputs):  # a video counts once all its outputs are whole
                if mp4 is not None:
                    with reported("--out-dir", mp4):
                        write_mp4(clip, mp4, fps=args.fps)
                if frames is not None:
                    with reported("--frames-dir", frames):
                        write_frames(clip, frames)
            written.extend(outputs[:1])
        videos.append(clips)
        indices.extend(batch)
    shard = out_dir / f".shard-{info.rank:05d}.npz"
    error = None
    try:
        write_output(shard, lambda handle: np.savez(
            handle, videos=np.concatenate(videos) if videos else np.zeros((0,), np.uint8),
            content_frames=np.concatenate(contents) if contents else np.zeros((0,), np.uint8),
            indices=np.array(indices)), "--out-dir")
    except OutputError as exc:
        error = str(exc)
    error = next((e for e in all_gather_object(error) if e), None)  # every rank stops, none waits at a barrier
    if error:
        raise OutputError(error)
    error = None
    if info.is_main:
        try:
            write_final_outputs(args, out_dir, info.world_size, models, labels, captions)
        except OutputError as exc:
            # The npz is written first and the shards are removed only once it is: a full disk loses no video.
            shards = [out_dir / f".shard-{r:05d}.npz" for r in range(info.world_size)]
            error = (f"{exc}; the {args.num_videos} videos are kept in {', '.join(map(str, shards))} "
                     f"(arrays videos, content_frames, indices)")
    error = broadcast_object(error)
    if error:
        raise UnsavedVideos(error)


def write_final_outputs(args, out_dir: Path, world_size: int, models, labels: list, captions) -> None:
    """Rank 0: the --npz file (first: it is the run's result) and the grid, from every rank's shard; then the
    shards are removed."""
    shards = [out_dir / f".shard-{r:05d}.npz" for r in range(world_size)]
    loaded = [np.load(path) for path in shards]
    order = np.concatenate([s["indices"] for s in loaded if len(s["indices"])])
    ranked = np.argsort(order)
    all_videos = np.concatenate([s["videos"] for s in loaded if len(s["indices"])])[ranked]
    all_contents = np.concatenate([s["content_frames"] for s in loaded if len(s["indices"])])[ranked]
    if args.npz:
        arrays = {"videos": all_videos, "labels": np.array(labels, dtype=np.int64), "content_frames": all_contents,
                  "num_classes": np.int64(models.num_classes)}
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


# ---- flags: a bad value is refused by the parser (exit 2, naming the flag) before anything loads ------------------
DATASET_CLASSES = "dataset"  # --classes dataset: labels drawn by the training split's class frequencies


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample videos from trained CMD checkpoints.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--ae-ckpt", required=True, metavar="PATH",
                        help="the autoencoder checkpoint (train_ae.py: RUN/checkpoints/last.pt or a step file)")
    parser.add_argument("--motion-ckpt", required=True, metavar="PATH",
                        help="the motion DiT checkpoint (train_motion_diffusion.py); its config gives the classes, "
                        "the dataset and the default sampling settings")
    parser.add_argument("--content-ckpt", default=None, metavar="PATH",
                        help="the content DiT checkpoint (train_content_diffusion.py); required unless --content-frame "
                        "or --real-content gives the content frames")
    parser.add_argument("--content-frame", default=None, metavar="IMAGE",
                        help="image-to-video: an image to animate as every video's content frame instead of "
                        "sampling one")
    parser.add_argument("--real-content", action="store_true",
                        help="motion-only samples: content frames of held-out real clips of each video's class")
    parser.add_argument("--vae", default=None, metavar="PATH",
                        help="latent mode: the SD VAE folder or hub id, when it moved since the autoencoder recorded it")
    parser.add_argument("--allow-ae-mismatch", action="store_true",
                        help="sample even though the denoisers were trained with another autoencoder checkpoint")
    parser.add_argument("--classes", type=class_choice, default=None, metavar="IDS|NAMES|dataset",
                        help="comma-separated class ids or names, used round-robin; ids are 0-based (UCF-101's "
                        "classInd.txt numbers from 1: id = its number - 1), names are those of the motion run's dataset "
                        "(e.g. ApplyEyeMakeup,Biking). 'dataset': labels drawn by the class frequencies of the motion "
                        "run's training split, as NVlabs/CMD's evaluation and StyleGAN-V's metrics draw them "
                        "(deterministic given --seed). "
                        "Default: the preset's ('paper', 'reference': dataset), else every class round-robin")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text-to-video (caption-conditioned checkpoints): a prompt; repeat the flag for several. "
                        "Videos go round-robin over the prompts; a prompt's k-th video depends on --seed, the prompt and "
                        "k alone")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="a text file of prompts, one per line (with or after --prompt)")
    parser.add_argument("--text-encoder", default=None, metavar="PATH",
                        help="text-to-video: the CLIP text encoder folder or hub id, when it moved since the runs "
                        "recorded it")
    parser.add_argument("--num-videos", type=positive_int, default=16, metavar="N",
                        help="videos to generate, over all ranks")
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="B",
                        help="videos per forward pass on each rank (memory only: the videos do not depend on it)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="noise seed, 0..2**64-1: video i depends on the seed and i alone, for any --batch-size "
                        "or rank count")
    parser.add_argument("--preset", choices=sorted(SAMPLING_PRESETS), default="fast",
                        help=f"the sampling protocol; {describe_presets()}. 'fast' (the default) is validated against "
                        "'ddim' on the built-in data only (docs/BENCHMARKS.md); report numbers with 'paper' "
                        "(docs/RECIPES.md, FVD). The flags below override it setting by setting")
    parser.add_argument("--content-sampler", choices=SAMPLERS, default=None,
                        help="the content stage's sampler (default: the preset's)")
    parser.add_argument("--content-steps", type=positive_int, default=None, metavar="N",
                        help="the content stage's sampling steps (default: the preset's)")
    parser.add_argument("--content-cfg-scale", type=guidance_scale, default=None, metavar="S",
                        help="guidance scale s, DiT's convention: eps = eps(null) + s * (eps(c) - eps(null)); 1 = none; "
                        "the paper's (1 + w) eps(c) - w eps(null) is s = 1 + w. Default: the preset's ('paper': 5.0, "
                        "the paper's w = 4; 'reference': 4.0), else the checkpoint's config (configs/ucf101: 4.0)")
    parser.add_argument("--motion-sampler", choices=SAMPLERS, default=None,
                        help="the motion stage's sampler (default: the preset's)")
    parser.add_argument("--motion-steps", type=positive_int, default=None, metavar="N",
                        help="the motion stage's sampling steps (default: the preset's)")
    parser.add_argument("--motion-cfg-scale", type=guidance_scale, default=None, metavar="S",
                        help="guidance scale s of the motion model, the same convention as --content-cfg-scale. "
                        "Default: the preset's ('paper', 'reference': 1.0, unguided), else the checkpoint's config "
                        "(configs/ucf101: 1.0)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="on CUDA: 'auto' follows the motion run's train.mixed_precision and train.tf32; 'bf16' = "
                        "bf16 autocast (+ TF32), 'tf32' = fp32 with TF32 matmuls, 'fp32' = strict fp32. The CPU runs "
                        "fp32. Default: the preset's ('paper', 'reference': fp32), else 'auto'")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoisers and the decoder (pays off for thousands of videos on a GPU)")
    parser.add_argument("--out-dir", default="samples", metavar="DIR",
                        help="where the videos go: DIR/videos/NNNNNN_classCCC.mp4 (text-to-video: NNNNNN_<prompt>.mp4) "
                        "and the grid of the first --grid-videos, DIR/grid.mp4 and DIR/grid.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the videos and grid of an earlier run in --out-dir and its frame folders in "
                        "--frames-dir (refused without this flag)")
    parser.add_argument("--npz", default=None, metavar="FILE",
                        help="also write videos (N, T, H, W, 3) uint8, labels (N,), content_frames (N, H, W, 3) and "
                        "num_classes here")
    parser.add_argument("--frames-dir", default=None, metavar="DIR",
                        help="also write each video as a folder of PNG frames, DIR/000000/000.png ..., the layout "
                        "StyleGAN-V's metric scripts read")
    parser.add_argument("--no-mp4", action="store_true",
                        help="write no mp4 per video (for runs of thousands of videos); the grid is still written. "
                        "Needs --npz or --frames-dir")
    parser.add_argument("--grid-videos", type=positive_int, default=16, metavar="N",
                        help="how many of the first videos the grid shows")
    parser.add_argument("--fps", type=positive_int, default=8, help="frame rate of the written mp4 files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    run_reporting_user_errors(main, parse_args())
