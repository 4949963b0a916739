"""benchmarks.flops --table9: the paper's efficiency table (512x1024x16, 50 steps) counted on the meta device."""
import json

import pytest
import torch

from benchmarks import flops

diffusers = pytest.importorskip("diffusers")

# Small diffusers configs of the same kinds (a few seconds on the meta device).
TINY_UNET2D = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_UNET3D = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                   up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_AE = ["model.channels=4", "data.resolution=[16,32]", "data.n_frames=8"]


def tiny_table9(guided):
    return flops.table9_flops(flops.TINY_CONFIG_DIR, TINY_AE, TINY_UNET2D, TINY_UNET3D, TINY_VAE, steps=4,
                              guided=guided, text_tokens=8)


@pytest.fixture(scope="module")
def published():
    return flops.table9_flops()


@pytest.fixture(scope="module")
def tiny():
    return {guided: tiny_table9(guided) for guided in (False, True)}


def _denoisers(result):
    return [result["cmd"]["content"], result["cmd"]["motion"], result["modelscope"]["unet"]]


def test_diffusers_attention_is_counted_on_meta():
    assert flops.sdpa_is_counted(diffusers_attention=True)
    assert flops.sdpa_is_counted()


def test_published_configs_totals(published):
    tera = 1e12
    assert published["latent_clip_shape"] == [4, 16, 64, 128]
    assert published["video_shape"] == [16, 512, 1024]
    assert published["sdpa_counted"] == {"ours": True, "diffusers": True}
    # Sane bands around what the counter gives (guided, 2 FLOPs per multiply-add, SD VAE decode included).
    assert 150 * tera < published["cmd_total"] < 600 * tera
    assert 2000 * tera < published["modelscope_total"] < 10000 * tera
    assert published["cmd_total"] < published["modelscope_total"]
    assert 8 < published["ratio"] < 25
    for name, parts in (("cmd", published["cmd"]), ("modelscope", published["modelscope"])):
        assert published[f"{name}_total"] == sum(part["total"] for part in parts.values())
    # Every part's attention is seen, and it is a fraction of the part.
    for part in [*published["cmd"].values(), published["modelscope"]["unet"]]:
        assert 0 < part["attention_per_step"] < part["per_step"]
    # The paper's numbers are reproduced within 20 % by its likely convention (unguided, multiply-adds of
    # convolutions and linear layers, no VAE decode).
    assert published["paper_convention"]["CMD"] == pytest.approx(46.8e12, rel=0.2)
    assert published["paper_convention"]["ModelScope"] == pytest.approx(939e12, rel=0.2)


def test_published_guided_steps_are_twice_unguided(published):
    for part in _denoisers(published):
        assert part["guided"] and part["steps"] == 50
        assert part["per_step"] == 2 * part["unguided_per_step"]
        assert part["total"] == part["per_step"] * 50


def test_vae_decode_part_equals_counting_it_directly(published):
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**flops.SD_VAE)
    with torch.no_grad():
        direct = flops.count_flops(lambda: vae.decode(torch.zeros(16, 4, 64, 128, device="meta")))
    assert published["cmd"]["vae_decode"]["per_step"] == direct
    assert published["modelscope"]["vae_decode"] == published["cmd"]["vae_decode"]


def test_published_report_compares_with_the_paper(published):
    text = flops.format_table9(published)
    assert "| CMD total |" in text and "| 46.8 |" in text and "| 939.0 |" in text and "| 20.1x |" in text
    # Both totals are more than 20 % off the paper's at the counter's convention: each gets its reason.
    assert text.count("the way the paper's numbers match") == 2
    assert "Ratio: the SD VAE decode" in text


def test_tiny_variant(tiny):
    plain, guided = tiny[False], tiny[True]
    assert plain["latent_clip_shape"] == [4, 8, 16, 32] and plain["video_shape"] == [8, 32, 64]
    for part in _denoisers(plain):
        assert not part["guided"] and part["per_step"] == part["unguided_per_step"]
    for plain_part, guided_part in zip(_denoisers(plain), _denoisers(guided)):
        assert guided_part["per_step"] == 2 * plain_part["per_step"] > 0
        assert guided_part["total"] == 4 * guided_part["per_step"]
    assert guided["cmd"]["decode"] == plain["cmd"]["decode"]
    assert plain["cmd_total"] < plain["modelscope_total"]
    assert "| CMD content |" in flops.format_table9(plain)


def test_cli_table9_json(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(flops, "table9_flops", lambda config_dir: tiny[True])
    out = tmp_path / "table9.json"
    flops.main(["--table9", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(tiny[True]))
    assert "ModelScope / CMD" in capsys.readouterr().out
