"""A training run's latent cache, latent statistics and caption table: core's, given the run's ranks, device,
autocast, logger and stop signal. A stop signal during the cache build ends the run here."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from core.latent_cache import (CacheBuildInterrupted, LatentCache, LatentEncoder, build_latent_cache,
                                measure_latent_stats)
from core.latent_stats import LatentScaler
from core.text_cache import caption_table
from training.run import TrainingRun


def latent_cache_root(run: TrainingRun) -> Path:
    """<results_dir>/latent_cache: the latent caches and caption tables of every run of the results folder."""
    return Path(run.train.results_dir) / "latent_cache"


def run_latent_cache(run: TrainingRun, encoder: LatentEncoder, dataset, data_cfg, clips_per_video: int,
                     captions: Optional[list] = None) -> LatentCache:
    """core.latent_cache.build_latent_cache under latent_cache_root. A SIGTERM/SIGINT during the build stops it
    within a few batches: the half-built folder is removed, the run finishes (TrainingRun.finish) and the process
    exits with code 0, as after a stop signal in the training loop."""
    try:
        return build_latent_cache(encoder, dataset, clips_per_video, run.batch_size, data_cfg,
                                  latent_cache_root(run), run.dist, run.logger, run.stop_requested, run.autocast,
                                  captions)
    except CacheBuildInterrupted as stopped:
        run.finish(interrupted=str(stopped))
        raise SystemExit(0)  # the exit code of a stop in the training loop: the scheduler's requeue is not an error


def run_latent_stats(run: TrainingRun, ae, source) -> LatentScaler:
    """core.latent_cache.measure_latent_stats over the run's training clips or their latent cache `source`."""
    return measure_latent_stats(ae, source, run.batch_size, run.dist, run.logger, run.autocast, run.num_workers)


def run_caption_table(run: TrainingRun, encoder, captions: list, fingerprint: str, cached: bool):
    """core.text_cache.caption_table, keyed by the text encoder's weights' `fingerprint`; `cached`: kept with the
    latent caches (a run that caches its latents, diffusion.latent_cache)."""
    cache_root = latent_cache_root(run) if cached else None
    return caption_table(encoder, captions, run.dist, run.logger, cache_root, fingerprint)
