"""The way in: every entry point's --help documents every flag with its default, the training scripts print their
resolved config without starting a run, the set-up script says what it installs and can be told not to, and every
file the repo's text cites exists."""
import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from tests.helpers.processes import REPO, child_env
from core.config import COMMON_KEYS, FLAG_KEYS, _schema, build_arg_parser, parse_config
from datasets.build import DATASET_NAMES

STAGE_SCRIPTS = {"train_ae.py": "autoencoder", "train_motion_diffusion.py": "motion",
                 "train_content_diffusion.py": "content"}


def _module_parser(module: str):
    return lambda: importlib.import_module(module).build_parser()


def _file_parser(path: str):
    def build():
        spec = importlib.util.spec_from_file_location(f"_entry_{os.path.basename(path)[:-3]}", REPO / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_parser()
    return build


# Every file that builds an argparse parser, and how to get that parser without running the tool. The training
# scripts' parser is core.config.build_arg_parser.
ENTRY_POINTS = {
    "core/config.py": lambda: build_arg_parser("motion", "t"),
    "sample.py": _module_parser("sample"),
    "evals/fvd.py": _module_parser("evals.fvd"),
    "evals/synthetic_quality.py": _module_parser("evals.synthetic_quality"),
    "training/export.py": _module_parser("training.export"),
    "datasets/__main__.py": _module_parser("datasets.__main__"),
    "scripts/make_tiny_sd.py": _file_parser("scripts/make_tiny_sd.py"),
    "scripts/demo_figure.py": _file_parser("scripts/demo_figure.py"),
    **{f"benchmarks/{name}.py": _module_parser(f"benchmarks.{name}")
       for name in ("ae_motion_ablation", "bench_autoencoder", "bench_latent_cache", "bench_loader", "content_frames",
                    "flops", "reading_paths", "sampler_quality", "throughput")},
}
PARSERS = {**{script: (lambda stage=stage: build_arg_parser(stage, "t")) for script, stage in STAGE_SCRIPTS.items()},
           **{path: build for path, build in ENTRY_POINTS.items() if path != "core/config.py"}}


def _tracked(*patterns):
    out = subprocess.run(["git", "ls-files", "-z", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [path for path in out.stdout.split("\0") if path and (REPO / path).is_file()]


def _flags(parser):
    """(action, its help as --help prints it, whitespace folded) for every flag and positional --help lists."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        yield action, " ".join(formatter._expand_help(action).split())


def test_every_file_with_a_parser_is_checked():
    with_parser = {path for path in _tracked("*.py") if not path.startswith("tests/")
                   and "ArgumentParser(" in (REPO / path).read_text(encoding="utf-8")}
    assert with_parser == set(ENTRY_POINTS)


@pytest.mark.parametrize("entry", sorted(PARSERS))
def test_every_flag_has_help_that_shows_its_default(entry):
    parser = PARSERS[entry]()
    parser.format_help()  # a stray % in a help text would fail here, as in `--help`
    for action, text in _flags(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{entry} {name}: no help text"
        default = action.default
        if default is not None and default is not False and default != []:
            assert str(default) in text, f"{entry} {name}: --help does not show the default {default!r}: {text}"


@pytest.mark.parametrize("stage", sorted(set(STAGE_SCRIPTS.values())))
def test_training_help_names_config_keys_datasets_and_the_common_switches(stage):
    parser = build_arg_parser(stage, "t")
    helps = {action.dest: text for action, text in _flags(parser)}
    for name in DATASET_NAMES:
        assert name in helps["dataset_name"]
    assert "summed over all ranks" in helps["global_batch_size"]
    # Each flag that sets a config key names it and the value the default config file gives it.
    ucf101 = OmegaConf.load(REPO / "configs" / "ucf101" / f"{stage}.yaml")
    for dest, key in FLAG_KEYS.items():
        if dest in helps:
            assert f"the config's {key}" in helps[dest]
            value = OmegaConf.select(ucf101, key)
            if value is not None:
                assert f"{stage}.yaml: {value}" in helps[dest], (dest, helps[dest])
    assert "configs/ucf101/autoencoder.yaml: 24" in helps["global_batch_size"] or stage != "autoencoder"
    # The epilog lists the switches most runs need, by their real keys in this stage's schema.
    epilog = parser.epilog
    schema = _schema(stage)
    listed = [key.split("=")[0] for where, key, _ in COMMON_KEYS
              if where in ("all", "autoencoder" if stage == "autoencoder" else "diffusion")]
    for key in ("train.mixed_precision", "model.grad_checkpointing", "train.wandb_project", "train.keep_last",
                "train.compile"):
        assert key in listed
    for key in listed:
        assert f"  {key}=" in epilog
        assert OmegaConf.select(schema, key, default="<absent>") != "<absent>", f"{key} is not a {stage} config key"


def test_print_config_prints_the_resolved_config_and_starts_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--config", "configs/tiny/motion.yaml", "--global-batch-size", "6", "--results-dir", str(results),
            "--print-config", "optim.lr=0.125"]
    with pytest.raises(SystemExit) as exit_info:
        parse_config("motion", "t", argv)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    tiny = OmegaConf.load(REPO / "configs" / "tiny" / "motion.yaml")
    assert printed["stage"] == "motion" and printed["model"]["name"] == tiny.model.name
    assert printed["train"]["global_batch_size"] == 6 and printed["optim"]["lr"] == 0.125
    assert printed["train"]["results_dir"] == str(results)
    assert not results.exists()


def test_print_config_from_the_script_neither_launches_ranks_nor_writes(tmp_path):
    # In another folder, with the default results dir: a run would create tmp_path/results; torchrun's flag would
    # start two processes, each printing.
    proc = subprocess.run([sys.executable, str(REPO / "train_ae.py"), "--config",
                           str(REPO / "configs" / "tiny" / "autoencoder.yaml"), "--nproc_per_node=2",
                           "--print-config", "--max-steps", "7"], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("stage: autoencoder") == 1
    assert yaml.safe_load(proc.stdout)["train"]["max_steps"] == 7
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["evals/fvd.py", "evals/synthetic_quality.py", "training/export.py"])
def test_module_tools_also_run_as_files(path, tmp_path):
    env = child_env()
    env.pop("PYTHONPATH")  # as a user types it, from another folder
    proc = subprocess.run([sys.executable, str(REPO / path), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m ")


# ---- the set-up script ------------------------------------------------------------------------------------------
def _fake_python(tmp_path):
    """An interpreter that sees no installed package (python -S) and records pip calls instead of running them."""
    fake = tmp_path / "python"
    log = tmp_path / "pip.log"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$@" >> {log}; exit 0; fi\n'
                    f'exec {sys.executable} -S "$@"\n')
    fake.chmod(0o755)
    return fake, log


def _ensure(tmp_path, python, **env):
    return subprocess.run(["bash", str(REPO / "scripts" / "ensure_requirements.sh")], cwd=tmp_path,
                          env=child_env({"PYTHON": str(python), **env}), capture_output=True, text=True, timeout=120)


def test_setup_script_says_what_it_installs_and_where(tmp_path):
    fake, log = _fake_python(tmp_path)
    proc = _ensure(tmp_path, fake)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout
    assert "installing requirements.txt and requirements-dev.txt into " + sys.executable in message
    assert "torch" in message and "pytest-xdist" in message and "CMD_NO_INSTALL=1" in message
    assert log.read_text().split() == ["-m", "pip", "install", "-q", "-r", str(REPO / "requirements.txt"),
                                       "-r", str(REPO / "requirements-dev.txt")]


def test_setup_script_opt_out_lists_what_is_missing_and_installs_nothing(tmp_path):
    fake, log = _fake_python(tmp_path)
    proc = _ensure(tmp_path, fake, CMD_NO_INSTALL="1")
    assert proc.returncode == 1
    assert not log.exists()
    assert len(proc.stderr.strip().splitlines()) == 1
    assert re.search(rf"{re.escape(sys.executable)} lacks torch .*pytest-xdist; CMD_NO_INSTALL is set", proc.stderr)


def test_setup_script_is_silent_when_everything_is_installed(tmp_path):
    proc = _ensure(tmp_path, sys.executable, CMD_NO_INSTALL="1")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


# ---- cited files ------------------------------------------------------------------------------------------------
CITED_MD = re.compile(r"(?<![\w/.:-])([\w./-]+\.md)\b")
# A path into one of the repository's own folders (configs/tiny/motion.yaml, scripts/make_tiny_sd.py, ...).
CITED_PATH = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)+[\w.-]+\.(?:py|yaml|md|sh|sbatch|png|txt|toml))\b")


def test_every_cited_file_exists():
    folders = {path.split("/")[0] for path in _tracked() if "/" in path}
    missing = {}
    for path in _tracked("*.py", "*.yaml", "*.md", "*.sh", "*.toml", "*.txt", "scripts/slurm/*"):
        text = (REPO / path).read_text(encoding="utf-8", errors="replace")
        cited = {m.group(1) for m in CITED_MD.finditer(text)}
        cited |= {m.group(1) for m in CITED_PATH.finditer(text) if m.group(1).split("/")[0] in folders}
        for name in cited:
            if not ((REPO / name).exists() or (REPO / path).parent.joinpath(name).exists()):
                missing.setdefault(name, []).append(path)
    assert missing == {}, f"cited but not in the repository: {missing}"


def test_the_original_code_is_named_where_it_is_meant():
    # "the seed", "the reference code" and the like mean NVlabs/CMD; a reader cannot know that.
    vague = re.compile(r"seed README|seed-style|the seed's|reference code|reference evaluation", re.IGNORECASE)
    found = [f"{path}:{number}" for path in _tracked("*.py", "*.yaml", "*.md", "*.sh", "scripts/slurm/*")
             for number, line in enumerate((REPO / path).read_text(encoding="utf-8").splitlines(), 1)
             if vague.search(line) and path != "tests/test_cli_docs.py"]
    assert found == []
