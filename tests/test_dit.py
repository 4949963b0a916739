"""Tests for the DiT denoisers: registries, shapes, conditioning, positions, label dropout, guidance, training."""

import pytest
import torch

import models.dit as dit
from diffusion.guidance import guided_model
from models.dit import (
    ContentDiT,
    ContentDiT_models,
    LabelEmbedder,
    MotionDiT,
    MotionDiT_models,
    build_dit,
    validate_model_name,
)
from models.layers import sincos_2d
from core.config import ConfigError, DiTModelConfig, load_config

NUM_CLASSES = 5
CONTENT_SHAPE = (3, 16, 24)  # (C, H, W): non-square on purpose
MOTION_SHAPE = (8, 8, 24)  # (D, T, H'+W'): non-square, D=8 as in the paper
KEY_CONTENT_SHAPE = (3, 16, 16)  # content frame the motion model is conditioned on

# Written out here rather than imported, so a wrong registry table fails the test.
EXPECTED_SIZES = {"T": (128, 4, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def tiny_content(**overrides) -> ContentDiT:
    kwargs = dict(
        input_size=CONTENT_SHAPE[1:], in_channels=CONTENT_SHAPE[0], patch_size=2, hidden_size=32,
        depth=2, num_heads=2, num_classes=NUM_CLASSES,
    )
    kwargs.update(overrides)
    return ContentDiT(**kwargs)


def tiny_motion(**overrides) -> MotionDiT:
    kwargs = dict(
        input_size=MOTION_SHAPE[1:], in_channels=MOTION_SHAPE[0], patch_size=2, hidden_size=32,
        depth=2, num_heads=2, num_classes=NUM_CLASSES, content_channels=KEY_CONTENT_SHAPE[0],
        content_size=KEY_CONTENT_SHAPE[1:], key_patch_size=4,
    )
    kwargs.update(overrides)
    return MotionDiT(**kwargs)


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Move every weight off its init, so zero-initialised adaLN/final layers no longer hide inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def batch(batch_size: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        content_x=torch.randn(batch_size, *CONTENT_SHAPE, generator=generator),
        motion_x=torch.randn(batch_size, *MOTION_SHAPE, generator=generator),
        key=torch.randn(batch_size, *KEY_CONTENT_SHAPE, generator=generator),
        t=torch.randint(0, 1000, (batch_size,), generator=generator),
        y=torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
    )


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


# ---------------------------------------------------------------- registries


def test_registries_hold_every_size_and_patch():
    expected_content = {f"ContentDiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    expected_content |= {"ContentDiT-T/2", "ContentDiT-T/4"}
    assert set(ContentDiT_models) == expected_content
    assert set(MotionDiT_models) == {name.replace("ContentDiT", "MotionDiT") for name in expected_content}


def _build_registry_entry(name: str):
    if name.startswith("ContentDiT"):
        return ContentDiT_models[name](
            input_size=CONTENT_SHAPE[1:], in_channels=CONTENT_SHAPE[0], num_classes=NUM_CLASSES
        )
    return MotionDiT_models[name](
        input_size=MOTION_SHAPE[1:], in_channels=MOTION_SHAPE[0], num_classes=NUM_CLASSES,
        content_channels=KEY_CONTENT_SHAPE[0], content_size=KEY_CONTENT_SHAPE[1:], key_patch_size=4,
    )


@pytest.mark.parametrize("name", sorted(ContentDiT_models) + sorted(MotionDiT_models))
def test_registry_entry_architecture_and_forward(name):
    size, patch = name.split("-", 1)[1].split("/")
    hidden, depth, heads = EXPECTED_SIZES[size]
    patch = int(patch)
    # Full-size variants are built on the meta device: shapes are checked, nothing is allocated.
    device = torch.device("cpu") if size == "T" else torch.device("meta")
    with device:
        model = _build_registry_entry(name)
        data = batch()
    assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (hidden, depth, heads, patch)
    assert len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert model.x_embedder.proj.kernel_size == (patch, patch)
    assert model.x_embedder.proj.out_channels == hidden

    model.eval()
    with device, torch.no_grad():
        if isinstance(model, MotionDiT):
            out = model(data["motion_x"], data["t"], data["y"], content=data["key"])
            expected_shape = (2, 2 * MOTION_SHAPE[0], *MOTION_SHAPE[1:])
        else:
            out = model(data["content_x"], data["t"], data["y"])
            expected_shape = (2, 2 * CONTENT_SHAPE[0], *CONTENT_SHAPE[1:])
    assert tuple(out.shape) == expected_shape
    assert out.device.type == device.type
    if device.type == "cpu":
        assert torch.isfinite(out).all()


def test_registry_name_fixes_the_architecture():
    with pytest.raises(TypeError):
        ContentDiT_models["ContentDiT-S/2"](hidden_size=64)


def test_paper_scale_parameter_counts():
    with torch.device("meta"):
        content = ContentDiT_models["ContentDiT-XL/2"](input_size=(64, 64), in_channels=3, num_classes=101)
        motion = MotionDiT_models["MotionDiT-L/2"](
            input_size=(16, 64), in_channels=8, num_classes=101, content_channels=3, content_size=(64, 64),
            key_patch_size=4,
        )
    # DiT-XL/2 is ~675M parameters; DiT-L/2 ~458M. Fixed sin-cos tables are buffers, not parameters.
    assert 660e6 < sum(p.numel() for p in content.parameters()) < 690e6
    assert 440e6 < sum(p.numel() for p in motion.parameters()) < 470e6


# ---------------------------------------------------------------- shapes and validation


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_forward_shapes_non_square_without_learned_sigma(patch_size):
    data = batch()
    content = tiny_content(patch_size=patch_size, learn_sigma=False).eval()
    assert content(data["content_x"], data["t"], data["y"]).shape == data["content_x"].shape
    motion = tiny_motion(patch_size=patch_size, learn_sigma=False, key_patch_size=patch_size).eval()
    assert motion(data["motion_x"], data["t"], data["y"], content=data["key"]).shape == data["motion_x"].shape


def test_input_not_divisible_by_patch_is_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"15x24 is not divisible by patch size 2") as error:
        tiny_content(input_size=(15, 24))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"content frame size 18x16 is not divisible by patch size 4"):
        tiny_motion(content_size=(18, 16))


def test_wrong_input_shape_at_forward_is_a_value_error():
    data = batch()
    model = tiny_content()
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 24\)"):
        model(data["content_x"][:, :, :8], data["t"], data["y"])
    motion = tiny_motion()
    with pytest.raises(ValueError, match="content frame"):
        motion(data["motion_x"], data["t"], data["y"], content=data["key"][:, :2])


# ---------------------------------------------------------------- conditioning


def test_zero_init_gives_zero_output_and_identity_blocks():
    data = batch()
    model = tiny_motion().eval()
    out = model(data["motion_x"], data["t"], data["y"], content=data["key"])
    assert out.abs().max().item() == 0.0
    tokens = torch.randn(2, 7, 32)
    conditioning = torch.randn(2, 32)
    assert torch.equal(model.blocks[0](tokens, conditioning), tokens)


def test_content_model_output_depends_on_class_and_step_per_sample():
    data = batch()
    model = perturb(tiny_content()).eval()
    with torch.no_grad():
        reference = model(data["content_x"], data["t"], data["y"])
        other_class = data["y"].clone()
        other_class[0] = (other_class[0] + 1) % NUM_CLASSES
        changed = model(data["content_x"], data["t"], other_class)
        other_step = model(data["content_x"], data["t"] + 100, data["y"])
    assert differs(changed[0], reference[0])
    torch.testing.assert_close(changed[1], reference[1])  # samples do not leak into each other
    assert differs(other_step, reference)


def test_motion_model_output_depends_on_class_content_and_step():
    data = batch()
    model = perturb(tiny_motion()).eval()
    with torch.no_grad():
        reference = model(data["motion_x"], data["t"], data["y"], content=data["key"])
        # NVlabs/CMD's motion model drops the class: only y changes here.
        only_class = model(data["motion_x"], data["t"], (data["y"] + 1) % NUM_CLASSES, content=data["key"])
        only_content = model(data["motion_x"], data["t"], data["y"], content=data["key"] + 0.5)
        only_step = model(data["motion_x"], data["t"] + 100, data["y"], content=data["key"])
    assert differs(only_class, reference)
    assert differs(only_content, reference)
    assert differs(only_step, reference)


# ---------------------------------------------------------------- positions


def test_position_embedding_fits_a_non_square_motion_grid():
    model = tiny_motion(input_size=(16, 64), content_size=(16, 16))
    grid_h, grid_w = 8, 32
    assert model.grid_size == (grid_h, grid_w)
    assert model.pos_embed.shape == (1, grid_h * grid_w, 32)
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(32, grid_h, grid_w))
    distances = torch.cdist(model.pos_embed[0], model.pos_embed[0])
    distances.fill_diagonal_(float("inf"))
    assert distances.min().item() > 1e-3  # every grid position gets its own embedding
    # Row-major: (row 1, col 2) and (row 2, col 1) are different tokens with different codes.
    assert differs(model.pos_embed[0, 1 * grid_w + 2], model.pos_embed[0, 2 * grid_w + 1])
    assert model.content_pos_embed.shape == (1, 4 * 4, 32)
    assert differs(model.token_type_embed[0], model.token_type_embed[1])


def test_model_is_not_blind_to_token_order():
    # A transformer without positions is shift-equivariant over patches; this one must not be.
    data = batch()
    model = perturb(tiny_content()).eval()
    patch = model.patch_size
    with torch.no_grad():
        out = model(data["content_x"], data["t"], data["y"])
        out_of_shifted = model(torch.roll(data["content_x"], patch, dims=-1), data["t"], data["y"])
    assert differs(out_of_shifted, torch.roll(out, patch, dims=-1))


# ---------------------------------------------------------------- label dropout


def test_label_dropout_rate_and_forced_drops():
    torch.manual_seed(0)
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.25)
    labels = torch.randint(0, 10, (20000,))
    embedder.train()
    dropped = embedder.token_drop(labels)
    null_fraction = (dropped == 10).float().mean().item()
    assert abs(null_fraction - 0.25) < 0.02
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])

    embedder.eval()
    assert torch.equal(embedder.token_drop(labels), labels)
    small = torch.tensor([3, 4, 5, 6])
    force = torch.tensor([1, 0, 1, 0])
    for mode in (True, False):
        embedder.train(mode)
        assert embedder.token_drop(small, force_drop_ids=force).tolist() == [10, 4, 10, 6]
    embedding = embedder(small, force_drop_ids=force)
    torch.testing.assert_close(embedding[0], embedder.embedding_table.weight[10])


def test_label_dropout_without_probability_keeps_a_null_row():
    embedder = LabelEmbedder(num_classes=4, hidden_size=8, dropout_prob=0.0).train()
    labels = torch.arange(4)
    assert torch.equal(embedder.token_drop(labels), labels)
    assert embedder(torch.tensor([4])).shape == (1, 8)  # null label usable for guidance


# ---------------------------------------------------------------- guidance


@pytest.mark.parametrize("stage", ["content", "motion"])
def test_guided_model_limits(stage):
    data = batch(batch_size=3)
    if stage == "content":
        model, x, cond = perturb(tiny_content()).eval(), data["content_x"], {}
    else:
        model, x, cond = perturb(tiny_motion()).eval(), data["motion_x"], {"content": data["key"]}
    channels = x.shape[1]
    null = torch.full_like(data["y"], NUM_CLASSES)
    with torch.no_grad():
        conditional = model(x, data["t"], data["y"], **cond)
        unconditional = model(x, data["t"], null, **cond)
        scale_one = guided_model(model, 1.0, null=model.num_classes)(x, data["t"], data["y"], **cond)
        scale_zero = guided_model(model, 0.0, null=model.num_classes)(x, data["t"], data["y"], **cond)
        scale_four = guided_model(model, 4.0, null=model.num_classes)(x, data["t"], data["y"], **cond)
    assert scale_one.shape == conditional.shape
    assert differs(conditional[:, :channels], unconditional[:, :channels])
    torch.testing.assert_close(scale_one, conditional, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scale_zero[:, :channels], unconditional[:, :channels], atol=1e-5, rtol=1e-5)
    expected_four = unconditional[:, :channels] + 4.0 * (conditional[:, :channels] - unconditional[:, :channels])
    torch.testing.assert_close(scale_four[:, :channels], expected_four, atol=1e-4, rtol=1e-4)
    # The learned variance comes from the conditional half.
    torch.testing.assert_close(scale_four[:, channels:], conditional[:, channels:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- training behaviour


def test_tiny_model_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_content(input_size=(16, 16), patch_size=4, learn_sigma=False, class_dropout_prob=0.0)
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([10, 200, 500, 900])
    y = torch.tensor([0, 1, 2, 3])
    target = torch.randn(4, 3, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x, t, y), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Zero-initialised output: the first loss is ~E[target^2] = 1; memorising the batch must cut it.
    assert losses[-1] < 0.5 * losses[0]


def test_grad_checkpointing_matches_plain_backward(monkeypatch):
    data = batch()
    model = perturb(tiny_motion(class_dropout_prob=0.0)).train()

    def run():
        model.zero_grad()
        out = model(data["motion_x"], data["t"], data["y"], content=data["key"])
        out.square().mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    calls = []
    real_checkpoint = dit.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(dit, "checkpoint", counting_checkpoint)
    plain_out, plain_grads = run()
    assert calls == []
    model.grad_checkpointing = True
    checkpointed_out, checkpointed_grads = run()
    assert calls == [False] * len(model.blocks)
    torch.testing.assert_close(checkpointed_out, plain_out)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)
    # No recomputation bookkeeping in eval mode or without grad.
    model.eval()
    with torch.no_grad():
        model(data["motion_x"], data["t"], data["y"], content=data["key"])
    assert len(calls) == len(model.blocks)


# ---------------------------------------------------------------- config-driven building


def test_build_dit_from_config_for_each_stage():
    content = build_dit(
        "content", DiTModelConfig(name="ContentDiT-T/2", learn_sigma=False), NUM_CLASSES,
        ae_content_shape=CONTENT_SHAPE, ae_motion_shape=MOTION_SHAPE,
    )
    assert isinstance(content, ContentDiT)
    assert (content.in_channels, content.input_size, content.out_channels) == (3, (16, 24), 3)
    assert content.num_classes == NUM_CLASSES

    motion = build_dit(
        "motion",
        DiTModelConfig(name="MotionDiT-T/4", key_patch_size=8, class_dropout_prob=0.2, grad_checkpointing=True),
        NUM_CLASSES, ae_content_shape=KEY_CONTENT_SHAPE, ae_motion_shape=MOTION_SHAPE,
    )
    assert isinstance(motion, MotionDiT)
    assert (motion.in_channels, motion.input_size, motion.out_channels) == (8, (8, 24), 16)
    assert (motion.content_size, motion.key_patch_size, motion.patch_size) == ((16, 16), 8, 4)
    assert motion.y_embedder.dropout_prob == 0.2 and motion.grad_checkpointing


def test_model_name_must_match_the_stage():
    assert validate_model_name("content", DiTModelConfig().name) == DiTModelConfig().name
    assert validate_model_name("motion", "MotionDiT-L/2") == "MotionDiT-L/2"
    with pytest.raises(ValueError, match="ContentDiT-XL/2") as error:
        build_dit("content", DiTModelConfig(name="MotionDiT-T/2"), NUM_CLASSES, CONTENT_SHAPE, MOTION_SHAPE)
    assert "MotionDiT-T/2" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="MotionDiT-S/2"):
        validate_model_name("motion", "ContentDiT-S/2")
    with pytest.raises(ValueError, match="'video'"):
        validate_model_name("video", "ContentDiT-S/2")


def test_feed_forward_block_keeps_the_checkpoint_layout_of_timms_mlp():
    """Checkpoints written when the blocks used timm's Mlp must still load: the same parameter names, shapes and
    creation order (so a seed builds the same weights), and the same function fc2(act(fc1(x)))."""
    from functools import partial

    from models.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(in_features=8, hidden_features=32, act_layer=partial(torch.nn.GELU, approximate="tanh"))
    shapes = {name: tuple(p.shape) for name, p in mlp.state_dict().items()}
    assert shapes == {"fc1.weight": (32, 8), "fc1.bias": (32,), "fc2.weight": (8, 32), "fc2.bias": (8,)}
    torch.manual_seed(0)
    first = torch.nn.Linear(8, 32)
    assert torch.equal(mlp.fc1.weight, first.weight)  # fc1 is created first, from the same random stream
    x = torch.randn(2, 5, 8)
    expected = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))
    assert torch.equal(mlp(x), expected)


def test_self_conditioned_content_dit_reads_the_estimate_and_defaults_to_zeros():
    torch.manual_seed(0)
    model = tiny_content(self_condition=True).eval()
    for parameter in model.parameters():  # past adaLN-Zero's zero output, so the input shows in the output
        torch.nn.init.normal_(parameter, std=0.1)
    x = torch.randn(2, *CONTENT_SHAPE)
    t, y = torch.tensor([3, 700]), torch.tensor([0, 4])
    with torch.no_grad():
        default = model(x, t, y)
        assert torch.equal(default, model(x, t, y, x_sc=torch.zeros_like(x)))  # no estimate = zeros
        assert not torch.allclose(default, model(x, t, y, x_sc=torch.randn_like(x)))
    with pytest.raises(ValueError, match="x_sc"):
        model(x, t, y, x_sc=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="without self_condition"):
        tiny_content()(x, t, y, x_sc=torch.zeros_like(x))
    built = build_dit("content", DiTModelConfig(name="ContentDiT-T/2", self_condition=True), NUM_CLASSES,
                      CONTENT_SHAPE, MOTION_SHAPE)
    assert built.self_condition and built.x_embedder.proj.in_channels == 2 * CONTENT_SHAPE[0]


@pytest.mark.parametrize("stage, name", [("motion", "MotionDiT-T/2"), ("content", "ConvUNet-T")])
def test_self_condition_is_refused_where_no_model_reads_it(stage, name):
    with pytest.raises(ConfigError, match="model.self_condition' is for content DiTs"):
        load_config(stage, f"configs/tiny/{stage}.yaml", [f"model.name={name}", "model.self_condition=true",
                                                         "ae_ckpt=x.pt"])
    assert load_config("content", "configs/tiny/content.yaml", ["model.self_condition=true", "ae_ckpt=x.pt"])
