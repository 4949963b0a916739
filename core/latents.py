"""The frozen autoencoder seen from the diffusion stages: rebuilt from its checkpoint, encoding, latent cache."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from models.autoencoder import build_autoencoder
from models.vae import PixelFrames, load_frame_vae, pixel_interface
from models.weights_file import load_weights_file
from core.checkpoint import (
    CheckpointError,
    atomic_write,
    build_fitting,
    load_checkpoint,
    load_for_sampling,
    load_weights,
    model_weights,
    resolve_resume,
    weights_fingerprint,
)
from core.config import ConfigError, config_from_dict
from core.data import WorkerLoader
from core.distributed import all_reduce_sum, barrier, broadcast_object

STATS_CLIPS = 512  # training clips the latent statistics are measured over when there is no latent cache
# Floor of a measured std, in the autoencoder's units (pixel mode's latents live in [-1, 1], typical stds 0.1-0.5;
# latent mode's content frames are scaled VAE latents, std about 1).
# A channel spreading less than 1e-3 carries nothing the decoder can show (in the content frame it is an eighth
# of one 8-bit pixel level, 2/255); dividing by its true, possibly zero std would blow float rounding up into
# unit-variance targets for the denoiser, while with the floor its sampled values stay within ~1e-3 of the mean.
STD_FLOOR = 1e-3
MOMENTS_FILE = "latent_moments.npz"  # a latent cache's per-channel sums, written when it is built
logger = logging.getLogger(__name__)


def resolve_ae_ckpt(ae_ckpt: str, results_dir) -> Path:
    """`ae_ckpt` itself, or for 'auto' the newest autoencoder checkpoint under results_dir (how NVlabs/CMD's commands
    chain the stages)."""
    if ae_ckpt != "auto":
        return Path(ae_ckpt)
    found = resolve_resume("auto", results_dir, "autoencoder")
    if found is None:
        raise CheckpointError(f"ae_ckpt=auto: no autoencoder checkpoint under {results_dir}; train one with "
                              f"train_ae.py --results-dir {results_dir} or pass --ae-ckpt")
    # The step file rather than last.pt, which moves on while the autoencoder run goes on: the path recorded in the
    # diffusion run then keeps naming the weights it was trained with.
    step_file = found.with_name(f"{int(load_checkpoint(found, mmap=True)['step']):07d}.pt")
    return step_file if found.name == "last.pt" and step_file.is_file() else found


def vae_fingerprint(frames) -> Optional[str]:
    """The fingerprint of a latent-mode VAE's weights (core.checkpoint.weights_fingerprint), computed once per
    loaded VAE; None in pixel mode. It names the VAE whatever folder or hub id it was loaded from."""
    if isinstance(frames, PixelFrames):
        return None
    if frames.fingerprint is None:
        frames.fingerprint = weights_fingerprint(frames.vae.state_dict())
    return frames.fingerprint


def load_frames(cfg, device):
    """What the CMD autoencoder of an autoencoder config sees of a clip: the frames (pixel mode) or their latents
    under the frozen VAE the config names (latent mode), its fingerprint computed."""
    if cfg.mode != "latent":
        return PixelFrames()
    frames = load_frame_vae(cfg.vae, device)
    if frames.latent_channels != cfg.model.channels:
        raise ConfigError(f"config key 'model.channels' is {cfg.model.channels} but the VAE {cfg.vae} makes "
                          f"{frames.latent_channels}-channel latents")
    vae_fingerprint(frames)
    return frames


def check_vae(recorded: Optional[str], recorded_vae, frames, given_vae, owner) -> None:
    """Refuses, in one line naming both, a VAE whose weights are not those `owner` (a checkpoint or a latent cache)
    recorded; an owner that recorded none (written before VAEs were fingerprinted) is accepted with a warning."""
    if isinstance(frames, PixelFrames):
        return
    if not recorded:
        logger.warning(f"warning: {owner} records no VAE fingerprint (written before VAEs were recorded): the VAE "
                       f"{given_vae} ({vae_fingerprint(frames)}) is used unchecked")
        return
    given = vae_fingerprint(frames)
    if given != recorded:
        raise CheckpointError(f"{owner} was made with the VAE {recorded_vae} (weights {recorded}), but the VAE "
                              f"{given_vae} has weights {given}: pass the VAE it was made with (--vae)")


def load_autoencoder(path, device, data_cfg=None, mode: Optional[str] = None, vae: Optional[str] = None):
    """(frozen EMA autoencoder in eval mode, its config) from a train_ae.py checkpoint alone.

    With `data_cfg`, a clip size that differs from the one the autoencoder was trained on is refused, and with
    `mode` a mode other than the one it was trained in. `path` may be a .pt checkpoint or weights exported by
    training/export.py. A latent-mode autoencoder comes with the VAE it recorded (or `vae`, the same weights
    elsewhere; other weights are refused, check_vae): a models.vae.LatentModeAutoencoder that encodes and decodes
    pixel clips.
    """
    ckpt = load_for_sampling(path, "autoencoder")  # mmap'ed, EMA weights only: no rank reads the optimizer state
    ae_cfg = config_from_dict("autoencoder", ckpt["config"])
    if data_cfg is not None:
        want = (int(data_cfg.n_frames), *map(int, data_cfg.resolution))
        have = (int(ae_cfg.data.n_frames), *map(int, ae_cfg.data.resolution))
        if want != have:
            raise CheckpointError(f"autoencoder {path} was trained on clips of {have[0]}x{have[1]}x{have[2]} "
                                  f"(frames x H x W) but the data config asks for {want[0]}x{want[1]}x{want[2]}")
    if mode is not None and mode != ae_cfg.mode:
        raise CheckpointError(f"config key 'mode' is '{mode}' but the autoencoder {path} was trained in "
                              f"{ae_cfg.mode} mode")
    recorded_vae = ae_cfg.vae
    if vae:
        ae_cfg.vae = vae
    frames = load_frames(ae_cfg, device)
    check_vae(ae_cfg.vae_fingerprint, recorded_vae, frames, ae_cfg.vae, f"autoencoder {path}")
    ae_cfg.vae_fingerprint = vae_fingerprint(frames)
    weights = model_weights(ckpt, prefer_ema=True)
    model = build_fitting(lambda: build_autoencoder(ae_cfg.model, ae_cfg.data, frames.downsample), weights, path,
                          "autoencoder weights", f"data.resolution {list(ae_cfg.data.resolution)}, data.n_frames "
                          f"{ae_cfg.data.n_frames}, model.hidden_size {ae_cfg.model.hidden_size}")
    load_weights(model, weights, path, "autoencoder weights")
    model.to(device).eval().requires_grad_(False)
    return pixel_interface(frames, model), ae_cfg


@torch.no_grad()
def encode(ae, x: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (B, C, T, H, W) -> float32 (z_c (B, C, H, W), z_m (B, D, T, H'+W'))."""
    with autocast:
        z_c, z_m = ae.encode(x)
    return z_c.float(), z_m.float()


class LatentEncoder:
    """What a latent cache stores of a clip: the frozen autoencoder's (z_c, z_m) for the diffusion stages, or, for
    the latent-mode autoencoder stage, the VAE's latent clip ("x") alone. `shapes` names the arrays, `key` the
    encoder's identity in the cache key (its checkpoint file, or the VAE)."""

    def __init__(self, shapes: dict, encode_fn, key: str, vae: Optional[str] = None):
        self.shapes, self.encode_fn, self.key = shapes, encode_fn, key
        self.vae = vae  # latent mode: the fingerprint of the VAE behind the latents, recorded in the cache

    @classmethod
    def autoencoder(cls, ae, ae_path=None) -> "LatentEncoder":
        """(z_c, z_m) of the frozen autoencoder `ae`, read from the checkpoint file `ae_path` (its key)."""
        key = ""
        if ae_path is not None:
            path = Path(ae_path).resolve()
            stat = path.stat()
            key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        vae = vae_fingerprint(ae.frames) if hasattr(ae, "frames") else None
        return cls({"z_c": tuple(ae.content_shape), "z_m": tuple(ae.motion_shape)},
                   lambda x, autocast: dict(zip(("z_c", "z_m"), encode(ae, x, autocast))),
                   key + (f"|vae|{vae}" if vae else ""), vae)

    @classmethod
    def frames(cls, frames, data_cfg) -> "LatentEncoder":
        """The VAE's latent clips (B, c, T, H/f, W/f) of the data config's pixel clips (B, 3, T, H, W)."""
        f = frames.downsample
        t, (h, w) = int(data_cfg.n_frames), data_cfg.resolution

        def encode_clips(x, autocast):
            with autocast:
                return {"x": frames.encode(x).float()}

        vae = vae_fingerprint(frames)
        return cls({"x": (frames.latent_channels, t, h // f, w // f)}, encode_clips, f"vae|{vae}", vae)

    def __call__(self, x: torch.Tensor, autocast) -> dict:
        return self.encode_fn(x, autocast)


class LatentCache(Dataset):
    """Pre-encoded clips in memory-mapped .npy files, one per array of its LatentEncoder plus y: the encoder runs
    once, not every step.

    `clips_per_video` random clips are drawn per video (clip k of video i is the dataset's item at
    epoch k), so the models still see varied clip starts. Items come back as the same dict the clip loader
    yields after encoding: {"z_c", "z_m", "y", "index"} for the diffusion stages, {"x", "y", "index"} for the
    latent-mode autoencoder; with `captions` (one per video of the dataset) also the clip's "caption".
    """

    def __init__(self, folder, captions: Optional[list] = None):
        self.folder = folder = Path(folder)
        self.captions = captions  # per video of the dataset it caches (slot s holds a clip of video s % len)
        done = json.loads((folder / "done").read_text()) if (folder / "done").is_file() else {}
        self.arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in done.get("arrays", ("z_c", "z_m"))}
        self.y = np.load(folder / "y.npy")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        item = {**{name: torch.from_numpy(np.array(array[index])) for name, array in self.arrays.items()},
                "y": int(self.y[index]), "index": index}
        if self.captions is not None:
            item["caption"] = self.captions[index % len(self.captions)]
        return item

    def moments(self, run, chunk: int = 256) -> "LatentMoments":
        """The per-channel sums of every cached latent: those saved when the cache was built, else (a cache built
        before they were saved) summed now over the arrays, ranks splitting the slots, and saved for the next run."""
        path = self.folder / MOMENTS_FILE
        if path.is_file():
            return LatentMoments.load(path)
        z_c, z_m = self.arrays["z_c"], self.arrays["z_m"]
        moments = LatentMoments(z_c.shape[1], z_m.shape[1])
        rank, world = run.dist.rank, run.dist.world_size
        first, end = len(self) * rank // world, len(self) * (rank + 1) // world  # this rank's contiguous share
        for start in range(first, end, chunk):
            slots = slice(start, min(start + chunk, end))
            moments.add(torch.from_numpy(np.array(z_c[slots])), torch.from_numpy(np.array(z_m[slots])))
        moments.all_reduce()
        if run.dist.is_main:
            moments.save(path)
        return moments


class LatentMoments:
    """Float64 per-channel sums (count, sum, sum of squares) of z_c (B, C, H, W) and z_m (B, D, T, H'+W') batches,
    over every axis but the channel axis: sums of rank shares all-reduce into the sums of the whole set."""

    KINDS = ("content", "motion")

    def __init__(self, content_channels: int, motion_channels: int):
        # Kept on the CPU: one small copy per batch is nothing for a measurement done once per run.
        self.sums = {kind: torch.zeros(3, channels, dtype=torch.float64)
                     for kind, channels in zip(self.KINDS, (content_channels, motion_channels))}

    def add(self, z_c: torch.Tensor, z_m: torch.Tensor) -> None:
        for kind, z in zip(self.KINDS, (z_c, z_m)):
            values = z.detach().transpose(0, 1).reshape(z.shape[1], -1).double()
            count = torch.full_like(values[:, 0], values.shape[1])
            self.sums[kind] += torch.stack([count, values.sum(1), values.square().sum(1)]).cpu()

    def all_reduce(self) -> None:
        """Every rank ends with the sums over all ranks."""
        for kind in self.KINDS:
            self.sums[kind] = all_reduce_sum(self.sums[kind])

    def mean_std(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 (channels,) mean and population std (numpy's default, ddof=0)."""
        count, total, squares = self.sums[kind]
        if not count.gt(0).all():
            raise ValueError("latent statistics: no latents were measured")
        mean = total / count
        # In float64 the cancellation in E[z^2] - E[z]^2 is harmless for latents of about unit scale.
        return mean, (squares / count - mean.square()).clamp(min=0.0).sqrt()

    def save(self, path) -> None:
        """Written to a temp file and renamed, so that a concurrent reader never sees half a file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as handle:
            np.savez(handle, **{kind: sums.numpy() for kind, sums in self.sums.items()})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "LatentMoments":
        with np.load(path) as arrays:
            if any(kind not in arrays for kind in cls.KINDS):
                raise CheckpointError(f"{path} lacks the content or motion sums; delete it to have them measured again")
            moments = cls(arrays["content"].shape[1], arrays["motion"].shape[1])
            moments.sums = {kind: torch.from_numpy(arrays[kind]) for kind in cls.KINDS}
        return moments


class LatentScaler:
    """Per-channel standardisation z' = (z - mean) / std of z_c (B, C, H, W) and z_m (B, D, T, H'+W'): both
    denoisers learn and sample standardised latents ('content' and 'motion' name the latent, not the stage).

    Its state_dict, the `latent_stats` entry of every diffusion checkpoint, holds four plain float32 tensors:
    content_mean, content_std (C,) and motion_mean, motion_std (D,).
    """

    KEYS = ("content_mean", "content_std", "motion_mean", "motion_std")

    def __init__(self, content_mean, content_std, motion_mean, motion_std):
        as32 = [torch.as_tensor(t, dtype=torch.float32) for t in (content_mean, content_std, motion_mean, motion_std)]
        self.stats = {"content": tuple(as32[:2]), "motion": tuple(as32[2:])}

    @classmethod
    def identity(cls, ae) -> "LatentScaler":
        """Mean 0, std 1: the latents as the autoencoder `ae` (its content_shape, motion_shape) emits them."""
        c, d = ae.content_shape[0], ae.motion_shape[0]
        return cls(torch.zeros(c), torch.ones(c), torch.zeros(d), torch.ones(d))

    @classmethod
    def from_moments(cls, moments: LatentMoments) -> tuple["LatentScaler", dict]:
        """(scaler, {kind: indices of channels whose std was raised to STD_FLOOR})."""
        stats, floored = [], {}
        for kind in LatentMoments.KINDS:
            mean, std = moments.mean_std(kind)
            floored[kind] = torch.nonzero(std < STD_FLOOR).flatten().tolist()
            stats += [mean, std.clamp(min=STD_FLOOR)]
        return cls(*stats), {kind: idx for kind, idx in floored.items() if idx}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path, ae) -> "LatentScaler":
        """The checkpoint's `latent_stats`, checked against the autoencoder's channel counts.

        A checkpoint without them (written before the latents were standardised) trained on the raw latents:
        identity stats (mean 0, std 1) give its denoiser exactly what it was trained on.
        """
        state = ckpt.get("latent_stats")
        if state is None:
            return cls.identity(ae)
        channels = {"content": ae.content_shape[0], "motion": ae.motion_shape[0]}
        for key in cls.KEYS:
            value = state.get(key) if isinstance(state, dict) else None
            want = channels[key.split("_")[0]]
            if not torch.is_tensor(value) or tuple(value.shape) != (want,):
                raise CheckpointError(f"{path}: latent_stats['{key}'] is not a ({want},) tensor for this autoencoder's "
                                      f"latents; was it trained on another autoencoder?")
        return cls(*(state[key] for key in cls.KEYS))

    def _tensors(self) -> list:
        return [*self.stats["content"], *self.stats["motion"]]  # in KEYS order

    def state_dict(self) -> dict:
        return {key: value.detach().cpu().clone() for key, value in zip(self.KEYS, self._tensors())}

    def to(self, device) -> "LatentScaler":
        """A copy whose statistics live on `device`, so that the training step moves nothing."""
        return LatentScaler(*(t.to(device) for t in self._tensors()))

    def _broadcast(self, kind: str, ndim: int, device=None, dtype=torch.float32):
        """(mean, std) shaped (1, channels, 1, ...) to broadcast against a (B, channels, ...) latent of `ndim` dims."""
        shape = (1, -1) + (1,) * (ndim - 2)
        return tuple(t.to(device=device, dtype=dtype).view(shape) for t in self.stats[kind])

    def normalize(self, kind: str, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._broadcast(kind, z.ndim, z.device, z.dtype)
        return (z - mean) / std

    def denormalize(self, kind: str, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._broadcast(kind, z.ndim, z.device, z.dtype)
        return z * std + mean

    def bounds(self, kind: str, ndim: int, device=None, bound: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The autoencoder's range [-bound, bound] in standardised units, per channel: ((-bound - mean) / std,
        (bound - mean) / std), shaped (1, channels, 1, ...) for a latent of `ndim` dims."""
        mean, std = self._broadcast(kind, ndim, device)
        return (-bound - mean) / std, (bound - mean) / std

    def describe(self) -> str:
        def values(t):
            return "[" + ", ".join(f"{v:.4g}" for v in t.tolist()) + "]"

        return " | ".join(f"{kind} mean {values(mean)} std {values(std)}" for kind, (mean, std) in self.stats.items())


def measure_latent_stats(run, ae, source) -> LatentScaler:
    """Per-channel statistics of the training latents, measured once per run and logged once.

    Over every latent of `source` when it is a LatentCache, else over the first STATS_CLIPS clips (all when
    fewer) of the clip dataset `source`, which the ranks encode in shares whose sums are all-reduced.
    """
    if isinstance(source, LatentCache):
        moments, where = source.moments(run), f"the {len(source)} cached latents in {source.folder}"
    else:
        count = min(STATS_CLIPS, len(source))
        moments = LatentMoments(ae.content_shape[0], ae.motion_shape[0])
        items = [(index, 0) for index in range(run.dist.rank, count, run.dist.world_size)]
        encoder = LatentEncoder.autoencoder(ae)
        for _, latents in _encoded(run, encoder, source, items, run.batch_size, "measuring latent statistics"):
            moments.add(latents["z_c"], latents["z_m"])
        moments.all_reduce()
        where = f"the first {count} training clips"
    scaler, floored = LatentScaler.from_moments(moments)
    run.logger.info(f"latent stats over {where} (std floor {STD_FLOOR:g}): {scaler.describe()}")
    for kind, channels in floored.items():
        run.logger.warning(f"latent stats: {kind} channels {channels} are near-constant (std < {STD_FLOOR:g}); "
                           f"their std is floored at {STD_FLOOR:g}")
    return scaler


def latent_cache_key(encoder_key: str, data_cfg, clips_per_video: int) -> str:
    fields = {"encoder": encoder_key, "clips": clips_per_video,
              "data": {k: (list(v) if k == "resolution" else v) for k, v in data_cfg.items()
                       if k not in ("num_workers", "eval_split")}}
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


# A staging folder is <key>.tmp-<pid>@<machine>-<random>: the build's owner, so that a later run can tell an
# abandoned one (its owner was killed) from one a live run is still writing.
STAGING_OWNER = re.compile(r"\.tmp-(\d+)@(.+)-[0-9a-f]{8}$")
# A staging folder whose owner this machine cannot check (another machine, or named before owners were recorded)
# is removed once nothing was written into it for this long: far beyond any pause of a live build.
STAGING_MAX_IDLE_S = 24 * 3600
# Cache batches between the ranks' agreement on a received SIGTERM/SIGINT (an all-reduce, a host sync).
CACHE_STOP_CHECK_EVERY = 16


def _machine() -> str:
    """This host and its pid namespace, safe in a file name: a pid names one process only within both."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    try:
        return f"{host}.pidns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (not Linux): the host name alone
        return host


def _staging_path(folder: Path, pid: int, machine: str) -> Path:
    return folder.with_name(f"{folder.name}.tmp-{pid}@{machine}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a zombie (killed, not yet reaped by its parent) writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _idle_seconds(folder: Path) -> float:
    """Seconds since anything was written into `folder` (the memmaps' mtimes move as clips are encoded)."""
    times = [folder.stat().st_mtime] + [entry.stat().st_mtime for entry in folder.iterdir()]
    return time.time() - max(times)


def remove_abandoned_staging(cache_root, logger) -> None:
    """Removes the staging folders under `cache_root` whose build was killed (kill -9, a crash, a lost node).

    On this machine a folder goes once its owner process is gone; one of a live process is never touched. One of
    another machine (or without a recorded owner) goes once untouched for STAGING_MAX_IDLE_S, and is only
    reported before that: its owner's liveness cannot be checked from here.
    """
    here = _machine()
    for path in sorted(Path(cache_root).glob("*.tmp-*")):
        try:
            if not path.is_dir():
                continue
            owner = STAGING_OWNER.search(path.name)
            if owner and owner.group(2) == here:
                if _process_alive(int(owner.group(1))):
                    continue
                why = f"its build, process {owner.group(1)}, is gone"
            else:
                idle = _idle_seconds(path)
                if idle < STAGING_MAX_IDLE_S:
                    who = f"process {owner.group(1)} on {owner.group(2)}" if owner else "an unrecorded process"
                    logger.info(f"latent cache: leaving {path}, a build by {who} that cannot be checked from here; "
                                f"it is removed once untouched for {STAGING_MAX_IDLE_S / 3600:g} h")
                    continue
                why = f"untouched for {idle / 3600:.0f} h"
            shutil.rmtree(path)
            logger.info(f"latent cache: removed the abandoned staging folder {path} ({why})")
        except FileNotFoundError:  # another run removed or renamed it meanwhile
            continue
        except OSError as exc:
            logger.warning(f"latent cache: cannot remove the abandoned staging folder {path}: {exc}")


def build_latent_cache(run, encoder: LatentEncoder, dataset, clips_per_video: int, batch_size: int,
                       cache_root: Optional[str] = None, captions: Optional[list] = None) -> LatentCache:
    """Encodes `dataset` once (ranks split the work) into <results_dir>/latent_cache/<key>/, reused when it exists;
    its items carry the `captions` of their videos when given.

    A SIGTERM/SIGINT during the build stops it within a few batches: the half-built folder is removed, the run
    finishes (TrainingRun.finish) and the process exits with code 0, as after a stop signal in the training loop.
    """
    key = latent_cache_key(encoder.key, run.cfg.data, clips_per_video)
    folder = Path(cache_root or Path(run.cfg.train.results_dir) / "latent_cache") / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    if run.dist.is_main:
        remove_abandoned_staging(folder.parent, run.logger)
    if (folder / "done").is_file():
        if encoder.vae:
            recorded = json.loads((folder / "done").read_text()).get("vae")
            if recorded is None:
                run.logger.warning(f"latent cache {folder} records no VAE fingerprint (built before VAEs were "
                                   f"recorded); its latents are used unchecked")
            elif recorded != encoder.vae:  # the key holds the fingerprint: only a cache copied or edited by hand
                raise CheckpointError(f"latent cache {folder} holds latents of the VAE with weights {recorded}, not of "
                                      f"the VAE in use ({encoder.vae}); delete it to have it built again")
        run.logger.info(f"latent cache: reusing {folder}")
        return LatentCache(folder, captions)
    total = len(dataset) * clips_per_video
    # Written into a private folder and renamed into place when complete, so that two runs building the
    # same cache at once (the demo trains both diffusion stages side by side) never write into each other's files.
    staging = Path(broadcast_object(str(_staging_path(folder, os.getpid(), _machine())) if run.dist.is_main else None))
    try:
        _fill_staging(run, encoder, dataset, staging, total, clips_per_video, batch_size, folder)
    except BaseException:  # an error, or a stop signal's SystemExit: the half-built folder goes with the run
        if run.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    if run.dist.is_main:
        try:
            staging.rename(folder)
        except OSError:  # another run finished the same cache first: use theirs, drop ours
            shutil.rmtree(staging, ignore_errors=True)
    barrier()
    return LatentCache(folder, captions)


def _fill_staging(run, encoder: LatentEncoder, dataset, staging: Path, total: int, clips_per_video: int,
                  batch_size: int, folder: Path):
    """Encodes this rank's share of the cache's `total` slots into `staging`; on rank 0 writes the latent moments
    (of a (z_c, z_m) cache) and `done` once every rank is through. A stop signal ends the run here (SystemExit(0))
    after finish()."""
    shapes = {**encoder.shapes, "y": ()}
    if run.dist.is_main:
        staging.mkdir(parents=True)
        for name, shape in shapes.items():
            np.lib.format.open_memmap(staging / f"{name}.npy", mode="w+", dtype=np.int64 if name == "y" else np.float32,
                                      shape=(total, *shape)).flush()
    barrier()
    files = {name: np.load(staging / f"{name}.npy", mmap_mode="r+") for name in shapes}
    mine = list(range(run.dist.rank, total, run.dist.world_size))  # slot s = clip (s % len, epoch s // len)
    items = [(slot % len(dataset), slot // len(dataset)) for slot in mine]
    run.logger.info(f"latent cache: encoding {total} clips ({clips_per_video} per video) into {folder}")
    moments = None  # the latent statistics of a (z_c, z_m) cache, at no extra encoding
    if "z_c" in shapes:
        moments = LatentMoments(shapes["z_c"][0], shapes["z_m"][0])
    # Ranks agree on a stop only at batch counts every one of them reaches (their shares differ by at most one
    # clip), every few batches; a single process reads its own flag before every batch.
    every = CACHE_STOP_CHECK_EVERY if run.dist.distributed else 1
    reached_by_all = -(-(total // run.dist.world_size) // batch_size)
    position, stopped = 0, False
    with contextlib.closing(_encoded(run, encoder, dataset, items, batch_size, "encoding latent cache")) as encoded:
        for done in itertools.count():
            if done % every == 0 and done <= reached_by_all and run.stop_requested():
                stopped = True
                break
            encoded_batch = next(encoded, None)
            if encoded_batch is None:
                break
            batch, latents = encoded_batch
            slots = mine[position : position + len(batch["y"])]
            for name, value in {**latents, "y": batch["y"]}.items():
                files[name][slots] = value.cpu().numpy()
            if moments is not None:
                moments.add(latents["z_c"], latents["z_m"])
            position += len(batch["y"])
    if stopped:
        del files
        if run.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        share = " by rank 0" if run.dist.distributed else ""
        run.finish(interrupted=f"building the latent cache ({position} of {len(mine)} clips encoded{share})")
        raise SystemExit(0)  # the exit code of a stop in the training loop: the scheduler's requeue is not an error
    for array in files.values():
        array.flush()
    del files
    if moments is not None:
        moments.all_reduce()
    barrier()
    if run.dist.is_main:
        if moments is not None:
            moments.save(staging / MOMENTS_FILE)
        (staging / "done").write_text(json.dumps({"clips": total, "arrays": list(encoder.shapes), "vae": encoder.vae}))


def _encoded(run, encoder: LatentEncoder, dataset, items, batch_size: int, description: str):
    """Yields (batch, {name: latent}) for the (index, epoch) `items` of the clip dataset, encoded in batches in
    order."""
    loader = WorkerLoader(
        _ItemList(dataset, items), batch_size=batch_size, num_workers=run.cfg.data.num_workers,
        # A private generator: creating the iterator must not consume the global RNG, so that a run that
        # encodes here draws the same training noise as one that reuses a cache or resumes.
        generator=torch.Generator().manual_seed(0))
    for batch in tqdm(loader, desc=description, disable=not run.dist.is_main, mininterval=2.0):
        yield batch, encoder(run.to_device(batch["x"]), run.autocast())


class _ItemList(Dataset):
    """A fixed list of (index, epoch) items of another dataset."""

    def __init__(self, dataset, items):
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.dataset[self.items[i]]


def dataset_captions(dataset, what: str) -> list:
    """The caption of every video of `dataset` (its caption_of), read without decoding a clip."""
    if not hasattr(dataset, "caption_of"):
        raise ConfigError(f"config key 'text.encoder' is set but {what} has no captions: use dataset 'captions' "
                          f"(a video folder and data.captions) or 'synthetic'")
    return [dataset.caption_of(index) for index in range(len(dataset))]


def caption_table(run, encoder, captions: list):
    """A CaptionTable holding every distinct caption of `captions`, encoded once: by rank 0, saved under
    <results_dir>/latent_cache/text-<key>.pt (the key: the encoder's fingerprint and the captions) and loaded by
    the other ranks and by later runs of the same data. Without diffusion.latent_cache nothing is saved."""
    from models.text_encoder import CaptionTable

    table = CaptionTable(encoder, run.device)
    if not run.cfg.diffusion.latent_cache:
        table.add(captions)
        return table
    unique = sorted(set(captions))
    key = hashlib.sha1(json.dumps([run.cfg.text.fingerprint, unique]).encode()).hexdigest()[:16]
    path = Path(run.cfg.train.results_dir) / "latent_cache" / f"text-{key}.pt"
    if not path.is_file() and run.dist.is_main:
        run.logger.info(f"text cache: encoding {len(unique)} distinct captions into {path}")
        table.add(unique)
        atomic_write(path, lambda handle: torch.save(table.state_dict(), handle))
    barrier()
    if not len(table):
        run.logger.info(f"text cache: reusing {path} ({len(unique)} captions)")
        table.load_state_dict(load_weights_file(path, "text cache"))
    return table
