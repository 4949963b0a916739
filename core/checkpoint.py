"""Self-describing checkpoints: atomic writes, safe (weights-only) loading, stage checks, resume lookup."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from core.files import atomic_write, fsync_dir, temp_path  # noqa: F401 (atomic_write is part of this API)
from models.weights_file import load_failure, safe_torch_load  # noqa: F401 (safe_torch_load: this module's API)

STEP_FILE = re.compile(r"^(\d{7})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used where it was given; the message names the file."""


# Exported weights (training/export.py): a .safetensors file, which holds only tensors and string metadata and so
# cannot run code when opened. Its metadata keys, and the prefix of the latent statistics among its tensors:
EXPORT_FORMAT = "cmd-weights-1"
META_FORMAT, META_STAGE, META_STEP, META_CONFIG = "cmd.format", "cmd.stage", "cmd.step", "cmd.config"
META_WEIGHTS, META_WEIGHTS_FINGERPRINT = "cmd.weights", "cmd.weights_fingerprint"
META_AE_FINGERPRINT = "cmd.ae_fingerprint"
META_VAE_FINGERPRINT = "cmd.vae_fingerprint"  # latent mode: the VAE's weights (also in the config)
LATENT_STATS_PREFIX = "latent_stats."
SAFETENSORS_SUFFIX = ".safetensors"


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


# os.link errors meaning "no hard link here", not "cannot write": another filesystem (EXDEV), a filesystem without
# hard links (EPERM/EOPNOTSUPP on some FUSE, SMB and object-store mounts), or the file's link limit (EMLINK).
_NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def atomic_link(src, dst) -> None:
    """Makes `dst` name the complete file `src`, atomically, without writing its bytes again.

    A hard link to `src` is made under a temp name and renamed over `dst`: `dst` is at every instant either its
    old complete file or `src`'s, and deleting `src` later (pruning) leaves `dst` whole, since the bytes live until
    their last name goes. Both names are one file, so it must never be written in place (everything here replaces
    files by rename). Where hard links are not supported, `src` is copied to the temp name, fsync'ed and renamed:
    as atomic, at the cost of the second write the link saves.
    """
    src, dst = Path(src), Path(dst)
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)  # left by a killed process of the same pid: os.link does not overwrite
    try:
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINK:
                raise
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, dst)
    finally:
        # Gone after a rename; still there after a failure, or when `dst` already named `src` (rename(2) then
        # does nothing and leaves both names).
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)


def strip_prefixes(state_dict: dict) -> dict:
    """Removes DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers' prefixes from keys."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def is_safetensors(path) -> bool:
    """An exported weights file: by its suffix, or by its content for a renamed one (8 bytes of little-endian header
    length, then the JSON header; a torch checkpoint starts with a zip signature or a pickle opcode instead)."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def _load_safetensors(path: Path, map_location="cpu") -> dict:
    """An exported weights file as the dict a checkpoint loads as: {model, ema, config, stage, step, latent_stats}.

    "model" and "ema" both name the exported weights (EMA ones when "ema" is not None), so that callers reading
    either find them. The tensors are memory-mapped: pages are read as the weights are copied into a model.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be read as safetensors "
                              f"({type(exc).__name__}: {first})") from None
    if metadata.get(META_FORMAT) != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not weights exported by training/export.py "
                              f"(its metadata has no '{META_FORMAT}: {EXPORT_FORMAT}')")
    try:
        config = json.loads(metadata[META_CONFIG])
        step = int(metadata.get(META_STEP, -1))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: its metadata has no readable '{META_CONFIG}'/'{META_STEP}' "
                              f"({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its metadata '{META_CONFIG}' is not a config (a JSON object)")
    if map_location not in (None, "cpu"):
        tensors = {key: value.to(map_location) for key, value in tensors.items()}
    weights = {key: value for key, value in tensors.items() if not key.startswith(LATENT_STATS_PREFIX)}
    stats = {key[len(LATENT_STATS_PREFIX):]: value for key, value in tensors.items()
             if key.startswith(LATENT_STATS_PREFIX)}
    ckpt = {"model": weights, "ema": weights if metadata.get(META_WEIGHTS, "ema") == "ema" else None,
            "config": config, "stage": metadata.get(META_STAGE, config.get("stage")), "step": step}
    if stats:
        ckpt["latent_stats"] = stats
    return ckpt


# The entries of a checkpoint and what each must be (training/run.py's save writes them; exports load as the first
# five). Every reader goes through load_checkpoint, which checks them, so that a damaged or hand-edited dictionary
# ends in one line naming the file and the entry instead of an AttributeError deep in a reader.
WEIGHT_ENTRIES = ("model", "ema", "discriminator")  # state dicts: names -> tensors
OPTIMIZER_ENTRIES = ("opt", "disc_opt")  # torch optimizer state dicts
INT_ENTRIES = ("step", "samples_seen", "world_size", "batch_size_per_rank", "data_position")


def _kind(value) -> str:
    name = type(value).__name__
    return ("an " if name[0] in "aeiou" else "a ") + name


def _check_tensors(path, name: str, value, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: checkpoint entry '{name}' is {_kind(value)}, not a dict of tensors")
    for key, tensor in value.items():
        if not isinstance(key, str) or not torch.is_tensor(tensor):
            raise CheckpointError(f"{path}: checkpoint entry '{name}' holds {_kind(tensor)} under {key!r}, "
                                  f"not a tensor")


def check_checkpoint(ckpt, path, stage: Optional[str] = None) -> dict:
    """`ckpt` if it has the layout of this repo's checkpoints (see the entries above), its config that of its stage's
    schema; else CheckpointError naming `path` and the first entry that is wrong. Returns `ckpt`."""
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this repo (no 'model'/'config' entries)")
    config = ckpt["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: checkpoint entry 'config' is {_kind(config)}, not a mapping")
    for name in WEIGHT_ENTRIES:
        if name in ckpt:
            _check_tensors(path, name, ckpt[name], allow_none=name != "model")
    if ckpt.get("latent_stats") is not None:
        _check_tensors(path, "latent_stats", ckpt["latent_stats"], allow_none=True)
    for name in OPTIMIZER_ENTRIES:
        value = ckpt.get(name)
        if value is not None and not (isinstance(value, dict) and isinstance(value.get("state"), dict)
                                      and isinstance(value.get("param_groups"), list)):
            raise CheckpointError(f"{path}: checkpoint entry '{name}' is not an optimizer state (a dict with 'state' "
                                  f"and 'param_groups')")
    for name in INT_ENTRIES:
        if name in ckpt and (isinstance(ckpt[name], bool) or not isinstance(ckpt[name], int)):
            raise CheckpointError(f"{path}: checkpoint entry '{name}' is {_kind(ckpt[name])}, not a whole number")
    if "rng" in ckpt and not isinstance(ckpt["rng"], (list, type(None))):
        raise CheckpointError(f"{path}: checkpoint entry 'rng' is {_kind(ckpt['rng'])}, not a list")
    recorded = ckpt.get("stage", config.get("stage"))
    if recorded is not None and not isinstance(recorded, str):
        raise CheckpointError(f"{path}: checkpoint entry 'stage' is {_kind(recorded)}, not a stage name")
    stage = stage or recorded
    from core.config import SCHEMAS, ConfigError, config_from_dict  # core.config imports the model registries

    if stage in SCHEMAS:
        try:
            config_from_dict(stage, config)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: checkpoint entry 'config' does not fit the {stage} config: {exc}") from None
    return ckpt


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Loads one of our checkpoints (mmap=True reads tensors lazily: cheap for checks of its metadata), or weights
    exported by training/export.py (.safetensors, always memory-mapped) in the same dict shape; either is checked
    by check_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        return check_checkpoint(_load_safetensors(path, map_location), path)
    try:
        ckpt = safe_torch_load(path, map_location, mmap)
    except Exception as exc:  # torch raises several types for a damaged or unsafe file
        raise CheckpointError(load_failure(path, exc)) from None
    return check_checkpoint(ckpt, path)


def load_stage_checkpoint(path, stage: str, map_location="cpu", mmap: bool = False) -> dict:
    """Loads a checkpoint and refuses one of another stage with one line saying what it got."""
    ckpt = load_checkpoint(path, map_location, mmap)
    got = ckpt.get("stage", ckpt["config"].get("stage"))
    if got != stage:
        raise CheckpointError(f"{path} is a '{got}' checkpoint, but a '{stage}' checkpoint is expected here")
    return ckpt


# What sampling and a frozen model read from a checkpoint besides its weights.
_SAMPLING_KEYS = ("config", "stage", "step", "latent_stats")


def load_for_sampling(path, stage: str) -> dict:
    """The weights to sample with (EMA preferred) and the metadata beside them, read lazily.

    The file is memory-mapped, so only the pages of the tensors that are used are ever read: the optimizer
    state (twice the weights, with AdamW) and the raw weights stay on disk, instead of every rank of a
    multi-GPU job holding the whole checkpoint in host memory. The returned dict holds no reference to them;
    its "model" and "ema" name the same weights (mapped until copied into a model), its latent_stats are copies,
    so that nothing kept for a whole run (a LatentScaler) pins the mapping of the file.
    """
    ckpt = load_stage_checkpoint(path, stage, mmap=True)
    weights = model_weights(ckpt, prefer_ema=True)
    check_finite(weights, path, "weight")
    check_finite(ckpt.get("latent_stats") or {}, path, "latent statistic")
    kept = {key: ckpt[key] for key in _SAMPLING_KEYS if key in ckpt}
    stats = kept.get("latent_stats")
    if isinstance(stats, dict):
        kept["latent_stats"] = {key: value.clone() if torch.is_tensor(value) else value for key, value in stats.items()}
    return {**kept, "model": weights, "ema": weights}


def check_finite(tensors: dict, path, what: str) -> None:
    """Refuses a NaN or infinite value in any floating-point tensor of `tensors` in one line naming `path` and the
    tensor: a model with one samples NaN everywhere, which would be written as black videos."""
    for key, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: {what} '{key}' holds {count} non-finite value{'s' * (count != 1)} (NaN or "
                                  f"inf) of {tensor.numel()}; these weights cannot sample")


def model_weights(ckpt: dict, prefer_ema: bool = True) -> dict:
    """The weights to sample with: EMA when present and preferred, else the raw model."""
    state = ckpt["ema"] if prefer_ema and ckpt.get("ema") is not None else ckpt["model"]
    return strip_prefixes(state)


def check_weights_fit(module: torch.nn.Module, state: dict, path, what: str = "weights") -> None:
    """Refuses weights that do not fit `module` with one line that names `path` and the first tensor that is
    missing, unexpected or of another shape (load_state_dict's own error lists them all)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its {what} are not a state dict")
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"{path}: its {what} do not fit this model: tensor '{key}' is missing")
        got = state[key]
        if not torch.is_tensor(got) or tuple(got.shape) != tuple(tensor.shape):
            shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
            raise CheckpointError(f"{path}: its {what} do not fit this model: tensor '{key}' has shape {shape}, "
                                  f"the model expects {tuple(tensor.shape)}")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: its {what} do not fit this model: unexpected tensor '{unexpected[0]}'")


def load_weights(module: torch.nn.Module, state: dict, path, what: str = "weights") -> None:
    """module.load_state_dict(state), strict, after check_weights_fit."""
    check_weights_fit(module, state, path, what)
    module.load_state_dict(state)


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_fitting(build, state: dict, path, what: str, described_by: str = ""):
    """`build()`, the model a checkpoint's config describes, once a build of it on the meta device (no memory) shows
    that the checkpoint's weights fit it and that it fits in this machine's memory.

    A config that does not describe its weights (an edited export's metadata: another resolution, width or class
    count) would otherwise build a model of any size before load_weights could compare anything. `described_by`
    names the config keys that size what the weights do not show (its fixed positional tables)."""
    try:
        with torch.device("meta"):
            skeleton = build()
    except ValueError as exc:  # the model's own checks (divisibility, head counts) of the config's values
        raise CheckpointError(f"{path}: its config does not describe a model: {exc}") from None
    check_weights_fit(skeleton, state, path, what)
    size = sum(t.numel() * t.element_size() for t in [*skeleton.parameters(), *skeleton.buffers()])
    if size > memory_bytes():
        described = f" ({described_by})" if described_by else ""
        raise CheckpointError(f"{path}: the model its config describes{described} "
                              f"takes {size / 2**30:,.0f} GiB, more than this machine's {memory_bytes() / 2**30:,.0f} "
                              f"GiB of memory, for {sum(t.numel() for t in state.values()):,} weights: "
                              f"its config does not describe these weights")
    return build()


def weights_fingerprint(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes (16 hex digits): which weights these are, whatever
    file or folder they were copied to. The diffusion stages record their autoencoder's, and check it."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def step_checkpoints(ckpt_dir) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if STEP_FILE.match(p.name))


def prune_checkpoints(ckpt_dir, keep_last: int) -> None:
    """Keeps the newest `keep_last` step checkpoints (0 keeps all); `last.pt` is never touched (a hard link to a
    step file, it keeps the bytes when the step file's name is deleted)."""
    if keep_last <= 0:
        return
    for old in step_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)


def latest_checkpoint_in_run(run_dir) -> Optional[Path]:
    """`last.pt` if it is readable, else the newest readable step checkpoint (a crash may have hit last.pt)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    candidates = [ckpt_dir / "last.pt"] + list(reversed(step_checkpoints(ckpt_dir)))
    best, best_step = None, -1
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            step = int(safe_torch_load(candidate, mmap=True).get("step", -1))
        except Exception:  # an unreadable file is skipped: the next older one is the fallback
            continue
        if step > best_step:
            best, best_step = candidate, step
    return best


def find_run_dirs(results_dir, stage: str) -> list[Path]:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    runs = [p for p in results_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    runs = [p for p in runs if _run_stage(p) == stage]
    return sorted(runs, key=lambda p: p.stat().st_mtime)


def _run_stage(run_dir: Path) -> Optional[str]:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(run_dir / "config.yaml").get("stage")
    except Exception:  # a foreign or damaged config.yaml: not one of ours
        return None


def resolve_resume(resume: Optional[str], results_dir, stage: str, cfg=None,
                   notes: Optional[list] = None) -> Optional[Path]:
    """Maps `--resume` (a file, a run folder, or 'auto') to a checkpoint file, or None to start fresh.

    'auto' picks the newest run folder of this stage under results_dir (only `exp_name` when the config names
    one) that holds a readable checkpoint and, given `cfg`, whose settings match it (`resume_differences`);
    runs passed over are described in `notes`. It starts fresh when there is none, so a restarted job resumes
    by itself. A file or run folder given by name is refused, in one line, when its settings differ.
    """
    if not resume:
        return None
    if resume == "auto":
        exp_name = cfg.train.exp_name if cfg is not None else None
        runs = [Path(results_dir) / exp_name] if exp_name else list(reversed(find_run_dirs(results_dir, stage)))
        for run_dir in runs:
            found = latest_checkpoint_in_run(run_dir)
            if found is None:
                continue
            ckpt = load_stage_checkpoint(found, stage, mmap=True) if exp_name else _try_load(found, stage)
            differences = resume_differences(ckpt, cfg) if cfg is not None and ckpt else []
            if ckpt and not differences:
                return found
            if ckpt and all(d.startswith(VAE_DIFFERENCE) for d in differences):
                # The run this command would continue, but for the VAE's weights: starting another run beside it
                # would hide that the VAE changed under the same settings.
                raise CheckpointError(f"resume auto: {run_dir} was trained on another VAE's latents: "
                                      f"{differences[0]} (nothing was changed; pass the run's VAE, or "
                                      f"train.resume=null for a new run)")
            # An incompatible run (other data, model, autoencoder or text encoder) is never adopted, since it would
            # fail after loading, on every restart of a requeued job. Without --exp-name (scripts/slurm) a new run
            # starts, which later restarts continue; a named folder cannot hold a second run, so that is refused in
            # one line before anything is written: only the job's owner can tell which command is the right one.
            if ckpt and exp_name:
                raise CheckpointError(f"resume auto: {run_dir} holds a run whose settings differ from this command's: "
                                      f"{'; '.join(differences)} (nothing was changed)")
            if ckpt and notes is not None:
                notes.append(f"resume auto: not continuing {run_dir}: its settings differ ({'; '.join(differences)})")
        return None
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint_in_run(path)
        if found is None:
            raise CheckpointError(f"--resume {path}: no readable checkpoint in {path / 'checkpoints'}")
        path = found
    elif not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file or run folder")
    if is_safetensors(path):
        raise CheckpointError(f"--resume {path}: exported weights hold no optimizer state, step or RNG state to "
                              f"continue a run from; resume from the run's .pt checkpoint or its run folder")
    try:
        ckpt = load_stage_checkpoint(path, stage, mmap=True)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}") from None
    differences = resume_differences(ckpt, cfg) if cfg is not None else []
    if differences:
        raise CheckpointError(f"--resume {path}: this command's settings differ from the run's: "
                              f"{'; '.join(differences)} "
                              f"(a run continues with the settings it started with; nothing was changed)")
    return path


def _try_load(path: Path, stage: str) -> Optional[dict]:
    try:
        return load_stage_checkpoint(path, stage, mmap=True)
    except CheckpointError:
        return None


# What a run learns, and from what: resuming with other values would load weights into another model, continue
# another data stream, or train a denoiser in another latent space. Everything else (optimiser, batch size,
# steps, logging, workers, mixed precision) may change on resume; TrainingRun.restore applies and logs it.
RUN_DEFINING_KEYS = ("mode", "model", "data.dataset_name", "data.data_path", "data.resolution", "data.n_frames",
                     "data.frame_stride", "data.split", "data.fold", "data.num_classes", "data.synthetic_size",
                     "diffusion.diffusion_steps", "diffusion.noise_schedule", "diffusion.loss_type")
RECORDED_KEYS = ("data.num_classes", "model.unet_config")  # filled in by the run, not by the command
FREE_KEYS = ("model.grad_checkpointing",)  # recomputation in the backward pass: the same model and numbers


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _comparable(key: str, value):
    if key == "model.output_squash" and value is None:
        return True  # an autoencoder checkpoint from before the key squashed its output (core.config.config_from_dict)
    if value is None:
        return None
    if key == "data.data_path":
        return os.path.realpath(os.path.expanduser(str(value)))
    if key == "data.dataset_name":
        return str(value).lower()
    return value


def resume_differences(ckpt: dict, cfg) -> list[str]:
    """'key: run value -> this command's value' for every run-defining setting that differs between a checkpoint
    and the config of the command that wants to continue it (empty: it may continue), the autoencoder included."""
    from omegaconf import OmegaConf

    new = _flat(OmegaConf.to_container(cfg, resolve=True))
    old = _flat(ckpt["config"])
    differences = []
    for key in sorted(set(old) | set(new)):
        if not any(key == k or key.startswith(k + ".") for k in RUN_DEFINING_KEYS) or key in FREE_KEYS:
            continue
        before, after = _comparable(key, old.get(key)), _comparable(key, new.get(key))
        if key in RECORDED_KEYS and (before is None or after is None):
            continue  # recorded by the run (its dataset, its pretrained UNet); a command without it asks for the same
        if before != after:
            differences.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    if "ae_ckpt" in new:
        difference = _autoencoder_difference(ckpt, new["ae_ckpt"])
        if difference:
            differences.append(difference)
    if "text.encoder" in new:
        difference = _text_encoder_difference(ckpt, new["text.encoder"])
        if difference:
            differences.append(difference)
    difference = vae_difference(old.get("vae"), old.get("vae_fingerprint"), new.get("vae"), new.get("vae_fingerprint"))
    if difference:
        differences.append(difference)
    return differences


VAE_DIFFERENCE = "VAE: "  # how a resume difference in the VAE's weights starts


def vae_difference(recorded_vae, recorded: Optional[str], given_vae, given: Optional[str]) -> Optional[str]:
    """A latent-mode run learned the latent space of one VAE: 'VAE: A (weights a) -> B (weights b), ...' when the
    fingerprints of its weights differ; None when they agree or one is unknown (a run from before VAEs were
    recorded: its users warn)."""
    if not recorded or not given or recorded == given:
        return None
    return f"{VAE_DIFFERENCE}{recorded_vae} (weights {recorded}) -> {given_vae} (weights {given}), another VAE"


_TEXT_FINGERPRINTS: dict = {}  # text encoder source -> its weights' fingerprint, once per process


def text_encoder_fingerprint(source: str) -> str:
    if source not in _TEXT_FINGERPRINTS:
        from models.text_encoder import load_text_encoder  # only text runs import transformers

        _TEXT_FINGERPRINTS[source] = weights_fingerprint(load_text_encoder(source).model.state_dict())
    return _TEXT_FINGERPRINTS[source]


def _text_encoder_difference(ckpt: dict, encoder: Optional[str]) -> Optional[str]:
    """A caption-conditioned run learned on its text encoder's tokens, a class-conditional one on class labels:
    resuming with another encoder, none, or one added would load its weights into another model. The encoder is
    compared by the fingerprint of its weights (a moved folder is the same encoder)."""
    text = ckpt["config"].get("text") or {}
    before = text.get("encoder") if isinstance(text, dict) else None
    if not before and not encoder:
        return None
    if not before or not encoder:
        kind = "class-conditional" if not before else "caption-conditioned"
        return f"text.encoder: {before} -> {encoder} (the run is {kind})"
    recorded = text.get("fingerprint")
    if not recorded:
        return None
    given = text_encoder_fingerprint(encoder)
    if given != recorded:
        return (f"text.encoder: {encoder}: its weights ({given}) are not those the run was trained with "
                f"({before}, weights {recorded})")
    return None


def _autoencoder_difference(ckpt: dict, ae_ckpt: str) -> Optional[str]:
    """A diffusion run's autoencoder is part of what it learned: its latent space. `ae_ckpt=auto` on resume means
    the run's own autoencoder; another file is compared by the fingerprint of its weights."""
    recorded_path = ckpt["config"].get("ae_ckpt")
    recorded = ckpt["config"].get("ae_fingerprint")
    if ae_ckpt == "auto" or not recorded:
        if ae_ckpt == "auto" or recorded_path in (None, "auto"):
            return None
        same = os.path.realpath(ae_ckpt) == os.path.realpath(recorded_path)
        return None if same else f"ae_ckpt: {recorded_path} -> {ae_ckpt}"
    given = weights_fingerprint(model_weights(load_for_sampling(ae_ckpt, "autoencoder")))
    if given != recorded:
        return (f"autoencoder: {recorded_path} (weights {recorded}) -> {ae_ckpt} (weights {given}), "
                f"another autoencoder")
    return None


def remove_temp_files(ckpt_dir) -> None:
    """Deletes temp files that killed saves left behind (each as large as a checkpoint)."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_dir():
        for stale in ckpt_dir.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
