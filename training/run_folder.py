"""The run folder: claiming it, its config.yaml, the log, and the TensorBoard and W&B writers."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple, Optional

from core import checkpoint as ckpt_io
from core.cli import RunError
from core.config import to_yaml
from core.files import claim, write_output


def create_logger(run_dir: Optional[Path], is_main: bool, name: str = "cmd") -> logging.Logger:
    """Rank 0 logs to stdout and <run_dir>/log.txt; other ranks only report warnings."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if is_main:
        logger.setLevel(logging.INFO)
        handlers = [logging.StreamHandler(sys.stdout)]
        if run_dir is not None:
            handlers.append(logging.FileHandler(Path(run_dir) / "log.txt"))
        # Library modules (datasets, ...) log through the root logger; show their messages too.
        logging.getLogger().setLevel(logging.INFO)
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
            logging.getLogger().addHandler(handler)
    else:
        logger.setLevel(logging.WARNING)
        logger.addHandler(logging.NullHandler())
    return logger


class RunFolder(NamedTuple):
    path: Path
    created: bool  # by this start: a start that fails before training removes it again


def claim_run_dir(results: Path, stage: str, exp_name: Optional[str] = None) -> RunFolder:
    """A run folder under `results` that belongs to this process alone: `exp_name`, or the next NNN-stage.

    mkdir is atomic, so two runs started at the same instant in one results folder cannot both take the same
    NNN-stage: the loser takes the next free index. A named folder is claimed (core.files.claim) before anything in
    it is looked at or written: a second start with the same --exp-name, or a --resume of a run whose process is
    alive, stops with one line naming the folder and that process, and the first run's files are untouched. The
    claim ends with the process, a kill -9 included, so a requeued job's restart takes the folder over.
    """
    results.mkdir(parents=True, exist_ok=True)
    if exp_name:
        run_dir = results / exp_name
        created = not run_dir.exists()
        held = claim(run_dir, "--exp-name: the run folder", "choose another --exp-name, or wait for that run to end")
        if ckpt_io.latest_checkpoint_in_run(run_dir) is not None:
            held.release()
            raise RunError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it or "
                           f"choose another --exp-name (nothing was overwritten)")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)  # a requeued job whose first save was killed
        ckpt_io.remove_temp_files(run_dir / "checkpoints")
        return RunFolder(run_dir, created)
    taken = [int(p.name.split("-", 1)[0]) for p in results.iterdir() if p.name.split("-", 1)[0].isdigit()]
    index = max(taken, default=-1) + 1
    while True:
        run_dir = results / f"{index:03d}-{stage}"
        try:
            run_dir.mkdir()
        except FileExistsError:
            index += 1
            continue
        claim(run_dir, "the run folder", "start the run again")  # its own new folder: only a --resume can meet it
        (run_dir / "checkpoints").mkdir()
        return RunFolder(run_dir, True)


def open_run_dir(results_dir: str, exp_name: Optional[str], stage: str, resume_path: Optional[Path]) -> RunFolder:
    """The folder of the resumed run, claimed, or a new one (claim_run_dir)."""
    results = Path(results_dir)
    if resume_path is not None:
        run_dir = resume_path.parent.parent  # <run>/checkpoints/x.pt -> <run>
        if resume_path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
            if not os.access(run_dir, os.W_OK) or not os.access(run_dir / "checkpoints", os.W_OK):
                raise RunError(f"--resume: the run folder {run_dir} is not writable; nothing was changed")
            claim(run_dir, "--resume: the run folder", "wait for that process to end")
            ckpt_io.remove_temp_files(run_dir / "checkpoints")  # after the claim: a live run's are its own
            return RunFolder(run_dir, False)
        # A checkpoint outside any run folder (a copy, a download) continues in a new run folder.
    try:
        return claim_run_dir(results, stage, exp_name)
    except OSError as exc:  # under a file, read-only, a pseudo file system, no space
        reason = exc.strerror or type(exc).__name__
        raise RunError(f"--results-dir {results}: cannot create a run folder there ({reason}: "
                       f"{exc.filename or results})") from None


def write_config(run_dir: Path, cfg) -> None:
    text = to_yaml(cfg).encode()
    write_output(run_dir / "config.yaml", lambda handle: handle.write(text), "the run's config")


def remove_run_dir(run_dir: Path, writer, logger: Optional[logging.Logger]) -> None:
    """Closes the writers and removes the folder (a start that failed before it trained or saved anything)."""
    if writer is not None:
        writer.close()
    for handler in list(logger.handlers) if logger is not None else []:
        handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)


def start_wandb(run_dir: Path, project: Optional[str], entity: Optional[str], config: Optional[dict]):
    """A Weights & Biases run mirroring the TensorBoard scalars and media, when train.wandb_project is set (off by
    default; TensorBoard stays). The id is kept in the run folder, so a resumed run continues the same W&B run."""
    if not project:
        return None
    import wandb  # optional: validate_config has checked that it is installed

    id_file = Path(run_dir) / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    write_output(id_file, lambda handle: handle.write(run_id.encode()), "the run's W&B id")
    return wandb.init(project=project, entity=entity, name=Path(run_dir).name, id=run_id,
                      resume="allow", dir=str(run_dir), config=config, sync_tensorboard=True)


def close_writers(writer, wandb_run) -> None:
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()


def start_writers(run_dir: Path, wandb_project: Optional[str], wandb_entity: Optional[str],
                  config: Optional[dict]) -> tuple:
    """(the TensorBoard writer, the W&B run or None), on rank 0; `config` is what W&B records of the run."""
    # Before the TensorBoard writer, whose scalars it mirrors.
    wandb_run = start_wandb(run_dir, wandb_project, wandb_entity, config)
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb")), wandb_run
