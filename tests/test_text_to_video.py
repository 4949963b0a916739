"""Text-to-video (the paper's WebVid setting): captions through a frozen CLIP text encoder condition both diffusion
models; sample.py takes prompts. A tiny random CLIP (scripts/make_tiny_sd.py), nothing downloaded."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusion.guidance import cfg_combine, guided_model
from evals.synthetic_quality import _read_npz
from models.content_unet import ContentUNet
from models.dit import ContentDiT, MotionDiT, TextEmbedder
from models.text_encoder import CaptionTable, TextEncoderLoadError, load_text_encoder
from sampling.requests import prompt_noise_ids, prompt_slug
from scripts.make_tiny_sd import TINY_TEXT, TINY_UNET, make_tiny_clip
from tests.helpers.processes import run_python
from core.checkpoint import load_checkpoint
from core.text_cache import caption_table
from sampling.media import captioned_rows

pytestmark = pytest.mark.slow  # trains or launches scripts for minutes: scheduled first (conftest.py)

F32 = torch.finfo(torch.float32).eps
L, D = TINY_TEXT["max_position_embeddings"], TINY_TEXT["hidden_size"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    return load_text_encoder(str(tiny_clip))


def test_text_encoder_gives_fixed_size_tokens_that_tell_captions_apart(encoder, tiny_clip, tmp_path):
    assert encoder.shape == (L, D)
    captions = ["a red disc moving left", "a red disc moving right", "", "a red disc moving left"]
    tokens = encoder(captions)
    assert tokens.shape == (4, L, D) and tokens.dtype == torch.float32
    assert torch.equal(tokens[0], tokens[3])  # deterministic: a cache of it is well defined
    # The tokens before the differing word agree (causal attention); from it on they differ.
    ids = encoder.tokenizer(captions[:2]).input_ids
    first = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    torch.testing.assert_close(tokens[0, :first], tokens[1, :first], rtol=0, atol=0)
    assert (tokens[0, first] - tokens[1, first]).abs().max() > 1e-2
    assert encoder.tokenizer.convert_ids_to_tokens(ids[0])[1:4] == ["a</w>", "red</w>", "disc</w>"]  # whole words
    # Chunked calls give the same tokens as one call.
    encoder.chunk = 1
    try:
        torch.testing.assert_close(encoder(captions), tokens, rtol=0, atol=10 * F32 * tokens.abs().max().item())
    finally:
        encoder.chunk = 256
    # The folder holding text_encoder/ and tokenizer/ (a pipeline's layout), or the model folder with no tokenizer.
    with pytest.raises(TextEncoderLoadError) as err:
        load_text_encoder(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TextEncoderLoadError, match="tokenizer"):
        load_text_encoder(str(tiny_clip / "text_encoder"))


def test_caption_table_encodes_each_distinct_caption_once(encoder):
    calls = []
    original = encoder.forward

    def counting(captions):
        calls.append(list(captions))
        return original(captions)

    encoder.forward = counting
    try:
        table = CaptionTable(encoder, "cpu")
        table.add(["a square moving up", "a disc moving up", "a square moving up"])
        out = table(["a disc moving up", "a square moving up", "a triangle moving down"])
        again = table(["a triangle moving down"])
    finally:
        del encoder.forward
    assert calls == [["a square moving up", "a disc moving up"], ["a triangle moving down"]]
    direct = encoder(["a disc moving up", "a square moving up", "a triangle moving down"])
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    torch.testing.assert_close(again[0], direct[2], rtol=0, atol=0)
    restored = CaptionTable(encoder, "cpu")
    restored.load_state_dict(table.state_dict())
    torch.testing.assert_close(restored(["a disc moving up"]), direct[:1], rtol=0, atol=0)


def test_caption_table_is_kept_with_the_latent_cache_and_keyed_by_the_encoder(encoder, tmp_path):
    logs = []
    dist, logger = SimpleNamespace(device=torch.device("cpu"), is_main=True), SimpleNamespace(info=logs.append)
    captions = ["a disc moving up", "a square moving up", "a disc moving up"]
    first = caption_table(encoder, captions, dist, logger, tmp_path / "latent_cache", "abc")
    (saved,) = (tmp_path / "latent_cache").glob("text-*.pt")
    assert len(first) == 2 and "encoding 2 distinct captions" in logs[-1]
    again = caption_table(encoder, list(reversed(captions)), dist, logger, tmp_path / "latent_cache", "abc")
    assert len(again) == 2 and "reusing" in logs[-1]
    torch.testing.assert_close(again(captions), first(captions), rtol=0, atol=0)
    # Another encoder's weights: encoded again, into another file.
    caption_table(encoder, captions, dist, logger, tmp_path / "latent_cache", "def")
    assert "encoding" in logs[-1] and len(list((tmp_path / "latent_cache").glob("text-*.pt"))) == 2
    assert saved.is_file()


def test_text_embedder_drops_captions_to_the_empty_prompt_and_pools_for_adaln():
    torch.manual_seed(0)
    embedder = TextEmbedder((L, D), dropout_prob=0.5, hidden_size=24)
    embedder.null_tokens.copy_(torch.randn(L, D))
    tokens = torch.randn(6, L, D)
    drop = torch.tensor([1, 0, 1, 0, 0, 1])
    dropped = embedder.token_drop(tokens, drop)
    assert torch.equal(dropped[drop == 1], embedder.null_tokens.expand(3, L, D))
    assert torch.equal(dropped[drop == 0], tokens[drop == 0])
    embedder.train()
    torch.manual_seed(1)
    rate = (embedder.token_drop(torch.randn(4000, L, D)) == embedder.null_tokens).all(dim=(1, 2)).float().mean()
    assert abs(rate.item() - 0.5) < 4 * (0.25 / 4000) ** 0.5  # four standard errors of a Bernoulli(0.5) mean
    embedder.eval()
    assert torch.equal(embedder.token_drop(tokens), tokens)  # no dropout at sampling
    out = embedder(tokens)
    assert out.shape == (6, 24)
    # Pooled against the empty prompt: the null condition reaches the MLP as zeros, whatever the pooling weights.
    mlp = embedder.pool["mlp"]
    torch.testing.assert_close(embedder(embedder.null_like(tokens[:1])), mlp(torch.zeros(1, 4 * D)), rtol=0, atol=0)
    assert "null_tokens" in embedder.state_dict()  # checkpoints carry the empty prompt they were trained with
    with pytest.raises(ValueError, match=r"\(B, 16, 32\)"):
        embedder(torch.randn(2, L, D + 1))


@pytest.mark.parametrize("stage", ["content", "motion"])
def test_dits_condition_on_text_and_guidance_uses_the_empty_prompt(stage):
    torch.manual_seed(0)
    common = dict(hidden_size=32, depth=1, num_heads=2, num_classes=4, text_shape=(L, D))
    if stage == "content":
        model = ContentDiT(input_size=(8, 8), in_channels=3, patch_size=4, **common)
        x, cond = torch.randn(2, 3, 8, 8), {}
    else:
        model = MotionDiT(input_size=(4, 8), in_channels=2, patch_size=2, content_size=(8, 8), key_patch_size=4,
                          **common)
        x, cond = torch.randn(2, 2, 4, 8), {"content": torch.randn(2, 3, 8, 8)}
    for p in model.parameters():  # adaLN-Zero starts at zero output: give every weight a value
        torch.nn.init.normal_(p, std=0.3)
    model.y_embedder.null_tokens.copy_(torch.randn(L, D))
    model.eval()
    t, a, b = torch.tensor([10, 500]), torch.randn(2, L, D), torch.randn(2, L, D)
    with torch.no_grad():
        out_a, out_b = model(x, t, a, **cond), model(x, t, b, **cond)
        assert out_a.shape[0] == 2 and (out_a - out_b).abs().max() > 1e-3  # the text reaches the output
        null = model.y_embedder.null_like(a)
        guided = guided_model(model, 3.0, null)(x, t, a, **cond)
        expected = cfg_combine(out_a, model(x, t, null, **cond), 3.0, eps_channels=x.shape[1])
    torch.testing.assert_close(guided, expected, rtol=0, atol=100 * F32 * expected.abs().max().item())


def test_content_unet_takes_the_text_tokens_as_its_context_with_nothing_new():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    model = ContentUNet(unet, 1, 0.1, (8, 8), 4, text_shape=(L, TINY_UNET["cross_attention_dim"])).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unet.parameters())
    x, t, tokens = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, L, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, tokens), unet(x, t, encoder_hidden_states=tokens).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cross-attends to 32"):
        ContentUNet(unet, 1, 0.1, (8, 8), 4, text_shape=(L, 48))


def test_prompt_names_and_noise_keys():
    assert prompt_slug("A red disc, moving LEFT!") == "a-red-disc-moving-left"
    assert prompt_slug("???") == "prompt" and len(prompt_slug("word " * 40)) <= 60
    # A prompt's k-th video has the same noise key whatever the other prompts are.
    one = prompt_noise_ids(["a", "b"], 4)
    two = prompt_noise_ids(["b", "c", "a"], 6)
    assert one[0] == two[2] and one[2] == two[5] and one[1] == two[0]
    assert len(set(one)) == 4


def test_captioned_rows_write_each_prompt_beside_its_frames():
    videos = np.zeros((3, 4, 16, 16, 3), np.uint8)
    image = captioned_rows(videos, ["a square moving right", "", "a disc moving up"], min_height=32, text_width=200)
    assert image.shape == (2 + 3 * (32 + 2), 2 + 4 * (32 + 2) + 200, 3)
    text = image[:, 2 + 4 * 34:]
    row_ink = [(text[2 + r * 34 : 2 + r * 34 + 32] < 128).sum() for r in range(3)]
    assert row_ink[0] > 20 and row_ink[2] > 20 and row_ink[1] == 0  # text where there is a caption, none else
    with pytest.raises(ValueError, match="3 videos but 2 captions"):
        captioned_rows(videos, ["a", "b"])


SHRINK = ["data.resolution=[16,16]", "data.n_frames=4", "data.num_workers=0", "data.synthetic_size=16",
          "train.global_batch_size=4", "train.num_eval_videos=2", "--max-steps", "2", "--ckpt-every", "2",
          "--log-every", "1"]
DIFFUSION = ["diffusion.sample_steps=2", "train.sample_every=2"]


def test_text_chain_trains_and_samples_prompts(tiny_clip, tmp_path):
    """AE -> motion and content conditioned on the synthetic captions -> sample.py --prompt/--prompts: videos named
    by their prompt, the same video for a prompt and index whatever the other prompts, captions in the npz (the
    quality metric reads their classes), one-line refusals of what cannot work."""
    results = tmp_path / "r"
    run_python(["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", *SHRINK, "model.depth=1",
                "model.hidden_size=32", "model.num_heads=2", "train.eval_every=100", "--results-dir", results,
                "--exp-name", "ae"])
    ae = results / "ae" / "checkpoints" / "last.pt"
    common = ["--ae-ckpt", ae, "--results-dir", results, "--text-encoder", tiny_clip, *SHRINK, *DIFFUSION]
    motion = run_python(["train_motion_diffusion.py", "--config", "configs/tiny_text/motion.yaml", "--exp-name",
                         "motion", *common]).stdout
    assert "text cache: encoding" in motion
    # text.cache false: each batch's captions are encoded as they come (WebVid's scale), nothing is cached.
    content = run_python(["train_content_diffusion.py", "--config", "configs/tiny_text/content.yaml", "--exp-name",
                          "content", *common, "text.cache=false"]).stdout
    assert "text cache" not in content and "captions encoded as batches come (16 videos)" in content
    ckpt = load_checkpoint(results / "motion" / "checkpoints" / "last.pt")
    recorded = ckpt["config"]["text"]
    assert (recorded["tokens"], recorded["dim"]) == (L, D) and recorded["fingerprint"]
    null = load_text_encoder(str(tiny_clip))([""])[0]
    torch.testing.assert_close(ckpt["ema"]["y_embedder.null_tokens"], null, rtol=0, atol=0)  # guidance's null

    models = ["--ae-ckpt", ae, "--motion-ckpt", results / "motion" / "checkpoints" / "last.pt", "--content-ckpt",
              results / "content" / "checkpoints" / "last.pt", "--content-steps", 2, "--motion-steps", 2, "--quiet"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one prompt per line\na red disc moving right\n\na square moving right\n")
    out = tmp_path / "out"
    run_python(["sample.py", *models, "--prompts", prompts, "--num-videos", 4, "--out-dir", out, "--npz",
                out / "s.npz"])
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == ["000000_a-red-disc-moving-right.mp4", "000001_a-square-moving-right.mp4",
                     "000002_a-red-disc-moving-right.mp4", "000003_a-square-moving-right.mp4"]
    assert (out / "grid_captions.png").stat().st_size > 0
    with np.load(out / "s.npz") as npz:
        assert npz["captions"].tolist() == ["a red disc moving right", "a square moving right"] * 2
        videos = npz["videos"]
    _, labels, _ = _read_npz(str(out / "s.npz"), None)
    assert labels.tolist() == [1, 0, 1, 0]  # disc-right, square-right: the classes the prompts name
    other = tmp_path / "other"
    run_python(["sample.py", *models, "--prompt", "a square moving right", "--num-videos", 1, "--out-dir", other,
                "--npz", other / "s.npz"])
    with np.load(other / "s.npz") as npz:
        np.testing.assert_array_equal(npz["videos"][0], videos[1])  # the prompt's first video, as before

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing but a comment\n")
    refused = run_python(["sample.py", *models, "--prompts", empty, "--out-dir", tmp_path / "o1"], check=False)
    assert refused.returncode == 1 and f"--prompts {empty}: holds no prompt" in refused.stderr
    missing = run_python(["sample.py", *models, "--num-videos", 1, "--out-dir", tmp_path / "o2"], check=False)
    assert missing.returncode == 1 and "--prompt" in missing.stderr.strip().splitlines()[-1]
    other_clip = make_tiny_clip(tmp_path / "other_clip", seed=1)
    resumed = run_python(["train_motion_diffusion.py", "--config", "configs/tiny_text/motion.yaml", "--exp-name",
                          "motion", *common[:4], "--text-encoder", other_clip, *SHRINK, *DIFFUSION, "--resume", "auto",
                          "train.max_steps=3"], check=False)
    last = resumed.stderr.strip().splitlines()[-1]
    assert resumed.returncode == 1 and "not those" in last and str(other_clip) in last  # another encoder's tokens
    wrong = run_python(["sample.py", *models, "--prompt", "a disc moving up", "--text-encoder", other_clip,
                        "--out-dir", tmp_path / "o3"], check=False)
    last = wrong.stderr.strip().splitlines()[-1]
    assert wrong.returncode == 1 and "not those" in last and str(other_clip) in last


def test_resuming_with_another_no_or_an_added_text_encoder_is_refused_before_anything_is_written(tiny_clip, tmp_path):
    """The text encoder is part of what a run learned: --resume (a folder, or auto with --exp-name) with another,
    none, or one added stops in one line and leaves the run byte for byte; --resume auto without a name (as
    scripts/slurm runs) passes such runs over and starts a new one, so a requeued job does not fail on every start."""
    from tests.helpers.failures import assert_one_line_error, assert_untouched, snapshot

    results = tmp_path / "r"
    run_python(["train_ae.py", "--config", "configs/tiny/autoencoder.yaml", *SHRINK, "model.depth=1",
                "model.hidden_size=32", "model.num_heads=2", "train.eval_every=100", "--results-dir", results,
                "--exp-name", "ae"])
    common = ["--ae-ckpt", results / "ae" / "checkpoints" / "last.pt", "--results-dir", results, *SHRINK, *DIFFUSION]
    text = ["train_motion_diffusion.py", "--config", "configs/tiny_text/motion.yaml", *common]
    classes = ["train_motion_diffusion.py", "--config", "configs/tiny/motion.yaml", *common]
    run_python([*text, "--text-encoder", tiny_clip, "--exp-name", "text"])
    run_python([*classes, "--exp-name", "class"])
    other_clip = make_tiny_clip(tmp_path / "other_clip", seed=1)
    cases = [(text, "text", ["--text-encoder", other_clip], [other_clip, "not those"]),
             (text, "text", ["text.encoder=null"], ["text.encoder: ", "-> None"]),
             (classes, "class", ["--text-encoder", tiny_clip], ["text.encoder: None -> ", tiny_clip])]
    for script, name, extra, culprits in cases:
        run_dir = results / name
        for resume in (["--resume", run_dir], ["--exp-name", name, "--resume", "auto"]):
            before = snapshot(run_dir)
            proc = run_python([*script, *extra, *resume, "train.max_steps=3"], check=False)
            assert_one_line_error(proc, run_dir, *culprits, exit_code=1)
            assert_untouched(run_dir, before)
            assert (run_dir / "log.txt").read_bytes() == before["log.txt"]  # not even a line appended

    before = {name: snapshot(results / name) for name in ("text", "class")}
    run_python([*text, "--text-encoder", other_clip, "--resume", "auto"])
    for name, files in before.items():
        assert_untouched(results / name, files)
    log = (results / "000-motion" / "log.txt").read_text()
    assert f"resume auto: not continuing {results / 'text'}: its settings differ (text.encoder: " in log
    assert load_checkpoint(results / "000-motion" / "checkpoints" / "last.pt")["step"] == 2


def test_latent_mode_text_chain_fine_tunes_the_unet_on_the_caption_tokens(tmp_path):
    """The paper's text-to-video setting, tiny: SD-shaped VAE, UNet and CLIP; the content UNet cross-attends to
    the caption's tokens with no new parameter and its checkpoint rebuilds it without the pretrained folder."""
    from scripts.make_tiny_sd import make_tiny_sd

    sd = make_tiny_sd(tmp_path / "sd")
    results = tmp_path / "r"
    run_python(["train_ae.py", "--config", "configs/tiny_latent/autoencoder.yaml", "--vae", sd / "vae", *SHRINK,
                "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.eval_every=100", "--results-dir",
                results, "--exp-name", "ae"])
    ae = results / "ae" / "checkpoints" / "last.pt"
    common = ["--ae-ckpt", ae, "--results-dir", results, "--text-encoder", sd, *SHRINK, *DIFFUSION]
    run_python(["train_motion_diffusion.py", "--config", "configs/tiny_latent/motion.yaml", "--exp-name", "motion",
                *common])
    run_python(["train_content_diffusion.py", "--config", "configs/tiny_latent/content.yaml", "--exp-name", "content",
                "model.pretrained=" + str(sd / "unet"), *common])
    content = load_checkpoint(results / "content" / "checkpoints" / "last.pt")
    unet_keys = {k for k in content["ema"] if k.startswith("unet.")}
    assert set(content["ema"]) - unet_keys == {"y_embedder.null_tokens"}  # no class table: only the empty prompt
    (sd / "unet").rename(tmp_path / "moved_unet")  # sampling needs only the checkpoints and the text encoder
    out = tmp_path / "out"
    run_python(["sample.py", "--ae-ckpt", ae, "--motion-ckpt", results / "motion" / "checkpoints" / "last.pt",
                "--content-ckpt", results / "content" / "checkpoints" / "last.pt",
                "--prompt", "a red square moving right",
                "--num-videos", 2, "--content-steps", 2, "--motion-steps", 2, "--out-dir", out, "--quiet"])
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["000000_a-red-square-moving-right.mp4",
                                                                 "000001_a-red-square-moving-right.mp4"]


def test_a_text_encoder_bin_holding_a_pickled_object_is_one_line(tiny_clip, tmp_path):
    """transformers loads a .bin weights-only; torch's refusal came through as its many-line traceback."""
    import shutil

    from tests.helpers.pickles import MakesAFolder

    folder, marker = tmp_path / "clip", tmp_path / "ran"
    shutil.copytree(tiny_clip, folder)
    for weights in (folder / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    torch.save({"text_model.embeddings.token_embedding.weight": MakesAFolder(marker)},
               folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(TextEncoderLoadError) as info:
        load_text_encoder(str(folder))
    message = str(info.value)
    assert message.startswith(f"text.encoder {folder / 'text_encoder' / 'pytorch_model.bin'} is not a plain weights "
                              f"file: it holds a pickled object (posix.mkdir)"), message
    assert "\n" not in message and not marker.exists()
