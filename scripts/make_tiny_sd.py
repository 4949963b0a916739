"""Builds a tiny, randomly initialised Stable-Diffusion-shaped VAE, UNet and CLIP text encoder (with a tokenizer
whose vocabulary holds the built-in dataset's caption words) and saves them in a pipeline folder's layout, so the
latent-mode and text-to-video chains run offline on a CPU (configs/tiny_latent, configs/tiny_text, the tests).
Their weights are random: the chains run and train, but pictures decoded through this VAE mean nothing, and the
text encoder's tokens tell captions apart without knowing what words mean.

    python scripts/make_tiny_sd.py results/tiny_sd   # results/tiny_sd/{vae,unet,scheduler,text_encoder,tokenizer}

A real run points `vae` and `model.pretrained` at Stable Diffusion's folders instead (docs/RECIPES.md, "Latent mode").
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

# Same layout as SD's (AutoencoderKL with 4 latent channels; a cross-attention UNet), at a size a CPU trains in
# seconds: 2 blocks, so the VAE downsamples 2x per side instead of SD's 8x.
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=32)
TINY_UNET = dict(in_channels=4, out_channels=4, sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8)
# Stable Diffusion's training schedule (configs: noise_schedule scaled_linear); the scheduler config also tells what
# the UNet predicts.
TINY_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# CLIP's text transformer (causal attention, final layer norm) at width 32 = TINY_UNET's cross_attention_dim.
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=16)
# Whole-word tokens for the built-in captions (datasets.synthetic); other words fall back to characters.
TINY_WORDS = ("a", "moving", "square", "disc", "triangle", "right", "left", "down", "up",
              "red", "yellow", "green", "cyan", "blue", "magenta")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_clip_vocabulary(words=TINY_WORDS) -> tuple[dict, list]:
    """(vocab, merges) of a CLIP byte-pair tokenizer: printable ASCII characters, each also as a word end
    ("x</w>"), and one merge chain per word so that each of `words` is a single token."""
    tokens = [chr(c) for c in range(33, 127)]
    tokens += [t + "</w>" for t in tokens]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            tokens.append(pieces[0])
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, list(dict.fromkeys(merges))


def make_tiny_clip(out_dir, seed: int = 0) -> Path:
    """Writes out_dir/text_encoder (a CLIPTextModel) and out_dir/tokenizer; returns out_dir."""
    import json
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    vocab, merges = tiny_clip_vocabulary()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  model_max_length=TINY_TEXT["max_position_embeddings"])
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                            pad_token_id=vocab[EOS], **TINY_TEXT)
    CLIPTextModel(config).save_pretrained(str(out_dir / "text_encoder"))
    return out_dir


def make_tiny_sd(out_dir, seed: int = 0, text: bool = True, prediction_type: str = "epsilon") -> Path:
    """Writes out_dir/vae, out_dir/unet (diffusers save_pretrained: config.json + safetensors) and
    out_dir/scheduler (SD's training schedule and `prediction_type`, "epsilon" or "v_prediction"), and with `text`
    out_dir/text_encoder and out_dir/tokenizer (make_tiny_clip); returns out_dir."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE).save_pretrained(out_dir / "vae")
    UNet2DConditionModel(**TINY_UNET).save_pretrained(out_dir / "unet")
    DDPMScheduler(**TINY_SCHEDULER, prediction_type=prediction_type).save_pretrained(out_dir / "scheduler")
    if text:
        make_tiny_clip(out_dir, seed)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="results/tiny_sd", help="the folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    print(f"tiny SD-shaped VAE, UNet and text encoder written to {make_tiny_sd(args.out_dir, args.seed)}")


if __name__ == "__main__":
    main()
