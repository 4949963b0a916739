"""FLOPs per generated video (CMD vs a direct video DiT) and per training step, counted on the meta device.

    python -m benchmarks.flops                          # configs/ucf101 (paper settings)
    python -m benchmarks.flops --tiny                   # configs/tiny (seconds; what the tests run)
    python -m benchmarks.flops --config-dir DIR --json out.json
    python -m benchmarks.flops --table9 [--json out.json]   # paper's efficiency table, 512x1024x16, 50 steps

Counts come from torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; one
multiply-add = 2 FLOPs; elementwise ops are not counted). The models are built on the meta device,
so nothing is allocated or computed and the numbers do not depend on the machine. On the meta
device scaled_dot_product_attention decomposes into two batched matmuls that the counter sees; on
a real CPU tensor it runs a fused kernel the counter does not know, so CPU counts would miss the
attention (`sdpa_is_counted` checks this).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (`python benchmarks/flops.py`): the repo root is not on the import path then, so run
    # again as the module `benchmarks.flops` with the root on PYTHONPATH (the repo is not pip-installed).
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.flops", *sys.argv[1:]])

import argparse
import json
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.video_dit_baseline import build_video_dit_baseline
from diffusion import create_diffusion
from diffusion.guidance import guided_model
from models.ae_losses import AutoencoderLoss
from models.autoencoder import build_autoencoder
from models.dit import build_dit
from models.layers import Attention
from core.cli import HelpFormatter
from core.config import load_config
from sampling.generation import SAMPLING_PRESETS

META = torch.device("meta")
DEFAULT_CONFIG_DIR = "configs/ucf101"
TINY_CONFIG_DIR = "configs/tiny"
UCF101_CLASSES = 101
# Target of the issue: CMD needs at most 1/15 of the direct video DiT's FLOPs per video.
TARGET_RATIO = 1.0 / 15.0
# Paper Table 8: TFLOPs of one training step at batch 1 (latent mode, 512x512x16): AE, content, motion.
PAPER_TRAINING_TFLOPS = {"autoencoder": 0.77, "content": 0.34, "motion": 0.14}
# Paper, efficiency comparison: TFLOPs per 512x1024x16 video at 50 steps.
PAPER_VIDEO_TFLOPS = {"CMD": 46.8, "ModelScope": 939.0, "LVDM": 626.0}


def flops_by_op(fn: Callable[[], object]) -> Dict[str, int]:
    """FLOPs of everything `fn()` runs, per aten op ('aten.convolution', 'aten.addmm', 'aten.bmm', ...)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of everything `fn()` runs (forward and, if it calls it, backward)."""
    return sum(flops_by_op(fn).values())


def attention_flops(by_op: Dict[str, int]) -> int:
    """The attention matmuls (QK^T and AV) in a flops_by_op result: batched matmuls, which on the meta device is
    what scaled_dot_product_attention decomposes into (linear layers are mm/addmm, convolutions convolution)."""
    return sum(n for op, n in by_op.items() if "bmm" in op or "attention" in op)


def sdpa_is_counted(diffusers_attention: bool = False) -> bool:
    """True if attention on the meta device is counted as its two batched matmuls (QK^T and AV).

    diffusers_attention: check diffusers' Attention (its default processor calls scaled_dot_product_attention)
    instead of ours.
    """
    batch, tokens, dim, heads = 2, 16, 64, 4
    if diffusers_attention:
        from diffusers.models.attention_processor import Attention as DiffusersAttention
        with torch.device(META):
            attention = DiffusersAttention(dim, heads=heads, dim_head=dim // heads)
    else:
        attention = Attention(dim, heads).to(META)
    x = torch.empty(batch, tokens, dim, device=META)
    linear = 2 * batch * tokens * dim * (3 * dim) + 2 * batch * tokens * dim * dim  # qkv + output projection
    scores = 2 * 2 * batch * heads * tokens * tokens * (dim // heads)  # QK^T and AV
    with torch.no_grad():
        return count_flops(lambda: attention(x)) == linear + scores


# ---- configs and models -----------------------------------------------------------------------------------
def load_stage_configs(config_dir: str = DEFAULT_CONFIG_DIR, overrides: Optional[Dict[str, list]] = None) -> dict:
    """{'autoencoder', 'content', 'motion'} configs from <config_dir>/<stage>.yaml, ready to build models.

    Paths that only training reads (data path, autoencoder checkpoint) get placeholders, because the
    benchmarks build models from the configs and never touch data or checkpoints.
    """
    folder = Path(config_dir)
    if not folder.is_dir() and not folder.is_absolute():
        folder = Path(__file__).resolve().parents[1] / folder  # the repo's configs/, from any working folder
    placeholders = ["data.data_path=unused-by-benchmarks"]
    configs = {}
    for stage in ("autoencoder", "content", "motion"):
        path = folder / f"{stage}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        extra = [] if stage == "autoencoder" else ["ae_ckpt=unused-by-benchmarks"]
        configs[stage] = load_config(stage, str(path), placeholders + extra + list((overrides or {}).get(stage, [])))
    return configs


def num_classes_of(configs: dict) -> int:
    """The class count the configs train on: data.num_classes if set, else UCF-101's 101."""
    value = configs["content"].data.num_classes
    return int(value) if value is not None else UCF101_CLASSES


def build_models(configs: dict, device=META) -> dict:
    """The autoencoder, the content and motion DiTs and the video DiT baseline, on `device` (meta: no memory).

    Parameters are created on `device` directly (an XL model on the CPU first would cost GBs and seconds);
    buffers the constructors build from numpy start on the CPU and move with the final `.to`.
    """
    classes = num_classes_of(configs)
    with torch.device(device):
        ae = build_autoencoder(configs["autoencoder"].model, configs["autoencoder"].data)
        content = build_dit("content", configs["content"].model, classes, ae.content_shape, ae.motion_shape)
        motion = build_dit("motion", configs["motion"].model, classes, ae.content_shape, ae.motion_shape)
        baseline = build_video_dit_baseline(configs["content"].model.name, ae.clip_shape, classes,
                                            learn_sigma=bool(configs["content"].model.learn_sigma))
    return {name: model.to(device) for name, model in
            {"autoencoder": ae, "content": content, "motion": motion, "baseline": baseline}.items()}


def _labels(batch: int, device) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.long, device=device)


def _steps(batch: int, device) -> torch.Tensor:
    return torch.full((batch,), 500, dtype=torch.long, device=device)


def _denoiser_call_flops(model, shape, guided: bool, cond: Optional[dict] = None) -> int:
    """FLOPs of one sampling step for one video: the model once, or on the doubled batch when guided.

    Mirrors sampling.generation.sample_latents, where guidance (a scale other than 1) goes through guided_model;
    the scale's value does not change the FLOPs.
    """
    device = next(model.parameters()).device
    x = torch.zeros(1, *shape, device=device)
    fn = guided_model(model, 2.0, null=model.num_classes) if guided else model
    with torch.no_grad():
        return count_flops(lambda: fn(x, _steps(1, device), _labels(1, device), **(cond or {})))


# ---- per generated video -----------------------------------------------------------------------------------
def per_video_flops(configs: dict, models: Optional[dict] = None, steps: Optional[Dict[str, int]] = None) -> dict:
    """FLOPs to generate one video with CMD (content + motion sampling, one decode) and with the baseline.

    steps: {'content': n, 'motion': m} sampling steps per stage; default: the configs' diffusion.sample_steps.
    """
    models = models or build_models(configs)
    ae, content, motion, baseline = (models[k] for k in ("autoencoder", "content", "motion", "baseline"))
    for model in models.values():
        model.eval()
    device = next(ae.parameters()).device
    content_diffusion, motion_diffusion = configs["content"].diffusion, configs["motion"].diffusion
    z_c = torch.zeros(1, *ae.content_shape, device=device)
    z_m = torch.zeros(1, *ae.motion_shape, device=device)

    parts = {}
    for stage, model, shape, diffusion_cfg, cond in (
        ("content", content, ae.content_shape, content_diffusion, None),
        ("motion", motion, ae.motion_shape, motion_diffusion, {"content": z_c}),
    ):
        guided = float(diffusion_cfg.cfg_scale) != 1.0
        per_step = _denoiser_call_flops(model, shape, guided, cond)
        count = int((steps or {}).get(stage, diffusion_cfg.sample_steps))
        parts[stage] = {"model": configs[stage].model.name, "steps": count, "guided": guided, "per_step": per_step,
                        "total": per_step * count}
    with torch.no_grad():
        decode = count_flops(lambda: ae.decode(z_c, z_m))
    parts["decode"] = {"model": "CMD autoencoder decoder", "steps": 1, "guided": False, "per_step": decode,
                       "total": decode}
    cmd_total = sum(part["total"] for part in parts.values())

    # The baseline samples the pixel video directly, at the motion stage's step count, always guided.
    baseline_steps = int(motion_diffusion.sample_steps)
    baseline_per_step = _denoiser_call_flops(baseline, ae.clip_shape, guided=True)
    baseline_info = {"model": f"VideoDiT ({configs['content'].model.name} width/depth/patch, factorised space-time)",
                     "steps": baseline_steps, "guided": True, "per_step": baseline_per_step,
                     "total": baseline_per_step * baseline_steps}
    ratio = cmd_total / baseline_info["total"]
    return {"clip_shape": list(ae.clip_shape), "cmd": parts, "cmd_total": cmd_total, "baseline": baseline_info,
            "ratio": ratio, "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO}


# ---- per training step -------------------------------------------------------------------------------------
def training_step_flops(configs: dict, models: Optional[dict] = None, batch_size: int = 1) -> dict:
    """FLOPs of one training step (forward + backward) of each stage at `batch_size`.

    autoencoder: forward, L1 loss (LPIPS and the GAN excluded), backward.
    content:     the diffusion training loss of the content DiT, backward.
    motion:      the frozen autoencoder's encode (no grad) + the motion DiT's loss and backward.
    The optimizer update is elementwise, so it adds no counted FLOPs.
    """
    models = models or build_models(configs)
    ae, content, motion = models["autoencoder"], models["content"], models["motion"]
    device = next(ae.parameters()).device
    clips = torch.zeros(batch_size, *ae.clip_shape, device=device)
    loss_cfg = configs["autoencoder"].loss
    pixel_loss = AutoencoderLoss(l1_weight=float(loss_cfg.l1_weight), mse_weight=float(loss_cfg.mse_weight),
                              perceptual_weight=0.0, perceptual_frames=int(loss_cfg.perceptual_frames))

    def autoencoder_step():
        ae.train()
        x_hat, _, _ = ae(clips)
        loss, _ = pixel_loss(clips, x_hat, step=0)
        loss.backward()

    def diffusion_step(stage, model, x0, model_kwargs):
        diffusion_cfg = configs[stage].diffusion
        diffusion = create_diffusion(None, diffusion_cfg.noise_schedule, bool(configs[stage].model.learn_sigma),
                                     int(diffusion_cfg.diffusion_steps), diffusion_cfg.loss_type)
        model.train()
        losses = diffusion.training_losses(model, x0, _steps(batch_size, device), model_kwargs)
        losses["loss"].mean().backward()

    def content_step():
        z_c = torch.zeros(batch_size, *ae.content_shape, device=device)
        diffusion_step("content", content, z_c, {"y": _labels(batch_size, device)})

    def motion_encode():
        ae.eval()
        with torch.no_grad():
            return ae.encode(clips)

    def motion_step():
        z_c, z_m = motion_encode()
        diffusion_step("motion", motion, z_m, {"y": _labels(batch_size, device), "content": z_c})

    result = {
        "batch_size": batch_size,
        "autoencoder": count_flops(autoencoder_step),
        "content": count_flops(content_step),
        "motion": count_flops(motion_step),
        "motion_encode_part": count_flops(motion_encode),
    }
    for model in (ae, content, motion):
        model.zero_grad(set_to_none=True)
    return result


def compute_flops(config_dir: Optional[str] = None, tiny: bool = False) -> dict:
    """Everything the benchmark reports, as a dict (FLOPs as ints): 'per_video', 'training_step', checks."""
    config_dir = config_dir or (TINY_CONFIG_DIR if tiny else DEFAULT_CONFIG_DIR)
    configs = load_stage_configs(config_dir)
    models = build_models(configs)
    counted = sdpa_is_counted()
    if not counted:
        raise RuntimeError("FlopCounterMode does not count scaled_dot_product_attention on the meta device in this "
                           "torch version; the FLOPs would miss attention")
    return {"config_dir": str(config_dir), "sdpa_counted": counted, "torch": torch.__version__,
            "per_video": per_video_flops(configs, models), "presets": preset_flops(configs, models),
            "training_step": training_step_flops(configs, models)}


def preset_flops(configs: dict, models: dict) -> dict:
    """CMD FLOPs per video for each of sample.py's presets (sampling.generation.SAMPLING_PRESETS), with the ratio
    to the 'ddim' preset (DDIM 50 content / 100 motion); guidance as in the configs."""
    presets = {}
    for name, options in SAMPLING_PRESETS.items():
        steps = {stage: options[stage].steps for stage in ("content", "motion")}
        presets[name] = {"samplers": {stage: options[stage].sampler for stage in steps}, "steps": steps,
                         "total": per_video_flops(configs, models, steps)["cmd_total"]}
    for preset in presets.values():
        preset["ddim_over_this"] = presets["ddim"]["total"] / preset["total"]
    return presets


# ---- paper Table 9: 512x1024x16, 50 steps, latent mode -------------------------------------------------------
# Published diffusers configs (each checkpoint's config.json); keys left out equal diffusers' class defaults there.
SD21_UNET = dict(  # stabilityai/stable-diffusion-2-1 unet/
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True, sample_size=96,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
MODELSCOPE_UNET = dict(  # damo-vilab/text-to-video-ms-1.7b unet/
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024, attention_head_dim=64,
    sample_size=32, down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3)
SD_VAE = dict(  # the SD VAE (stable-diffusion-2-1 vae/; ModelScope decodes with the same architecture)
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=768,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# The CMD autoencoder in latent mode: configs/ucf101's model settings on 4-channel VAE latents of 512x1024x16.
TABLE9_AE_OVERRIDES = ["model.channels=4", "data.resolution=[64,128]", "data.n_frames=16"]


def _table9_part(model: str, steps: int, guided: bool, run: Callable[[int], object]) -> dict:
    """One row: run(batch) calls the model once on `batch` samples; guided = one call on the doubled batch per step.

    paper_convention: what the paper's numbers match (see format_table9): multiply-adds (FLOPs / 2) of the
    convolutions and linear layers only, one unguided call per step.
    """
    with torch.no_grad():
        plain = flops_by_op(lambda: run(1))
        counted = flops_by_op(lambda: run(2)) if guided else plain
    per_step, unguided = sum(counted.values()), sum(plain.values())
    return {"model": model, "steps": steps, "guided": guided, "per_step": per_step,
            "attention_per_step": attention_flops(counted), "total": per_step * steps, "unguided_per_step": unguided,
            "paper_convention": (unguided - attention_flops(plain)) // 2 * steps}


def table9_flops(config_dir: str = DEFAULT_CONFIG_DIR, ae_overrides=TABLE9_AE_OVERRIDES, sd_unet: dict = SD21_UNET,
                 video_unet: dict = MODELSCOPE_UNET, vae: dict = SD_VAE, steps: int = 50, guided: bool = True,
                 text_tokens: int = 77) -> dict:
    """FLOPs per video of the paper's efficiency table (512x1024x16 in latent mode, `steps` sampling steps).

    CMD: the SD UNet generates the latent content frame (text context text_tokens x cross_attention_dim), our motion
    DiT (<config_dir>/motion.yaml) the motion latent, our autoencoder (<config_dir>/autoencoder.yaml + ae_overrides,
    which fix the latent clip) decodes them, the SD VAE decodes the 16 latent frames. ModelScope: a UNet3D on the
    latent clip, the same VAE decode. guided: classifier-free guidance, each denoiser on the doubled batch.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel

    configs = load_stage_configs(config_dir, {"autoencoder": list(ae_overrides)})
    models = build_models(configs)
    ae, motion = models["autoencoder"].eval(), models["motion"].eval()
    with torch.device(META):
        image_unet, video_unet_model = UNet2DConditionModel(**sd_unet), UNet3DConditionModel(**video_unet)
        vae_model = AutoencoderKL(**vae)
    channels, frames, height, width = ae.clip_shape

    def z(batch, *shape):
        return torch.zeros(batch, *shape, device=META)

    def unet_run(unet, shape):
        return lambda b: unet(z(b, *shape), _steps(b, META), z(b, text_tokens, unet.config.cross_attention_dim))

    vae_row = _table9_part("SD VAE decoder (AutoencoderKL)", 1, False,
                           lambda _: vae_model.decode(z(frames, channels, height, width)))
    motion_cfg = configs["motion"].model
    cmd = {
        "content": _table9_part("SD 2.1 UNet2DCondition", steps, guided, unet_run(image_unet, ae.content_shape)),
        "motion": _table9_part(f"{motion_cfg.name}, key patch {motion_cfg.key_patch_size}", steps, guided,
                               lambda b: motion(z(b, *ae.motion_shape), _steps(b, META), _labels(b, META),
                                                content=z(b, *ae.content_shape))),
        "decode": _table9_part("CMD autoencoder decoder", 1, False,
                               lambda _: ae.decode(z(1, *ae.content_shape), z(1, *ae.motion_shape))),
        "vae_decode": vae_row,
    }
    modelscope = {"unet": _table9_part("ModelScope UNet3DCondition", steps, guided,
                                       unet_run(video_unet_model, ae.clip_shape)), "vae_decode": vae_row}
    cmd_total, modelscope_total = (sum(p["total"] for p in parts.values()) for parts in (cmd, modelscope))
    # The paper's numbers leave the SD VAE decode out (format_table9 shows why); its own decoder is CMD's.
    convention = {name: sum(p["paper_convention"] for key, p in parts.items() if key != "vae_decode")
                  for name, parts in (("CMD", cmd), ("ModelScope", modelscope))}
    scale = 2 ** (len(vae_model.config.block_out_channels) - 1)  # the VAE's upsampling per side
    return {"config_dir": str(config_dir), "latent_clip_shape": list(ae.clip_shape),
            "video_shape": [frames, height * scale, width * scale], "steps": steps, "guided": guided,
            "text_tokens": text_tokens, "torch": torch.__version__,
            "sdpa_counted": {"ours": sdpa_is_counted(), "diffusers": sdpa_is_counted(diffusers_attention=True)},
            "cmd": cmd, "cmd_total": cmd_total, "modelscope": modelscope, "modelscope_total": modelscope_total,
            "ratio": modelscope_total / cmd_total, "paper_convention": convention, "paper": PAPER_VIDEO_TFLOPS}


def _gap_sentence(name: str, parts: dict, total: int, convention: int, unit: float) -> str:
    """Why a total is off the paper's, from its parts: guidance, attention, the VAE decode, FLOPs vs MACs."""
    paper = PAPER_VIDEO_TFLOPS[name] * 1e12
    guidance = sum((p["per_step"] - p["unguided_per_step"]) * p["steps"] for p in parts.values())
    attention = sum(p["attention_per_step"] * p["steps"] for p in parts.values())
    vae = parts["vae_decode"]["total"]
    return (f"{name}: {total / unit:.1f} is {total / paper:.1f}x the paper's {paper / 1e12:g} TFLOPs, of which "
            f"guidance's second batch half is {guidance / unit:.1f}, attention matmuls {attention / unit:.1f} and the "
            f"SD VAE decode {vae / unit:.1f}, all counted at 2 FLOPs per multiply-add; counted the way the paper's "
            f"numbers match (one unguided call per step, multiply-adds of convolutions and linear layers only, no SD "
            f"VAE decode; adding it would give {(convention + parts['vae_decode']['paper_convention']) / unit:.1f}) "
            f"it is {convention / unit:.1f}, {convention / paper - 1:+.1%} from the paper.")


def format_table9(result: dict) -> str:
    unit_name, unit = ("TFLOPs", 1e12) if result["modelscope_total"] >= 1e12 else ("GFLOPs", 1e9)
    macs = unit_name.replace("FLOPs", "MACs")
    rows = [(f"{name} {key.replace('_', ' ')}", part) for name in ("CMD", "ModelScope")
            for key, part in result[name.lower()].items()]
    lines = [f"Paper Table 9 counted (FlopCounterMode on the meta device; latent clip "
             f"{'x'.join(map(str, result['latent_clip_shape']))} (C x T x H x W) of a "
             f"{'x'.join(map(str, result['video_shape']))} (T x H x W) video; "
             f"{result['steps']} steps; text context {result['text_tokens']} tokens; attention counted: "
             f"{result['sdpa_counted']})", "",
             f"| part | model | steps | guided (2x batch) | {unit_name} per step | of which attention | "
             f"{unit_name} per video | paper convention {macs} per video |", "|---|---|---|---|---|---|---|---|"]
    for name, part in rows:
        convention = f"{part['paper_convention'] / unit:.2f}"
        lines.append(f"| {name} | {part['model']} | {part['steps']} | {part['guided']} | "
                     f"{part['per_step'] / unit:.3f} | {part['attention_per_step'] / unit:.3f} | "
                     f"{part['total'] / unit:.2f} | "
                     f"{convention + ' (left out)' if name.endswith('vae decode') else convention} |")
    conv, paper = result["paper_convention"], PAPER_VIDEO_TFLOPS
    lines += ["", "| | ours, " + unit_name + " | paper convention, " + macs + " | paper, TFLOPs |", "|---|---|---|---|",
              f"| CMD total | {result['cmd_total'] / unit:.1f} | {conv['CMD'] / unit:.1f} | {paper['CMD']} |",
              f"| ModelScope total | {result['modelscope_total'] / unit:.1f} | {conv['ModelScope'] / unit:.1f} | "
              f"{paper['ModelScope']} |",
              f"| ModelScope / CMD | {result['ratio']:.1f}x | {conv['ModelScope'] / conv['CMD']:.1f}x | "
              f"{paper['ModelScope'] / paper['CMD']:.1f}x |", ""]
    for name in ("CMD", "ModelScope"):
        total = result[f"{name.lower()}_total"]
        if abs(total / (paper[name] * 1e12) - 1) > 0.2:
            lines.append(_gap_sentence(name, result[name.lower()], total, conv[name], unit))
    vae = result["cmd"]["vae_decode"]["total"]
    if abs(result["ratio"] / (paper["ModelScope"] / paper["CMD"]) - 1) > 0.2:
        lines.append(f"Ratio: the SD VAE decode ({vae / unit:.1f}) is the same in both and "
                     f"{vae / result['cmd_total']:.0%} of CMD's total; without it ModelScope / CMD is "
                     f"{(result['modelscope_total'] - vae) / (result['cmd_total'] - vae):.1f}x.")
    return "\n".join(lines)


# ---- report ------------------------------------------------------------------------------------------------
def _scaled(flops: float, unit: float) -> str:
    return f"{flops / unit:.3f}"


def explain_gap(per_video: dict) -> str:
    """Why CMD misses the 1/15 target: which part dominates its FLOPs, and what that part costs per step."""
    parts = per_video["cmd"]
    biggest = max(parts, key=lambda name: parts[name]["total"])
    share = parts[biggest]["total"] / per_video["cmd_total"]
    return (f"target missed: CMD/baseline = 1/{1 / per_video['ratio']:.1f} > 1/15. The {biggest} part "
            f"({parts[biggest]['model']}, {parts[biggest]['steps']} steps, guided={parts[biggest]['guided']}) "
            f"is {share:.0%} of CMD's FLOPs; fewer steps or a smaller {biggest} model close the gap.")


def format_report(result: dict) -> str:
    video, train = result["per_video"], result["training_step"]
    # Tiny configs need GFLOPs to show anything but zeros; paper scale reads best in TFLOPs like the paper.
    unit_name, unit = ("TFLOPs", 1e12) if video["baseline"]["total"] >= 1e12 else ("GFLOPs", 1e9)

    def _tflops(flops: float) -> str:
        return _scaled(flops, unit)

    lines = [f"FLOPs (FlopCounterMode on the meta device; configs {result['config_dir']}; "
             f"clip {'x'.join(map(str, video['clip_shape']))} (C x T x H x W); "
             f"attention counted: {result['sdpa_counted']})",
             "", "Per generated video", "",
             f"| part | model | steps | guided (2x batch) | {unit_name} per step | {unit_name} per video |",
             "|---|---|---|---|---|---|"]
    for name, part in video["cmd"].items():
        lines.append(f"| CMD {name} | {part['model']} | {part['steps']} | {part['guided']} | "
                     f"{_tflops(part['per_step'])} | {_tflops(part['total'])} |")
    lines.append(f"| **CMD total** | | | | | **{_tflops(video['cmd_total'])}** |")
    base = video["baseline"]
    lines.append(f"| direct video DiT | {base['model']} | {base['steps']} | {base['guided']} | "
                 f"{_tflops(base['per_step'])} | **{_tflops(base['total'])}** |")
    lines += ["", f"CMD / baseline = {video['ratio']:.4f} (1/{1 / video['ratio']:.1f}); target <= 1/15: "
              f"{'met' if video['target_met'] else 'MISSED'}. Paper (512x1024x16, 50 steps): CMD "
              f"{PAPER_VIDEO_TFLOPS['CMD']} vs ModelScope {PAPER_VIDEO_TFLOPS['ModelScope']} TFLOPs (1/20.1)."]
    if not video["target_met"]:
        lines.append(explain_gap(video))
    lines += ["", "Sampling presets (sample.py --preset; guidance as in the configs)", "",
              f"| preset | content | motion | {unit_name} per video | FLOPs of ddim / this |", "|---|---|---|---|---|"]
    for name, preset in result["presets"].items():
        lines.append(f"| {name} | {preset['samplers']['content']} {preset['steps']['content']} | "
                     f"{preset['samplers']['motion']} {preset['steps']['motion']} | {_tflops(preset['total'])} | "
                     f"{preset['ddim_over_this']:.2f}x |")
    fast = result["presets"]["fast"]
    lines += ["", f"fast preset: {fast['ddim_over_this']:.2f}x fewer FLOPs per video than DDIM 50/100 (target >= 2.5x)"]
    stages = ("autoencoder", "content", "motion")
    ours = {stage: train[stage] for stage in stages}
    lines += ["", f"Per training step (batch {train['batch_size']}, forward + backward; AE loss without LPIPS; "
              f"motion includes the frozen AE encode of {_tflops(train['motion_encode_part'])} {unit_name})", "",
              f"| stage | {unit_name} | ratio to AE | paper Table 8 TFLOPs (512x512 latent) | paper ratio to AE |",
              "|---|---|---|---|---|"]
    for stage in stages:
        lines.append(f"| {stage} | {_tflops(ours[stage])} | {ours[stage] / ours['autoencoder']:.2f} | "
                     f"{PAPER_TRAINING_TFLOPS[stage]} | "
                     f"{PAPER_TRAINING_TFLOPS[stage] / PAPER_TRAINING_TFLOPS['autoencoder']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="FLOPs per generated video and per training step (meta device).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config-dir", default=None,
                        help=f"folder with the three stage YAMLs (default: {DEFAULT_CONFIG_DIR})")
    parser.add_argument("--tiny", action="store_true", help=f"use {TINY_CONFIG_DIR} (unless --config-dir is given)")
    parser.add_argument("--table9", action="store_true", help="the paper's efficiency table (512x1024x16, 50 steps): "
                        "CMD in latent mode (SD 2.1 UNet + our motion DiT and decoder) vs a ModelScope UNet3D")
    parser.add_argument("--json", default=None, help="also write the result dict to this file")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.table9:
        result = table9_flops(args.config_dir or DEFAULT_CONFIG_DIR)
        report(format_table9(result), result, args.json)
        return result
    result = compute_flops(args.config_dir, tiny=args.tiny)
    report(format_report(result), result, args.json)
    return result


def report(text: str, result: dict, json_path: Optional[str]) -> None:
    """Prints a benchmark's report; writes its result dict to `json_path` as well when one is given."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
