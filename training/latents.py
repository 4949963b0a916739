"""The frozen autoencoder seen from the diffusion stages: rebuilt from its checkpoint, encoding, latent cache."""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from models.autoencoder import build_autoencoder
from training.checkpoint import CheckpointError, load_stage_checkpoint, model_weights
from training.config import config_from_dict
from training.distributed import barrier, broadcast_object


def resolve_ae_ckpt(ae_ckpt: str, results_dir) -> Path:
    """`ae_ckpt` itself, or for 'auto' the newest autoencoder checkpoint under results_dir (the seed's chaining)."""
    from training.checkpoint import resolve_resume

    if ae_ckpt != "auto":
        return Path(ae_ckpt)
    found = resolve_resume("auto", results_dir, "autoencoder")
    if found is None:
        raise CheckpointError(f"ae_ckpt=auto: no autoencoder checkpoint under {results_dir}; train one with "
                              f"train_ae.py --results-dir {results_dir} or pass --ae-ckpt")
    return found


def load_autoencoder(path, device, data_cfg=None):
    """(frozen EMA autoencoder in eval mode, its config) from a train_ae.py checkpoint alone.

    With `data_cfg`, a clip size that differs from the one the autoencoder was trained on is refused.
    """
    ckpt = load_stage_checkpoint(path, "autoencoder")
    ae_cfg = config_from_dict("autoencoder", ckpt["config"])
    if data_cfg is not None:
        want = (int(data_cfg.n_frames), *map(int, data_cfg.resolution))
        have = (int(ae_cfg.data.n_frames), *map(int, ae_cfg.data.resolution))
        if want != have:
            raise CheckpointError(f"autoencoder {path} was trained on clips of {have[0]}x{have[1]}x{have[2]} "
                                  f"(frames x H x W) but the data config asks for {want[0]}x{want[1]}x{want[2]}")
    model = build_autoencoder(ae_cfg.model, ae_cfg.data)
    model.load_state_dict(model_weights(ckpt, prefer_ema=True))
    model.to(device).eval().requires_grad_(False)
    return model, ae_cfg


@torch.no_grad()
def encode(ae, x: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (B, C, T, H, W) -> float32 (z_c (B, C, H, W), z_m (B, D, T, H'+W'))."""
    with autocast:
        z_c, z_m = ae.encode(x)
    return z_c.float(), z_m.float()


class LatentCache(Dataset):
    """Pre-encoded (z_c, z_m, y) triples in memory-mapped .npy files: the encoder runs once, not every step.

    `clips_per_video` random clips are drawn per video (clip k of video i is the dataset's item at
    epoch k), so the diffusion models still see varied clip starts. Items come back as the same dict
    the clip loader yields after encoding: {"z_c", "z_m", "y", "index"}.
    """

    def __init__(self, folder):
        folder = Path(folder)
        self.z_c = np.load(folder / "z_c.npy", mmap_mode="r")
        self.z_m = np.load(folder / "z_m.npy", mmap_mode="r")
        self.y = np.load(folder / "y.npy")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        return {"z_c": torch.from_numpy(np.array(self.z_c[index])), "z_m": torch.from_numpy(np.array(self.z_m[index])),
                "y": int(self.y[index]), "index": index}


def latent_cache_key(ae_path, data_cfg, clips_per_video: int) -> str:
    ae_path = Path(ae_path).resolve()
    stat = ae_path.stat()
    fields = {"ae": str(ae_path), "size": stat.st_size, "mtime": stat.st_mtime_ns, "clips": clips_per_video,
              "data": {k: (list(v) if k == "resolution" else v) for k, v in data_cfg.items()
                       if k not in ("num_workers", "eval_split")}}
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_latent_cache(run, ae, dataset, ae_path, clips_per_video: int, batch_size: int,
                       cache_root: Optional[str] = None) -> LatentCache:
    """Encodes `dataset` once (ranks split the work) into <results_dir>/latent_cache/<key>/, reused when it exists."""
    key = latent_cache_key(ae_path, run.cfg.data, clips_per_video)
    folder = Path(cache_root or Path(run.cfg.train.results_dir) / "latent_cache") / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    if (folder / "done").is_file():
        run.logger.info(f"latent cache: reusing {folder}")
        return LatentCache(folder)
    total = len(dataset) * clips_per_video
    content_shape, motion_shape = tuple(ae.content_shape), tuple(ae.motion_shape)
    # Written into a private folder and renamed into place when complete, so that two runs building the
    # same cache at once (the demo trains both diffusion stages side by side) never write into each other's files.
    staging = Path(broadcast_object(f"{folder}.tmp-{uuid.uuid4().hex[:8]}" if run.dist.is_main else None))
    if run.dist.is_main:
        staging.mkdir(parents=True)
        np.lib.format.open_memmap(staging / "z_c.npy", mode="w+", dtype=np.float32, shape=(total, *content_shape)).flush()
        np.lib.format.open_memmap(staging / "z_m.npy", mode="w+", dtype=np.float32, shape=(total, *motion_shape)).flush()
        np.lib.format.open_memmap(staging / "y.npy", mode="w+", dtype=np.int64, shape=(total,)).flush()
    barrier()
    z_c_file = np.load(staging / "z_c.npy", mmap_mode="r+")
    z_m_file = np.load(staging / "z_m.npy", mmap_mode="r+")
    y_file = np.load(staging / "y.npy", mmap_mode="r+")
    mine = list(range(run.dist.rank, total, run.dist.world_size))  # slot s = clip (s % len, epoch s // len)
    items = [(slot % len(dataset), slot // len(dataset)) for slot in mine]
    loader = torch.utils.data.DataLoader(
        _ItemList(dataset, items), batch_size=batch_size, num_workers=run.cfg.data.num_workers)
    run.logger.info(f"latent cache: encoding {total} clips ({clips_per_video} per video) into {folder}")
    position = 0
    for batch in tqdm(loader, desc="encoding latent cache", disable=not run.dist.is_main, mininterval=2.0):
        z_c, z_m = encode(ae, run.to_device(batch["x"]), run.autocast())
        slots = mine[position : position + len(z_c)]
        z_c_file[slots] = z_c.cpu().numpy()
        z_m_file[slots] = z_m.cpu().numpy()
        y_file[slots] = batch["y"].numpy()
        position += len(z_c)
    for array in (z_c_file, z_m_file, y_file):
        array.flush()
    del z_c_file, z_m_file, y_file
    barrier()
    if run.dist.is_main:
        (staging / "done").write_text(json.dumps({"clips": total}))
        try:
            staging.rename(folder)
        except OSError:  # another run finished the same cache first: use theirs, drop ours
            shutil.rmtree(staging, ignore_errors=True)
    barrier()
    return LatentCache(folder)


class _ItemList(Dataset):
    """A fixed list of (index, epoch) items of another dataset."""

    def __init__(self, dataset, items):
        self.dataset, self.items = dataset, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.dataset[self.items[i]]
