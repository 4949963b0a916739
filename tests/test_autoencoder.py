"""Tests of the CMD autoencoder (shapes, content frame, motion latent, overfitting) and its losses."""

import math

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from evals.recon import high_frequency_energy
from models.ae_losses import (AutoencoderLoss, build_ae_loss, build_lpips, content_detail_excess, fine_detail,
                              lpips_backbone_weights_path)
from models.autoencoder import CMDAutoencoder, build_autoencoder
from core.config import AutoencoderLossConfig, AutoencoderModelConfig, ConfigError, DataConfig, load_config
from tests.helpers.pickles import MakesAFolder

TINY = dict(hidden_size=32, depth=1, num_heads=2, motion_dim=4)


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny: one thread is faster, and far faster while other test runs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(n_frames=8, resolution=(16, 16), patch_size=2, **overrides):
    return CMDAutoencoder(n_frames=n_frames, resolution=resolution, patch_size=patch_size, **{**TINY, **overrides})


def random_clip(batch, model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *model.clip_shape), generator=generator) * 2 - 1


def psnr(x_hat, x):
    """PSNR in dB of [-1, 1] videos mapped to [0, 1]."""
    mse = (((x_hat - x) / 2) ** 2).mean().item()
    return 10 * math.log10(1.0 / mse)


def moving_squares(n_frames=8, size=16):
    """Two clips (2, 3, T, size, size): a 7x7 coloured square gliding over a horizontal ramp."""
    t = torch.arange(n_frames, dtype=torch.float32)[:, None, None]
    rows = torch.arange(size, dtype=torch.float32)[None, :, None]
    cols = torch.arange(size, dtype=torch.float32)[None, None, :]
    background = -0.4 + 0.3 * cols / size
    clips = []
    for (x0, y0), (vx, vy), colour in [((1, 3), (1.0, 0.5), (0.8, -0.6, 0.2)),
                                       ((10, 2), (-1.0, 1.0), (-0.7, 0.7, 0.5))]:
        inside = ((cols - x0 - vx * t).abs() <= 3) & ((rows - y0 - vy * t).abs() <= 3)
        clips.append(torch.stack([torch.where(inside, torch.tensor(c), background) for c in colour]))
    return torch.stack(clips)


@pytest.mark.parametrize(
    "n_frames, resolution, patch_size",
    [(8, (16, 16), 2), (8, (16, 24), 2), (4, (24, 16), 4), (6, (8, 32), 4)],
)
def test_shapes(n_frames, resolution, patch_size):
    torch.manual_seed(0)
    model = tiny_model(n_frames, resolution, patch_size)
    x = random_clip(2, model)
    x_hat, z_c, z_m = model(x)
    h, w = resolution
    grid_h, grid_w = h // patch_size, w // patch_size
    assert x_hat.shape == x.shape
    assert z_c.shape == (2, 3, h, w) and model.content_shape == (3, h, w)
    assert z_m.shape == (2, TINY["motion_dim"], n_frames, grid_w + grid_h)
    assert model.motion_shape == (TINY["motion_dim"], n_frames, grid_w + grid_h)
    assert model.decode(z_c, z_m).shape == x.shape


def test_motion_latent_halves_are_height_and_width_averages():
    """z_x (first W' entries) may depend only on columns' features, z_y only on rows', each centred over time."""
    torch.manual_seed(0)
    model = tiny_model(resolution=(8, 16)).eval()  # H'=4, W'=8
    x = random_clip(1, model)
    with torch.no_grad():
        features = model.encode_features(x)  # (B, T, H', W', hidden)
        _, z_m = model.encode(x)
    columns, rows = features.mean(dim=2), features.mean(dim=3)  # (B, T, W', hidden), (B, T, H', hidden)
    expected_x = torch.tanh(model.motion_head_x(columns - columns.mean(dim=1, keepdim=True))).permute(0, 3, 1, 2)
    expected_y = torch.tanh(model.motion_head_y(rows - rows.mean(dim=1, keepdim=True))).permute(0, 3, 1, 2)
    assert torch.allclose(z_m[..., :8], expected_x, atol=1e-6)
    assert torch.allclose(z_m[..., 8:], expected_y, atol=1e-6)


@pytest.mark.parametrize("content_logits", ["pixel", "token", "frame"])
def test_content_frame_starts_as_temporal_mean_and_stays_a_convex_combination(content_logits):
    torch.manual_seed(0)
    model = tiny_model(resolution=(16, 24), content_logits=content_logits)
    x = random_clip(2, model)
    z_c, _ = model.encode(x)
    assert torch.allclose(z_c, x.mean(dim=2), atol=1e-6)  # zero-initialised logit head

    # A large step towards the per-pixel maximum frame moves the logit head off zero.
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    target = x.amax(dim=2)
    ((model.encode(x)[0] - target) ** 2).mean().backward()
    optimizer.step()
    assert model.content_head.weight.abs().max() > 0

    with torch.no_grad():
        z_c, _ = model.encode(x)
    assert not torch.allclose(z_c, x.mean(dim=2), atol=1e-4)
    assert (z_c >= x.amin(dim=2) - 1e-5).all() and (z_c <= x.amax(dim=2) + 1e-5).all()


def test_token_content_logits_are_smooth_inside_a_patch():
    """'token' logits are bilinear upsamplings of one value per token: no pixel-level dither pattern is possible."""
    torch.manual_seed(0)
    model = tiny_model(resolution=(16, 16), patch_size=4, content_logits="token")
    torch.nn.init.normal_(model.content_head.weight, std=1.0)
    features = model.encode_features(random_clip(1, model))
    logits = model._content_logits(features)  # (1, C, T, 16, 16)
    assert logits.shape == (1, 3, model.n_frames, 16, 16)
    # Between two token centres (pixels 5.5 and 9.5) the map is linear: second differences at pixels 7 and 8 vanish
    # up to float32 rounding of values of size ~10.
    row = logits[0, 0, 0, 5]
    assert (row[6:8] - 2 * row[7:9] + row[8:10]).abs().max() < 1e-4
    assert (row[:-2] - 2 * row[1:-1] + row[2:]).abs().max() > 1e-2  # but not one straight line over the row
    with pytest.raises(ValueError, match="content_logits"):
        tiny_model(content_logits="per-channel")


def test_frame_content_logits_blend_whole_frames_and_smooth_no_more_than_the_frames():
    """'frame' weights are one per frame, shared by every pixel and channel: z_c = sum_t w_t x_t, so its fine detail
    (a convex quadratic of the image) is at most the frames' largest, whatever the weights."""
    torch.manual_seed(0)
    model = tiny_model(resolution=(16, 16), patch_size=4, content_logits="frame")
    torch.nn.init.normal_(model.content_head.weight, std=1.0)
    x = random_clip(2, model)
    features = model.encode_features(x)
    weights = torch.softmax(model.content_head(features.mean(dim=(2, 3))).squeeze(-1), dim=1)  # (B, T)
    with torch.no_grad():
        z_c, _ = model.encode(x)
    torch.testing.assert_close(z_c, torch.einsum("bt,bcthw->bchw", weights, x))
    assert weights.std(dim=1).min() > 1e-3  # not the temporal mean: the weights differ between frames
    for clip, content in zip(x, z_c):
        frames_detail = max(high_frequency_energy(clip[:, t : t + 1].transpose(0, 1)) for t in range(model.n_frames))
        assert high_frequency_energy(content[None]) <= frames_detail * (1 + 1e-6)


def test_conv_output_head_blends_neighbouring_patches():
    """With the linear head each output patch is a function of its own token alone (the patch grid shows); the
    3x3 convolution after un-patchifying lets a pixel at a patch border depend on the neighbouring token too."""
    torch.manual_seed(0)
    for head, depends in (("linear", False), ("conv", True)):
        model = tiny_model(resolution=(16, 16), patch_size=4, output_head=head)
        x_hat = model.decode(torch.zeros(1, 3, 16, 16), torch.zeros(1, *model.motion_shape))
        assert x_hat.shape == (1, 3, model.n_frames, 16, 16)
        if head == "conv":
            torch.nn.init.normal_(model.output_conv.weight, std=0.1)  # off its zero initialisation
        # Which tokens' projected values reach the border pixel (row 0, column 3) of patch (0, 0)?
        tokens = torch.zeros(1, model.n_frames, model.grid_h * model.grid_w, model.output_proj.out_features,
                             requires_grad=True)
        out = model._unpatchify(tokens)
        if head == "conv":
            out = model.output_conv(out[:, :, 0])
        out[..., 0, 3].sum().backward()
        neighbour = tokens.grad[0, 0, 1].abs().sum().item()  # token (0, 1): columns 4..7
        assert (neighbour > 0) == depends, head
    with pytest.raises(ValueError, match="output_head"):
        tiny_model(output_head="deconv")


def test_encoder_sees_frame_order():
    """Without positional information along time the encoder would be permutation-equivariant."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = random_clip(1, model)
    permutation = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    with torch.no_grad():
        _, z_m = model.encode(x)
        _, z_m_permuted = model.encode(x[:, :, permutation])
    assert (z_m_permuted - z_m[:, :, permutation]).abs().max() > 1e-3


def test_output_range_and_motion_latent_range():
    torch.manual_seed(0)
    model = tiny_model()
    # Push the output projection to large values so tanh, not luck, keeps x_hat inside [-1, 1].
    torch.nn.init.normal_(model.output_proj.weight, std=10.0)
    x_hat, _, z_m = model(random_clip(2, model) * 5)
    assert x_hat.abs().max() <= 1.0
    assert x_hat.abs().max() > 0.99  # the check above is not vacuous
    assert z_m.abs().max() < 1.0


def test_tiny_model_overfits_two_clips():
    torch.manual_seed(0)
    x = moving_squares()
    model = tiny_model()
    # Baseline: the best one can do knowing only each clip's mean frame (~19 dB on these clips).
    mean_frame_psnr = psnr(x.mean(dim=2, keepdim=True).expand_as(x), x)
    assert mean_frame_psnr < 22
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(200):
        x_hat, _, _ = model(x)
        # MSE is the objective PSNR measures; with it this model reaches 35-38 dB in 200 steps
        # over several seeds, so 30 dB (>10 dB above the mean-frame baseline, i.e. an error
        # ten times smaller in MSE) leaves margin while being impossible without using the
        # motion latent.
        loss = ((x_hat - x) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final_psnr = psnr(model(x)[0], x)
    assert final_psnr > 30.0, f"PSNR {final_psnr:.2f} dB after 200 steps (mean-frame baseline {mean_frame_psnr:.2f})"


def test_wrong_sizes_raise_one_line_value_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"clip of size \(3, 4, 16, 16\) does not match "
                                         r"the autoencoder's \(3, 8, 16, 16\)") as info:
        model(torch.zeros(1, 3, 4, 16, 16))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"\(3, 8, 16, 16\)"):
        model(torch.zeros(3, 8, 16, 16))  # missing batch axis
    z_c, z_m = model.encode(torch.zeros(1, *model.clip_shape))
    with pytest.raises(ValueError, match=r"content frame of size \(3, 16, 8\)"):
        model.decode(z_c[..., :8], z_m)
    with pytest.raises(ValueError, match=r"motion latent of size \(4, 8, 15\) does not match "
                                         r"the autoencoder's \(4, 8, 16\)"):
        model.decode(z_c, z_m[..., :15])
    with pytest.raises(ValueError, match="batch"):
        model.decode(z_c.expand(2, -1, -1, -1), z_m)
    with pytest.raises(ValueError, match=r"\(15, 16\).*patch_size 2"):
        tiny_model(resolution=(15, 16))


def test_grad_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    plain = tiny_model(depth=2)
    checkpointed = tiny_model(depth=2, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    # Give the zero-initialised heads weights so that every parameter receives a gradient.
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        torch.nn.init.normal_(model.output_proj.weight, std=0.02)
        torch.nn.init.normal_(model.content_head.weight, std=0.02)
    x = random_clip(2, plain)
    losses = []
    for model in (plain, checkpointed):
        x_hat, z_c, z_m = model(x)
        loss = (x_hat - x).abs().mean() + z_c.square().mean() + z_m.square().mean()
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, p_plain), (_, p_ckpt) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert p_plain.grad is not None, name
        assert torch.allclose(p_plain.grad, p_ckpt.grad, atol=1e-5), name


def test_build_autoencoder_from_dataclass_and_dictconfig():
    model_cfg = AutoencoderModelConfig(hidden_size=32, depth=1, num_heads=2, motion_dim=4, patch_size=4)
    data_cfg = DataConfig(resolution=[16, 24], n_frames=4)
    for model_source, data_source in [(model_cfg, data_cfg),
                                      (OmegaConf.structured(model_cfg), OmegaConf.structured(data_cfg))]:
        model = build_autoencoder(model_source, data_source)
        assert model.clip_shape == (3, 4, 16, 24)
        assert model.motion_shape == (4, 4, 6 + 4)


# ---------------------------------------------------------------- losses


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return build_lpips("vgg", random_backbone=True)


def test_lpips_random_backbone_is_zero_on_identical_inputs(random_lpips):
    assert not any(p.requires_grad for p in random_lpips.parameters())
    assert not random_lpips.training
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = torch.rand(2, 3, 32, 32) * 2 - 1
    assert random_lpips(a, a).abs().max() < 1e-6
    assert (random_lpips(a, b) > 0).all()


def test_lpips_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        build_lpips("vgg", weights_path=str(missing))
    message = str(info.value)
    assert str(missing) in message and "\n" not in message and "perceptual_weight=0" in message
    assert lpips_backbone_weights_path("vgg").endswith("vgg16-397923af.pth")
    with pytest.raises(ValueError, match="'resnet'"):
        build_lpips("resnet", random_backbone=True)


@pytest.mark.parametrize("content", ["pickled object", "garbage"])
def test_lpips_weights_that_are_not_plain_tensors_are_one_line(tmp_path, content):
    """torch's weights-only refusal spans many lines and advises weights_only=False; ours names the file."""
    weights_file, marker = tmp_path / "vgg16.pth", tmp_path / "ran"
    if content == "garbage":
        weights_file.write_bytes(b"\0" * 64)
    else:
        torch.save({"features.0.weight": MakesAFolder(marker)}, weights_file)
    with pytest.raises(ValueError) as info:
        build_lpips("vgg", weights_path=str(weights_file))
    message = str(info.value)
    assert message.startswith(f"LPIPS backbone weights file {weights_file} ") and "\n" not in message, message
    expected = "is not a plain weights file: " + ("its pickle does not read as tensors and plain values (Unsupported "
                                                  "operand 0)" if content == "garbage" else "it holds a pickled object "
                                                  "(posix.mkdir)")
    assert expected in message and "weights_only=False" not in message, message
    assert not marker.exists()


def test_lpips_loads_a_torchvision_vgg16_state_dict(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None)
    weights_file = tmp_path / "vgg16.pth"
    try:
        torch.save(reference.state_dict(), weights_file)  # the layout of torchvision's released file
        model = build_lpips("vgg", weights_path=str(weights_file))
    finally:
        weights_file.unlink()  # ~550 MB: do not leave it in pytest's kept temp folders
    # Every trunk layer now holds the reference's tensors, so its features match torchvision's.
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference.features[:30](image)
        got = model.net.slice5(model.net.slice4(model.net.slice3(model.net.slice2(model.net.slice1(image)))))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


def test_loss_l1_and_lpips_terms(random_lpips):
    torch.manual_seed(0)
    loss_module = AutoencoderLoss(l1_weight=2.0, perceptual_weight=0.5, perceptual_frames=2, lpips_module=random_lpips)
    loss_module.train()
    assert not random_lpips.training  # its dropout must stay off while the loss module trains
    x = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    loss, logs = loss_module(x, x, step=0)
    assert float(loss) < 1e-6
    x_hat = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    loss, logs = loss_module(x, x_hat, step=0)
    l1 = (x_hat - x).abs().mean().detach()
    assert float(logs["l1"]) == pytest.approx(float(l1), rel=1e-5)
    assert float(logs["lpips"]) > 0
    assert float(logs["loss"]) == pytest.approx(2.0 * float(l1) + 0.5 * float(logs["lpips"]), rel=1e-5)
    loss.backward()
    assert x_hat.grad.abs().sum() > 0


def test_loss_mse_term_and_weight_checks():
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    x_hat = x + 0.1 * torch.randn_like(x)
    loss, logs = AutoencoderLoss(l1_weight=0.5, perceptual_weight=0.0, perceptual_frames=1, mse_weight=3.0)(x, x_hat, 0)
    mse, l1 = (x_hat - x).pow(2).mean(), (x_hat - x).abs().mean()
    assert float(logs["mse"]) == pytest.approx(float(mse), rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * float(l1) + 3.0 * float(mse), rel=1e-5)
    with pytest.raises(ValueError, match="l1_weight=0.0 and loss.mse_weight=0.0"):
        AutoencoderLoss(l1_weight=0.0, perceptual_weight=0.0, perceptual_frames=1)


def test_build_ae_loss_without_perceptual_term_needs_no_lpips():
    cfg = OmegaConf.structured(
        AutoencoderLossConfig(perceptual_weight=0.0, l1_weight=1.0, lpips_weights="/nonexistent"))
    loss_module = build_ae_loss(cfg, channels=4)
    assert loss_module.lpips is None and loss_module.discriminator is None
    x = torch.zeros(1, 4, 2, 8, 8)
    loss, logs = loss_module(x, x + 0.5, step=0)
    assert float(logs["loss"]) == pytest.approx(0.5)
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        build_ae_loss(OmegaConf.structured(AutoencoderLossConfig(lpips_weights="/nonexistent")), channels=3)


def test_discriminator_trains_and_adversarial_term_switches_on_at_disc_start():
    torch.manual_seed(0)
    model = tiny_model()
    loss_module = AutoencoderLoss(l1_weight=1.0, perceptual_weight=0.0, perceptual_frames=1, disc_weight=0.5,
                                  disc_start=5)
    x = random_clip(2, model)

    # Before disc_start: no adversarial term, discriminator loss is a constant 0.
    x_hat, _, _ = model(x)
    loss, logs = loss_module(x, x_hat, step=4, last_layer=model.last_layer())
    assert "gan" not in logs and float(logs["loss"]) == pytest.approx(float(logs["l1"]))
    disc_loss, _ = loss_module.discriminator_loss(x, x_hat, step=4)
    assert float(disc_loss) == 0.0 and not disc_loss.requires_grad
    assert not loss_module.discriminator_active(4) and loss_module.discriminator_active(5)

    # From disc_start: the generator loss includes the weighted adversarial term.
    torch.nn.init.normal_(model.output_proj.weight, std=0.02)  # so the adaptive weight's gradients are nonzero
    x_hat, _, _ = model(x)
    loss, logs = loss_module(x, x_hat, step=5, last_layer=model.last_layer())
    assert float(logs["gan_weight"]) > 0 and float(logs["gan"]) != 0
    assert float(logs["loss"]) == pytest.approx(float(logs["l1"]) + float(logs["gan_weight"]) * float(logs["gan"]),
                                                rel=1e-5)
    loss.backward()
    assert model.output_proj.weight.grad.abs().sum() > 0

    # The discriminator learns: its parameters move and it separates real from fake.
    discriminator = loss_module.discriminator
    before = [p.detach().clone() for p in discriminator.parameters()]
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    fake = x_hat.detach()
    first_loss = None
    for _ in range(5):
        optimizer.zero_grad()
        disc_loss, disc_logs = loss_module.discriminator_loss(x, fake, step=5)
        first_loss = float(disc_logs["disc_loss"]) if first_loss is None else first_loss
        disc_loss.backward()
        optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, discriminator.parameters()))
    assert float(loss_module.discriminator_loss(x, fake, step=5)[1]["disc_loss"]) < first_loss


def test_motion_health_flags_a_constant_motion_latent():
    """Zeroed motion heads give every clip the same z_m = tanh(bias): the warning must say so, with the numbers."""
    from evals.recon import motion_health, motion_warning

    torch.manual_seed(0)
    model = tiny_model().eval()
    torch.nn.init.normal_(model.output_proj.weight, std=0.05)  # a decoder whose output does depend on z_m
    x = random_clip(4, model)
    with torch.no_grad():
        healthy = {k: float(v.mean()) for k, v in motion_health(model, x).items()}
        for head in (model.motion_head_x, model.motion_head_y):
            head.weight.zero_()
            head.bias.fill_(3.0)  # tanh(3) = 0.995: saturated as well
        collapsed = {k: float(v.mean()) for k, v in motion_health(model, x).items()}
    assert healthy["zm_spread"] > 0.01 and abs(healthy["swap_gap"]) > 0
    assert collapsed["zm_spread"] == 0.0 and collapsed["swap_gap"] == 0.0 and collapsed["zm_saturated"] == 1.0
    assert collapsed["psnr_temporal_mean"] == pytest.approx(healthy["psnr_temporal_mean"])  # a property of the clips
    warning = motion_warning(collapsed)
    assert "spread 0.0000" in warning and "100% of z_m entries are saturated" in warning and "gap 0.00 dB" in warning
    assert motion_warning({**collapsed, "zm_spread": 0.3, "zm_saturated": 0.0, "swap_gap": 4.0}) is None



def smooth_clip(batch, model, seed=0):
    """Clips whose frames are flat colours (one per frame and channel) plus one shared horizontal ramp: smooth
    frames that differ over time, so per-pixel weights can dither between them."""
    generator = torch.Generator().manual_seed(seed)
    b, (c, t, h, w) = batch, model.clip_shape
    colours = torch.rand((b, c, t, 1, 1), generator=generator) * 1.2 - 0.6
    return colours + 0.3 * torch.linspace(-1, 1, w).expand(b, c, t, h, w)


def test_content_detail_excess_is_zero_for_blends_of_the_frames_and_positive_for_a_dither():
    """fine_detail is a convex quadratic of the image, so a blend of the frames with weights shared by all pixels
    (the temporal mean, any one frame) has no more detail than the frames have on average: no excess. A frame picked
    per pixel in a checkerboard has detail that no frame has, all of it excess."""
    x = smooth_clip(2, tiny_model())
    frames_detail = fine_detail(x.transpose(1, 2).flatten(0, 1)).reshape(2, -1).mean(dim=1)
    # Equal in exact arithmetic here (every frame has the ramp's detail); float32 rounding of means over 768 squares
    # stays far below 100 epsilon of the value.
    assert torch.all(content_detail_excess(x, x.mean(dim=2)) <= 1e-5 * frames_detail)
    assert torch.all(content_detail_excess(x, x[:, :, 3]) <= 1e-5 * frames_detail)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).bool()  # (H, W)
    dithered = torch.where(checker, x[:, :, 0], x[:, :, 1])
    excess = content_detail_excess(x, dithered)
    torch.testing.assert_close(excess, fine_detail(dithered) - frames_detail)
    assert torch.all(excess > 10 * frames_detail)  # colours 0.1-1.2 apart switch at every pixel


def test_loss_content_detail_term_and_its_checks():
    x = smooth_clip(2, tiny_model())
    x_hat = x + 0.1 * torch.randn_like(x)
    dithered = torch.where(torch.rand(16, 16) < 0.5, x[:, :, 0], x[:, :, 1])
    loss_module = AutoencoderLoss(l1_weight=0.0, perceptual_weight=0.0, perceptual_frames=1, mse_weight=1.0,
                                  content_detail_weight=3.0)
    loss, logs = loss_module(x, x_hat, 0, content=dithered)
    excess = float(content_detail_excess(x, dithered).mean())
    assert excess > 0 and float(logs["content_detail"]) == pytest.approx(excess, rel=1e-5)
    assert float(loss) == pytest.approx(float(logs["mse"]) + 3.0 * excess, rel=1e-5)
    assert float(logs["rec"]) == pytest.approx(float(logs["mse"]), rel=1e-5)  # the reconstruction alone
    with pytest.raises(ValueError, match="content=z_c"):
        loss_module(x, x_hat, 0)
    # Off (the default), the term costs nothing: neither computed nor added.
    off = AutoencoderLoss(l1_weight=0.0, perceptual_weight=0.0, perceptual_frames=1, mse_weight=1.0)
    loss, logs = off(x, x_hat, 0, content=dithered)
    assert float(loss) == pytest.approx(float(logs["mse"]), rel=1e-6) and "content_detail" not in logs
    with pytest.raises(ValueError, match="content_detail_weight=-1.0"):
        AutoencoderLoss(l1_weight=1.0, perceptual_weight=0.0, perceptual_frames=1, content_detail_weight=-1.0)


def test_content_detail_weight_config_key_is_validated_and_reaches_the_loss():
    tiny = "configs/tiny/autoencoder.yaml"
    with pytest.raises(ConfigError, match="loss.content_detail_weight' must be non-negative, got -0.5"):
        load_config("autoencoder", tiny, ["loss.content_detail_weight=-0.5"])
    assert build_ae_loss(load_config("autoencoder", tiny).loss, channels=3).content_detail_weight == 0.0
    cfg = load_config("autoencoder", tiny, ["loss.content_detail_weight=2"])
    assert build_ae_loss(cfg.loss, channels=3).content_detail_weight == 2.0


def test_content_detail_term_alone_smooths_per_pixel_content_weights():
    """Per-pixel logits start random (a dither over smooth frames); Adam steps on the detail term alone (the
    reconstruction is exact, so it adds nothing) move the weights until the content frame is about as smooth as its
    frames."""
    torch.manual_seed(0)
    model = tiny_model(resolution=(16, 16), patch_size=4)
    torch.nn.init.normal_(model.content_head.weight, std=1.0)
    x = smooth_clip(4, model)
    loss_module = AutoencoderLoss(l1_weight=0.0, perceptual_weight=0.0, perceptual_frames=1, mse_weight=1.0,
                                  content_detail_weight=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    excesses = []
    for step in range(30):
        z_c, _ = model.encode(x)
        loss, logs = loss_module(x, x, step, content=z_c)
        excesses.append(float(logs["content_detail"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frames_detail = high_frequency_energy(x.transpose(1, 2).flatten(0, 1))
    assert excesses[0] > 2 * frames_detail  # the random logits dither
    assert excesses[-1] < 0.1 * excesses[0]
