"""Reconstruction FVD: an autoencoder's reconstructions of held-out clips against the clips, sharded over ranks."""
import contextlib

import numpy as np
import torch

from datasets.transforms import to_uint8_videos
from evals.fvd import extract_features, frechet_distance, fvd_metric_name
from core.data import WorkerLoader
from core.distributed import all_gather_object


class ReconstructionFVD:
    """Reconstruction FVD over `count` held-out clips (at most the whole eval split), sharded over ranks.

    The clips are spread evenly over the split rather than its first items: folder datasets list their videos
    class by class, so the first 2,048 of the 3,783 UCF-101 test videos would leave out about half of the classes.
    They are the same clips at every evaluation (epoch 0), so their features are computed once.
    """

    def __init__(self, dataset, count: int, detector, rank: int = 0, world_size: int = 1, batch_size: int = 16,
                 num_workers: int = 0):
        self.count = min(int(count), len(dataset))
        clips = np.linspace(0, len(dataset), self.count, endpoint=False).astype(np.int64)  # distinct: count <= len
        self.mine = clips[rank::world_size].tolist()
        self.dataset, self.detector = dataset, detector
        self.batch_size, self.num_workers = max(1, batch_size), num_workers
        self.real = None  # features of every rank's real clips, gathered at the first evaluation

    def name(self, n_frames: int) -> str:
        return fvd_metric_name(self.count, n_frames, self.detector)

    def batches(self):
        keys = [(index, 0) for index in self.mine]  # (index, epoch 0): the clip fixed_batch would take
        loader = WorkerLoader(torch.utils.data.Subset(self.dataset, keys), batch_size=self.batch_size,
                              num_workers=self.num_workers)
        for batch in loader:
            yield batch["x"]

    @torch.no_grad()
    def __call__(self, model, device, autocast=contextlib.nullcontext) -> float:
        """FVD of `model`'s reconstructions: model(pixel clips)[0] are pixel clips (a LatentModeAutoencoder in
        latent mode)."""
        real, fake = [], []
        for x in self.batches():
            x = x.to(device)
            with autocast():
                x_hat = model(x)[0]
            fake.append(extract_features(to_uint8_videos(x_hat.float()), self.detector))
            if self.real is None:
                real.append(extract_features(to_uint8_videos(x), self.detector))
        # A rank can hold no clips (fewer clips than ranks): gather lists of arrays, then join what exists.
        if self.real is None:
            self.real = np.concatenate([part for parts in all_gather_object(real) for part in parts])
        fake = np.concatenate([part for parts in all_gather_object(fake) for part in parts])
        return frechet_distance(self.real, fake)
