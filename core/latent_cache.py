"""The training clips' latents: what a cache stores of a clip (LatentEncoder), the cache on disk (LatentCache) and
its build, split over the ranks and stoppable by a signal, and the per-channel statistics of the training latents."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from core.checkpoint import CheckpointError
from core.data import WorkerLoader
from core.distributed import DistInfo, barrier, broadcast_object
from core.frozen_autoencoder import encode, vae_fingerprint
from core.latent_stats import STD_FLOOR, LatentMoments, LatentScaler

STATS_CLIPS = 512  # training clips the latent statistics are measured over when there is no latent cache
MOMENTS_FILE = "latent_moments.npz"  # a latent cache's per-channel sums, written when it is built


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
        self.arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                       for name in done.get("arrays", ("z_c", "z_m"))}
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

    def moments(self, dist: DistInfo, chunk: int = 256) -> LatentMoments:
        """The per-channel sums of every cached latent: those saved when the cache was built, else (a cache built
        before they were saved) summed now over the arrays, the ranks of `dist` splitting the slots, and saved for
        the next run."""
        path = self.folder / MOMENTS_FILE
        if path.is_file():
            return LatentMoments.load(path)
        z_c, z_m = self.arrays["z_c"], self.arrays["z_m"]
        moments = LatentMoments(z_c.shape[1], z_m.shape[1])
        rank, world = dist.rank, dist.world_size
        first, end = len(self) * rank // world, len(self) * (rank + 1) // world  # this rank's contiguous share
        for start in range(first, end, chunk):
            slots = slice(start, min(start + chunk, end))
            moments.add(torch.from_numpy(np.array(z_c[slots])), torch.from_numpy(np.array(z_m[slots])))
        moments.all_reduce()
        if dist.is_main:
            moments.save(path)
        return moments


def measure_latent_stats(ae, source, batch_size: int, dist: DistInfo, logger,
                         autocast: Callable = contextlib.nullcontext, num_workers: int = 0) -> LatentScaler:
    """Per-channel statistics of the training latents, measured once per run and logged once to `logger`.

    Over every latent of `source` when it is a LatentCache, else over the first STATS_CLIPS clips (all when
    fewer) of the clip dataset `source`, which the ranks of `dist` encode with `ae` in shares whose sums are
    all-reduced: in batches of `batch_size` clips under `autocast()`, decoded by `num_workers` loader workers.
    """
    if isinstance(source, LatentCache):
        moments, where = source.moments(dist), f"the {len(source)} cached latents in {source.folder}"
    else:
        count = min(STATS_CLIPS, len(source))
        moments = LatentMoments(ae.content_shape[0], ae.motion_shape[0])
        items = [(index, 0) for index in range(dist.rank, count, dist.world_size)]
        encoder = LatentEncoder.autoencoder(ae)
        encoded = _encoded(encoder, source, items, batch_size, "measuring latent statistics", dist, autocast,
                           num_workers)
        for _, latents in encoded:
            moments.add(latents["z_c"], latents["z_m"])
        moments.all_reduce()
        where = f"the first {count} training clips"
    scaler, floored = LatentScaler.from_moments(moments)
    logger.info(f"latent stats over {where} (std floor {STD_FLOOR:g}): {scaler.describe()}")
    for kind, channels in floored.items():
        logger.warning(f"latent stats: {kind} channels {channels} are near-constant (std < {STD_FLOOR:g}); "
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


class CacheBuildInterrupted(Exception):
    """A stop signal ended a latent cache build; the message says how far it got. The half-built folder is gone."""


def build_latent_cache(encoder: LatentEncoder, dataset, clips_per_video: int, batch_size: int, data_cfg, cache_root,
                       dist: DistInfo, logger, stop_requested: Callable[[], bool] = lambda: False,
                       autocast: Callable = contextlib.nullcontext, captions: Optional[list] = None) -> LatentCache:
    """Encodes `dataset` once (the ranks of `dist` split the work, `data_cfg.num_workers` loader workers decode the
    clips) into <cache_root>/<key>/, reused when it exists; its items carry the `captions` of their videos when
    given. The key names the encoder, the data config and `clips_per_video`.

    `stop_requested()` is asked every few batches (distributed, an agreement of the ranks: every rank calls it at
    the same points); once it is true the build stops, its half-built folder is removed, and CacheBuildInterrupted
    is raised on every rank.
    """
    key = latent_cache_key(encoder.key, data_cfg, clips_per_video)
    folder = Path(cache_root) / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        remove_abandoned_staging(folder.parent, logger)
    if (folder / "done").is_file():
        if encoder.vae:
            recorded = json.loads((folder / "done").read_text()).get("vae")
            if recorded is None:
                logger.warning(f"latent cache {folder} records no VAE fingerprint (built before VAEs were "
                               f"recorded); its latents are used unchecked")
            elif recorded != encoder.vae:  # the key holds the fingerprint: only a cache copied or edited by hand
                raise CheckpointError(f"latent cache {folder} holds latents of the VAE with weights {recorded}, not of "
                                      f"the VAE in use ({encoder.vae}); delete it to have it built again")
        logger.info(f"latent cache: reusing {folder}")
        return LatentCache(folder, captions)
    total = len(dataset) * clips_per_video
    # Written into a private folder and renamed into place when complete, so that two runs building the
    # same cache at once (the demo trains both diffusion stages side by side) never write into each other's files.
    staging = Path(broadcast_object(str(_staging_path(folder, os.getpid(), _machine())) if dist.is_main else None))
    try:
        _fill_staging(encoder, dataset, staging, total, clips_per_video, batch_size, folder, data_cfg.num_workers,
                      dist, logger, stop_requested, autocast)
    except BaseException:  # an error or a stop: the half-built folder goes with the build
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    if dist.is_main:
        try:
            staging.rename(folder)
        except OSError:  # another run finished the same cache first: use theirs, drop ours
            shutil.rmtree(staging, ignore_errors=True)
    barrier()
    return LatentCache(folder, captions)


def _fill_staging(encoder: LatentEncoder, dataset, staging: Path, total: int, clips_per_video: int, batch_size: int,
                  folder: Path, num_workers: int, dist: DistInfo, logger, stop_requested: Callable[[], bool],
                  autocast: Callable):
    """Encodes this rank's share of the cache's `total` slots into `staging`; on rank 0 writes the latent moments
    (of a (z_c, z_m) cache) and `done` once every rank is through. A stop request removes `staging` and raises
    CacheBuildInterrupted."""
    shapes = {**encoder.shapes, "y": ()}
    if dist.is_main:
        staging.mkdir(parents=True)
        for name, shape in shapes.items():
            np.lib.format.open_memmap(staging / f"{name}.npy", mode="w+", dtype=np.int64 if name == "y" else np.float32,
                                      shape=(total, *shape)).flush()
    barrier()
    files = {name: np.load(staging / f"{name}.npy", mmap_mode="r+") for name in shapes}
    mine = list(range(dist.rank, total, dist.world_size))  # slot s = clip (s % len, epoch s // len)
    items = [(slot % len(dataset), slot // len(dataset)) for slot in mine]
    logger.info(f"latent cache: encoding {total} clips ({clips_per_video} per video) into {folder}")
    moments = None  # the latent statistics of a (z_c, z_m) cache, at no extra encoding
    if "z_c" in shapes:
        moments = LatentMoments(shapes["z_c"][0], shapes["z_m"][0])
    # Ranks agree on a stop only at batch counts every one of them reaches (their shares differ by at most one
    # clip), every few batches; a single process reads its own flag before every batch.
    every = CACHE_STOP_CHECK_EVERY if dist.distributed else 1
    reached_by_all = -(-(total // dist.world_size) // batch_size)
    position, stopped = 0, False
    batches = _encoded(encoder, dataset, items, batch_size, "encoding latent cache", dist, autocast, num_workers)
    with contextlib.closing(batches) as encoded:
        for done in itertools.count():
            if done % every == 0 and done <= reached_by_all and stop_requested():
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
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        share = " by rank 0" if dist.distributed else ""
        raise CacheBuildInterrupted(f"building the latent cache ({position} of {len(mine)} clips encoded{share})")
    for array in files.values():
        array.flush()
    del files
    if moments is not None:
        moments.all_reduce()
    barrier()
    if dist.is_main:
        if moments is not None:
            moments.save(staging / MOMENTS_FILE)
        (staging / "done").write_text(json.dumps({"clips": total, "arrays": list(encoder.shapes), "vae": encoder.vae}))


def _encoded(encoder: LatentEncoder, dataset, items, batch_size: int, description: str, dist: DistInfo,
             autocast: Callable, num_workers: int):
    """Yields (batch, {name: latent}) for the (index, epoch) `items` of the clip dataset, encoded in batches in
    order on `dist.device` under `autocast()`; rank 0 shows the progress."""
    loader = WorkerLoader(
        _ItemList(dataset, items), batch_size=batch_size, num_workers=num_workers,
        # A private generator: creating the iterator must not consume the global RNG, so that a run that
        # encodes here draws the same training noise as one that reuses a cache or resumes.
        generator=torch.Generator().manual_seed(0))
    for batch in tqdm(loader, desc=description, disable=not dist.is_main, mininterval=2.0):
        yield batch, encoder(batch["x"].to(dist.device, non_blocking=True), autocast())


class _ItemList(Dataset):
    """A fixed list of (index, epoch) items of another dataset."""

    def __init__(self, dataset, items):
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.dataset[self.items[i]]
