"""Speed switches change speed, not results; the FLOPs benchmark runs; the latent cache feeds the same latents."""
import signal
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import flops
from benchmarks.video_dit_baseline import build_video_dit_baseline
from diffusion import create_diffusion
from models.ae_losses import AutoencoderLoss
from models.autoencoder import CMDAutoencoder
from models.dit import ContentDiT, MotionDiT
from core.config import load_config
from core.distributed import DistInfo
from core.frozen_autoencoder import encode
from core.latent_cache import LatentEncoder, build_latent_cache
from training.optim import make_optimizer
from training.run import TrainingRun

TINY = "configs/tiny"


def tiny_autoencoder(grad_checkpointing=False):
    return CMDAutoencoder(n_frames=4, resolution=(16, 16), patch_size=4, hidden_size=32, depth=2, num_heads=4,
                          motion_dim=4, grad_checkpointing=grad_checkpointing)


def tiny_content(grad_checkpointing=False, depth=2, class_dropout_prob=0.1):
    return ContentDiT(input_size=(16, 16), in_channels=3, patch_size=4, hidden_size=32, depth=depth, num_heads=4,
                      num_classes=3, class_dropout_prob=class_dropout_prob, grad_checkpointing=grad_checkpointing)


def one_block_content_without_label_dropout():
    # Compiled code draws random numbers differently from eager code, so label dropout is off here;
    # one block keeps inductor's compile time (C++ kernels) short.
    return tiny_content(depth=1, class_dropout_prob=0.0)


def tiny_motion(grad_checkpointing=False):
    return MotionDiT(input_size=(4, 8), in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                     num_classes=3, content_size=(16, 16), key_patch_size=8, grad_checkpointing=grad_checkpointing)


def perturbed(model, seed=0):
    """Moves every parameter off its (often zero) init, so that outputs and gradients depend on all of them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def twin(build, **switch):
    """(model with the switch off, same weights with it on)."""
    torch.manual_seed(0)
    off = perturbed(build())
    on = build(**switch)
    on.load_state_dict(off.state_dict())
    return off, on


def gradients(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def dit_loss(model, x0, model_kwargs, seed=0):
    """The diffusion training loss with a fixed t, noise and label-dropout draw."""
    diffusion = create_diffusion(None)
    torch.manual_seed(seed)
    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],))
    noise = torch.randn_like(x0)
    return diffusion.training_losses(model, x0, t, model_kwargs, noise=noise)["loss"].mean()


def content_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1, {"y": torch.tensor([0, 2])}


def motion_batch():
    generator = torch.Generator().manual_seed(2)
    z_m = torch.rand(2, 4, 4, 8, generator=generator) * 2 - 1
    return z_m, {"y": torch.tensor([1, 2]), "content": torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1}


@pytest.fixture
def run_factory(tmp_path):
    """Builds TrainingRuns in tmp_path and restores the signal handlers they install (pytest owns SIGINT)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    runs = []

    def make(stage="content", overrides=()):
        base = ([f"train.results_dir={tmp_path}", "ae_ckpt=unused"] if stage != "autoencoder"
                else [f"train.results_dir={tmp_path}"])
        cfg = load_config(stage, f"{TINY}/{stage}.yaml", base + list(overrides))
        run = TrainingRun(cfg, stage=stage)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.finish()
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# ---- FLOPs benchmark -----------------------------------------------------------------------------------------
def test_flops_benchmark_on_tiny_configs():
    result = flops.compute_flops(tiny=True)
    video, train = result["per_video"], result["training_step"]
    assert result["sdpa_counted"]
    assert 0 < video["ratio"] < 1, video["ratio"]
    for part in video["cmd"].values():
        assert part["per_step"] > 0 and part["total"] == part["per_step"] * part["steps"]
    assert video["cmd_total"] == sum(part["total"] for part in video["cmd"].values())
    assert video["baseline"]["guided"] and video["baseline"]["steps"] == video["cmd"]["motion"]["steps"]
    # The motion step includes the frozen encoder; the AE step (encoder + decoder, forward + backward) costs most.
    assert train["motion"] > train["motion_encode_part"] > 0
    assert train["autoencoder"] > max(train["content"], train["motion"])
    assert "CMD / baseline" in flops.format_report(result)
    # Presets: the same per-step cost times each preset's step counts, plus one decode.
    parts = video["cmd"]
    for preset in result["presets"].values():
        steps = preset["steps"]
        expected = (parts["content"]["per_step"] * steps["content"] + parts["motion"]["per_step"] * steps["motion"]
                    + parts["decode"]["total"])
        assert preset["total"] == expected
    assert result["presets"]["ddim"]["steps"] == {"content": 50, "motion": 100}
    assert result["presets"]["fast"]["ddim_over_this"] >= 2.5  # the target for the default preset
    assert "fewer FLOPs per video than DDIM 50/100" in flops.format_report(result)


def test_attention_is_counted_on_the_meta_device():
    assert flops.sdpa_is_counted()


def test_guidance_doubles_the_sampling_step_flops():
    with torch.device("meta"):
        model = tiny_content()
    model = model.to("meta").eval()
    plain = flops._denoiser_call_flops(model, (3, 16, 16), guided=False)
    guided = flops._denoiser_call_flops(model, (3, 16, 16), guided=True)
    assert plain > 0 and guided == 2 * plain


def test_video_dit_baseline_denoises_whole_clips():
    model = build_video_dit_baseline("ContentDiT-T/4", (3, 4, 16, 16), num_classes=3)
    assert model.hidden_size == 128 and len(model.blocks) == 4 and model.patch_size == 4
    out = model(torch.zeros(2, 3, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.shape == (2, 6, 4, 16, 16)
    with pytest.raises(ValueError, match="ContentDiT"):
        build_video_dit_baseline("DiT-XL", (3, 4, 16, 16), num_classes=3)


# ---- model.grad_checkpointing -------------------------------------------------------------------------------
def test_grad_checkpointing_autoencoder_same_loss_and_gradients():
    off, on = twin(tiny_autoencoder, grad_checkpointing=True)
    x = torch.rand(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    loss_fn = AutoencoderLoss(l1_weight=1.0, perceptual_weight=0.0, perceptual_frames=1)
    losses = []
    for model in (off, on):
        model.train()
        loss, _ = loss_fn(x, model(x)[0], step=0)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for grad_off, grad_on in zip(gradients(off), gradients(on)):
        torch.testing.assert_close(grad_on, grad_off, rtol=1e-5, atol=1e-7)
    assert len(gradients(on)) == len(list(on.parameters()))


@pytest.mark.parametrize("build, batch", [(tiny_content, content_batch), (tiny_motion, motion_batch)],
                         ids=["content", "motion"])
def test_grad_checkpointing_dit_same_loss_and_gradients(build, batch):
    off, on = twin(build, grad_checkpointing=True)
    x0, kwargs = batch()
    losses = []
    for model in (off, on):
        model.train()
        loss = dit_loss(model, x0, kwargs)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for grad_off, grad_on in zip(gradients(off), gradients(on)):
        torch.testing.assert_close(grad_on, grad_off, rtol=1e-5, atol=1e-7)


# ---- optim.fused ---------------------------------------------------------------------------------------------
def _adamw_fused_on_cpu_supported():
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


@pytest.mark.skipif(not _adamw_fused_on_cpu_supported(), reason="this torch has no fused AdamW on CPU")
def test_fused_adamw_matches_foreach():
    """Both kernels do the same arithmetic on the same gradient stream (magnitudes from 1e-12, below Adam's eps, to 1).

    Tolerance from float32 rounding: each step rounds the update m / (sqrt(v) + eps) to a few ulps (no cancellation:
    both terms of the denominator are positive) and the parameter p - lr * update to one ulp of p, in either kernel.
    Over `steps` steps: |diff| <= steps * (2 ulp(p) + 2 * 8 ulp(lr * update)), i.e. rtol = 2 * steps * eps32 on the
    parameters and atol = 16 * steps * eps32 * lr on the updates (|update| <= ~1 + small for Adam).
    """
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    off = [p.clone().requires_grad_(True) for p in params]
    on = [p.clone().requires_grad_(True) for p in params]
    lr, steps = 1e-3, 3
    optimizers = [torch.optim.AdamW(off, lr=lr, weight_decay=0.01, foreach=True),
                  torch.optim.AdamW(on, lr=lr, weight_decay=0.01, fused=True)]
    for _ in range(steps):
        grads = [torch.randn(shape, generator=generator) * 10.0 ** -torch.randint(0, 13, shape, generator=generator)
                 for shape in shapes]
        for group, optimizer in zip((off, on), optimizers):
            for param, grad in zip(group, grads):
                param.grad = grad.clone()
            optimizer.step()
    eps32 = torch.finfo(torch.float32).eps
    for p_off, p_on, start in zip(off, on, params):
        assert not torch.equal(p_on, start)  # the steps moved the parameters
        torch.testing.assert_close(p_on, p_off, rtol=2 * steps * eps32, atol=16 * steps * eps32 * lr)


def test_optim_fused_switch_trains():
    torch.manual_seed(0)
    model = perturbed(tiny_content())
    cfg = SimpleNamespace(lr=3e-3, betas=[0.9, 0.999], weight_decay=0.0, fused=True)
    optimizer = make_optimizer(model.parameters(), cfg, torch.device("cpu"))
    x0, kwargs = content_batch()
    losses = []
    for _ in range(8):
        loss = dit_loss(model, x0, kwargs)  # same t and noise each step: the loss must fall
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---- train.compile (slow on CPU: one tiny model) --------------------------------------------------------------
def test_train_compile_switch_same_loss_and_trains(run_factory):
    """SLOW (~30-60 s on 2 CPU cores, inductor compiles C++ kernels): torch.compile through TrainingRun.wrap,
    train.compile=true."""
    run = run_factory("content", ["train.compile=true"])
    off, model = twin(one_block_content_without_label_dropout)
    compiled = run.wrap(model)
    assert compiled is not model and hasattr(compiled, "_orig_mod")
    x0, kwargs = content_batch()
    for m in (off, model):
        m.train()
    eager_loss = dit_loss(off, x0, kwargs)
    compiled_loss = dit_loss(compiled, x0, kwargs)
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-4, abs=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    compiled_loss.backward()
    grad_norm, stepped = run.clip_and_step(compiled, optimizer)
    assert stepped and torch.isfinite(grad_norm)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---- train.mixed_precision / train.tf32 ---------------------------------------------------------------------
def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    """The CUDA switch runs bf16 autocast; on CPU we can only check that bf16 math keeps the loss close."""
    torch.manual_seed(0)
    model = perturbed(tiny_motion()).train()
    x0, kwargs = motion_batch()
    fp32 = dit_loss(model, x0, kwargs).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = dit_loss(model, x0, kwargs).item()
    assert bf16 == pytest.approx(fp32, rel=5e-2)


def test_mixed_precision_switch_is_fp32_on_cpu(run_factory):
    run = run_factory("content", ["train.mixed_precision=bf16"])
    with run.autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast and TF32 are CUDA switches")
@pytest.mark.parametrize("enabled", [True, False])
def test_cuda_switches_follow_the_config(run_factory, enabled):
    precision = "bf16" if enabled else "no"
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        run = run_factory("content", [f"train.tf32={str(enabled).lower()}", f"train.mixed_precision={precision}"])
        assert torch.backends.cuda.matmul.allow_tf32 is enabled
        with run.autocast():
            assert torch.is_autocast_enabled("cuda") is enabled
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a CUDA device")
def test_diffusion_step_has_one_host_sync_at_most(run_factory):
    """The hot loop's only sync is run.clip_and_step's finiteness check (training/optim.py)."""
    from benchmarks.throughput import diffusion_step_fn

    run = run_factory("motion", ["train.log_every=1000"])
    ae = tiny_autoencoder().to(run.device).eval().requires_grad_(False)
    model = MotionDiT(input_size=ae.motion_shape[1:], in_channels=4, patch_size=2, hidden_size=32, depth=2,
                      num_heads=4, num_classes=3, content_size=(16, 16), key_patch_size=8).to(run.device)
    step = diffusion_step_fn(run, "motion", model, ae)
    batch = {"x": torch.rand(2, 3, 4, 16, 16).pin_memory(), "y": torch.tensor([0, 1]).pin_memory()}
    step(batch)  # warm-up: lazy allocations and table uploads happen once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


# ---- diffusion.latent_cache --------------------------------------------------------------------------------
class EpochDependentClips(torch.utils.data.Dataset):
    """Clips that differ per (index, epoch), like random clip starts, so a wrong slot mapping shows."""

    num_classes = 3

    def __len__(self):
        return 3

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        generator = torch.Generator().manual_seed(100 * index + epoch)
        return {"x": torch.rand(3, 4, 16, 16, generator=generator) * 2 - 1, "y": index % 3, "index": index}


def test_latent_cache_gives_the_same_latents_as_encoding(tmp_path):
    torch.manual_seed(0)
    ae = perturbed(tiny_autoencoder()).eval().requires_grad_(False)
    ae_path = tmp_path / "ae.pt"
    torch.save(ae.state_dict(), ae_path)
    data_cfg = {"dataset_name": "test", "resolution": [16, 16], "n_frames": 4, "num_workers": 0}
    build = dict(data_cfg=SimpleNamespace(num_workers=0, items=data_cfg.items), cache_root=tmp_path / "cache",
                 dist=DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
                 logger=SimpleNamespace(info=lambda message: None, warning=lambda message: None),
                 stop_requested=lambda: False, autocast=lambda: torch.autocast("cpu", enabled=False))
    dataset = EpochDependentClips()
    encoder = LatentEncoder.autoencoder(ae, ae_path)
    cache = build_latent_cache(encoder, dataset, clips_per_video=2, batch_size=2, **build)
    assert len(cache) == 6
    for slot in range(len(cache)):
        item = dataset[(slot % len(dataset), slot // len(dataset))]
        z_c, z_m = encode(ae, item["x"][None], torch.autocast("cpu", enabled=False))
        cached = cache[slot]
        torch.testing.assert_close(cached["z_c"], z_c[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached["z_m"], z_m[0], rtol=1e-5, atol=1e-6)
        assert cached["y"] == item["y"]
    # A second build with the same autoencoder and data reuses the files: it never reads the dataset.
    again = build_latent_cache(encoder, None, clips_per_video=2, batch_size=2, **build)
    np.testing.assert_array_equal(again.arrays["z_m"][:], cache.arrays["z_m"][:])


# ---- sampler quality benchmark -------------------------------------------------------------------------------
def test_sampler_quality_within_spread_rule_and_settings():
    from benchmarks.sampler_quality import settings_to_measure, within_spread

    def row(accuracy, accuracy_spread, frechet, frechet_spread):
        stats = {"accuracy": {"mean": accuracy, "spread": accuracy_spread},
                 "frechet": {"mean": frechet, "spread": frechet_spread}}
        return {f"{kind}_{metric}": stats[metric] for kind in ("generated", "motion_only") for metric in stats}

    ddim = row(0.40, 0.02, 400.0, 30.0)
    assert within_spread(row(0.38, 0.0, 430.0, 0.0), ddim)  # at the edges: mean - spread, mean + spread
    assert not within_spread(row(0.379, 0.0, 400.0, 0.0), ddim)
    assert not within_spread(row(0.50, 0.0, 430.1, 0.0), ddim)
    settings = settings_to_measure([10, 25])
    assert list(settings) == ["ddim", "dpm++2m 10/10", "dpm++2m 25/25"]
    assert settings["ddim"]["motion"].steps == 100 and settings["dpm++2m 25/25"]["content"].sampler == "dpm++2m"
