"""The convolutional content UNet (models/conv_unet.py) and the image metrics that judge content frames."""

import pytest
import torch

from core.config import ConfigError, load_config
from evals.recon import high_frequency_energy, patch_grid_ratio
from models.content_unet import build_denoiser
from models.conv_unet import CONV_UNET_SIZES, ContentConvUNet, ConvUNet_models


NUM_CLASSES = 4


def tiny_unet(**kwargs) -> ContentConvUNet:
    options = dict(input_size=(16, 24), in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_levels=(1,), num_heads=2, num_classes=NUM_CLASSES, class_dropout_prob=0.1)
    options.update(kwargs)
    return ContentConvUNet(**options)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised layers make the output 0 whatever the input; random weights show what it depends on."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def test_registry_sizes_build_and_run_at_the_demo_and_paper_sizes():
    assert set(ConvUNet_models) == {f"ConvUNet-{size}" for size in CONV_UNET_SIZES}
    model = ConvUNet_models["ConvUNet-T"](input_size=(32, 32), num_classes=NUM_CLASSES)
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([3, 700]), torch.tensor([0, NUM_CLASSES]))  # the null label is a valid input
    assert out.shape == (2, 6, 32, 32)  # eps and the variance interpolation
    # Zero-initialised output convolution: a fresh model predicts zero, like the DiT's zero-initialised final layer.
    assert out.abs().max().item() == 0.0
    with torch.device("meta"):
        large = ConvUNet_models["ConvUNet-L"](input_size=(64, 64), num_classes=101)
    assert 100e6 < sum(p.numel() for p in large.parameters()) < 1e9


def test_output_depends_on_class_step_and_input_per_sample():
    model = perturbed(tiny_unet()).eval()
    x = torch.randn(2, 3, 16, 24)
    t, y = torch.tensor([10, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        reference = model(x, t, y)
        other_class = model(x, t, torch.tensor([2, 1]))
        other_step = model(x, t + 100, y)
        other_input = x.clone()
        other_input[0] += 1
        moved = model(other_input, t, y)
    assert (other_class[0] - reference[0]).abs().max() > 1e-3
    torch.testing.assert_close(other_class[1], reference[1])  # samples do not leak into each other
    assert (other_step - reference).abs().max() > 1e-3
    assert (moved[0] - reference[0]).abs().max() > 1e-3
    torch.testing.assert_close(moved[1], reference[1])


def test_text_conditioned_unet_takes_tokens_and_pools_them():
    model = perturbed(tiny_unet(text_shape=(5, 12))).eval()
    tokens = torch.randn(2, 5, 12)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 24), torch.tensor([1, 2]), tokens)
        null = model(torch.randn(2, 3, 16, 24), torch.tensor([1, 2]), model.y_embedder.null_like(tokens))
    assert out.shape == null.shape == (2, 6, 16, 24)


def test_tiny_unet_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_unet(learn_sigma=False, class_dropout_prob=0.0)
    x, target = torch.randn(4, 3, 16, 24), torch.randn(4, 3, 16, 24)
    t, y = torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(x, t, y), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # the first loss is ~E[target^2] = 1 (zero output)


def test_grad_checkpointing_matches_plain_backward():
    model = perturbed(tiny_unet(class_dropout_prob=0.0)).train()
    x, t, y = torch.randn(2, 3, 16, 24), torch.tensor([5, 50]), torch.tensor([1, 2])

    def run():
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    plain_out, plain_grads = run()
    model.grad_checkpointing = True
    checkpointed_out, checkpointed_grads = run()
    torch.testing.assert_close(checkpointed_out, plain_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)


def test_size_not_divisible_by_the_downsampling_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"not divisible by 2"):
        tiny_unet(input_size=(15, 24))
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"must have shape \(B, 3, 16, 24\)"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_config_selects_the_unet_for_content_only():
    cfg = load_config("content", "configs/tiny/content.yaml", ["model.name=ConvUNet-T", "ae_ckpt=x.pt"])
    model = build_denoiser("content", cfg.model, NUM_CLASSES, (3, 32, 32), (4, 8, 16))
    assert isinstance(model, ContentConvUNet)
    with pytest.raises(ConfigError, match="ConvUNet-T"):
        load_config("motion", "configs/tiny/motion.yaml", ["model.name=ConvUNet-T", "ae_ckpt=x.pt"])
    with pytest.raises(ConfigError, match="ConvUNet-T, ConvUNet-S"):  # the error lists the UNets beside the DiTs
        load_config("content", "configs/tiny/content.yaml", ["model.name=ConvUNet-X", "ae_ckpt=x.pt"])


# ---------------------------------------------------------------- image metrics


def test_patch_grid_ratio_is_one_without_a_grid_and_large_with_one():
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4), size=(32, 32), mode="bicubic",
                                             align_corners=False)
    assert patch_grid_ratio(smooth, 4) == pytest.approx(1.0, abs=0.15)
    blocky = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8), size=(32, 32), mode="nearest")
    blocky = blocky + 0.01 * torch.rand(2, 3, 32, 32)  # a little detail inside the patches
    assert patch_grid_ratio(blocky, 4) > 10
    with pytest.raises(ValueError, match="fewer than 2 x 2 patches"):
        patch_grid_ratio(torch.rand(1, 3, 6, 6), 4)


def test_high_frequency_energy_separates_a_dither_from_a_smooth_image():
    ramp = torch.linspace(-1, 1, 32).expand(1, 3, 32, 32)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float().expand(1, 3, 32, 32) * 2 - 1
    assert high_frequency_energy(ramp) < 1e-3
    assert high_frequency_energy(checker) > 0.5
