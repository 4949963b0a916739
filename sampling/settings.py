"""How a sample.py run samples: --preset's settings with the flags that override them, and the line that states
them."""
from __future__ import annotations

from dataclasses import dataclass

from sampling.generation import SAMPLING_PRESETS, SamplingOptions

DATASET_CLASSES = "dataset"  # --classes dataset: labels drawn by the training split's class frequencies


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
                               chosen.guidance_scale if scale is None else scale)

    return SampleSettings(stage("content"), stage("motion"), args.precision or preset.precision or "auto",
                          preset.labels if args.classes is None else args.classes)


def stage_options(args, stage: str) -> SamplingOptions:
    """The `stage`'s sampler, steps and guidance: --<stage>-sampler/-steps/-cfg-scale where given, else --preset's
    (a guidance of None: the checkpoint's)."""
    return getattr(resolve_settings(args), stage)


def protocol_line(args, models, settings: SampleSettings, precision: tuple, captions) -> str:
    """One line stating what this run samples with, for the record beside any number computed from its videos."""
    stages = [(name, denoiser) for name, denoiser in (("content", models.content), ("motion", models.motion))
              if denoiser is not None]
    parts = [f"{name} {d.sampler.method} {d.sampler.diffusion.num_timesteps} steps, guidance s={d.guidance_scale:g}"
             for name, d in stages]
    bf16, tf32 = precision
    arithmetic = "bf16 autocast" if bf16 else "tf32" if tf32 else "fp32"
    labels = ("prompts" if captions else "by class frequency" if settings.classes == DATASET_CLASSES
              else "every class round-robin" if not settings.classes else "given classes round-robin")
    return f"sampling: preset {args.preset}; {'; '.join(parts)}; {arithmetic}; labels {labels}"


def describe_presets() -> str:
    return "; ".join(f"'{name}': {preset.about}" for name, preset in SAMPLING_PRESETS.items())
