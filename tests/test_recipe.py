"""One paper-scale recipe: configs/ucf101, the launch lines of the README and docs/RECIPES.md, the Slurm scripts and
the compute table name the same models and EMA (the paper's: autoencoder depth 12, MotionDiT-L/2, ContentDiT-XL/2,
EMA 0.999), and the FVD recipe samples with the paper's protocol and scores against the real split evals.fvd
defaults to. Every command is parsed by the parser the script itself uses."""
import re
import shlex
from pathlib import Path

import pytest

import evals.fvd
from core.config import build_arg_parser, config_from_args
from tests.helpers.processes import REPO

SCRIPTS = {"train_ae.py": "autoencoder", "train_motion_diffusion.py": "motion",
           "train_content_diffusion.py": "content"}
PAPER_MODELS = {"motion": "MotionDiT-L/2", "content": "ContentDiT-XL/2"}
PAPER_EMA, PAPER_AE_DEPTH = 0.999, 12
README = (REPO / "README.md").read_text()
RECIPES = (REPO / "docs/RECIPES.md").read_text()
DOCS = {"README": README, "docs/RECIPES.md": RECIPES}


def shell_commands(text: str) -> list:
    """The commands of the README's ```bash blocks, continuation lines joined, comment lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line, comments=True))
    return commands


def sbatch_command(path: Path) -> list:
    """The training command an sbatch file execs, with its environment defaults filled in."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    line = next(line for line in text.splitlines() if line.startswith("exec bash scripts/slurm/launch.sh"))
    line = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line)
    return [word for word in shlex.split(line) if word != "$@"]


def launch(words: list):
    """(stage, the script's arguments) of a command that runs a training script in full, else None (also for a
    README line that elides flags with '...')."""
    if "..." in words:
        return None
    for i, word in enumerate(words):
        if Path(word).name in SCRIPTS:
            return SCRIPTS[Path(word).name], words[i + 1:]
    return None


def resolved_config(stage: str, args: list):
    """The config the script would train with, or None for a command of another recipe (its own --config)."""
    parsed = build_arg_parser(stage, "recipe check").parse_intermixed_args(args)
    if parsed.config not in (None, f"configs/ucf101/{stage}.yaml"):
        return None
    return config_from_args(stage, parsed)


def recipe_configs() -> dict:
    """{stage: [(where, config)]} of every paper-scale UCF-101 launch: the config files, the launch lines of the
    README and docs/RECIPES.md, and the Slurm scripts."""
    found = {stage: [(f"configs/ucf101/{stage}.yaml",
                      resolved_config(stage, ["--config", f"configs/ucf101/{stage}.yaml",
                                              "data.data_path=/data/UCF-101"]))] for stage in SCRIPTS.values()}
    for doc, text in DOCS.items():
        for words in shell_commands(text):
            run = launch(words)
            if run is not None:
                cfg = resolved_config(*run)
                if cfg is not None:
                    found[run[0]].append((f"{doc}: {' '.join(words)[:100]}", cfg))
    for sbatch in sorted((REPO / "scripts" / "slurm").glob("*.sbatch")):
        stage, args = launch(sbatch_command(sbatch))
        found[stage].append((str(sbatch.relative_to(REPO)), resolved_config(stage, args)))
    return found


def test_configs_readme_and_slurm_scripts_train_the_same_paper_models():
    found = recipe_configs()
    for stage, configs in found.items():
        places = [where for where, _ in configs]
        for doc in DOCS:
            assert any(p.startswith(doc) for p in places), (doc, places)
        assert any(p.endswith(".sbatch") for p in places), places
        if stage == "autoencoder":
            depths = {where: cfg.model.depth for where, cfg in configs}
            assert set(depths.values()) == {PAPER_AE_DEPTH}, depths
        else:
            names = {where: cfg.model.name for where, cfg in configs}
            assert set(names.values()) == {PAPER_MODELS[stage]}, names
    for stage, configs in found.items():
        decays = {where: cfg.train.ema_decay for where, cfg in configs}
        assert set(decays.values()) == {PAPER_EMA}, decays


def test_the_compute_table_assumes_the_configs_models_and_latent_cache():
    table = RECIPES[RECIPES.index("**Compute it needs"):RECIPES.index("**Disk:**")]
    rows = [line for line in table.splitlines() if re.match(r"\s*\| (motion|content) DiT", line)]
    assert len(rows) == 2, rows
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        stage = cells[0].split()[0]
        cfg = resolved_config(stage, ["data.data_path=/data/UCF-101"])
        assert cells[1] == cfg.model.name == PAPER_MODELS[stage], row
        # A diffusion step without the latent cache runs the frozen encoder on every batch: the table counts it.
        assert ("encode" in cells[2]) == (not cfg.diffusion.latent_cache), row


def test_fvd_recipe_samples_with_the_paper_preset_and_the_fvd_default_split():
    commands = shell_commands(README) + shell_commands(RECIPES)
    fvd_samples = [words for words in commands if "sample.py" in words and "--num-videos" in words
                   and words[words.index("--num-videos") + 1] in ("2048", "10000")]
    assert len(fvd_samples) >= 3  # the README's and the two of docs/RECIPES.md
    for words in fvd_samples:
        assert words[words.index("--preset") + 1] == "paper", words
    scores = {}
    for words in commands:
        if words[:3] == ["python", "-m", "evals.fvd"]:
            args = evals.fvd.parse_args(words[3:])
            scores[args.num_videos] = args.split
    assert set(scores) == {2048, 10000}, scores
    # The 2,048-video number uses evals.fvd's default real split, which docs/RECIPES.md names.
    assert scores[2048] == evals.fvd.REAL_SPLIT == "train"
    assert f"(`--split {evals.fvd.REAL_SPLIT}`, the default)" in " ".join(RECIPES.split())


@pytest.mark.parametrize("stage", ["motion", "content"])
def test_the_nvlabs_flag_still_selects_nvlabs_content_size(stage):
    cfg = resolved_config(stage, ["--motion-model-config", "MotionDiT-L/2", "data.data_path=/data/UCF-101"])
    assert cfg.model.name == {"motion": "MotionDiT-L/2", "content": "ContentDiT-L/2"}[stage]
