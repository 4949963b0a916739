"""The source tree itself: every file parses, no always-true assert, packages import only the layers below them and
take no training run below training/, and the entry points start without importing what only some runs need."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import only packages of a lower layer (and itself): data and maths at the bottom, then the models,
# the runtime both sides share, then sampling and the metrics, and training on top (its previews sample).
LAYERS = {"datasets": 0, "diffusion": 0, "models": 1, "core": 2, "evals": 3, "sampling": 3, "training": 4}
ENTRY_POINTS = {"train_ae", "train_motion_diffusion", "train_content_diffusion", "sample", "benchmarks", "scripts",
                "tests"}


def _sources():
    return sorted(p for p in ROOT.rglob("*.py") if not any(part.startswith((".", "demo")) for part in
                                                               p.relative_to(ROOT).parts))


def _imported_modules(tree):
    """Every absolute import in the file, function-local ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_every_source_file_parses_and_has_no_always_true_assert():
    sources = _sources()
    assert len(sources) > 50
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))  # a stray line fails here, naming the file
        for node in ast.walk(tree):
            if isinstance(node, ast.Assert):
                # assert (cond, "message") tests a non-empty tuple: always true.
                assert not isinstance(node.test, ast.Tuple), f"{path}:{node.lineno}: assert on a tuple is always true"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_packages_import_only_lower_layers(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    for path in files:
        for module in _imported_modules(ast.parse(path.read_text())):
            top = module.split(".")[0]
            assert top not in ENTRY_POINTS, f"{path.relative_to(ROOT)} imports {module}, an entry point"
            if top in LAYERS and top != package:
                assert LAYERS[top] < LAYERS[package], (
                    f"{path.relative_to(ROOT)} imports {module}: {package} may import only layers below it")



def test_no_code_below_training_takes_a_run():
    """Code below training/ gets the narrow things it uses (the ranks, a logger, a stop check), never a TrainingRun:
    no function there has a parameter `run`."""
    for package in (name for name, layer in LAYERS.items() if layer < LAYERS["training"]):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                    assert "run" not in [arg.arg for arg in args], (
                        f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} takes a run")


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - ENTRY_POINTS == set(LAYERS)


def test_entry_points_do_not_import_what_only_some_runs_need():
    """Every script start pays for its imports (the suite starts scripts a few hundred times). LPIPS (torchvision,
    torch._dynamo), the SD VAE and UNet (diffusers), the text encoder (transformers) and the Fréchet distance's
    matrix square root (scipy) are imported where they are used, not by importing the entry points."""
    heavy = ("torchvision", "lpips", "timm", "diffusers", "transformers", "scipy", "torch._dynamo")
    code = ("import sys, train_ae, train_motion_diffusion, train_content_diffusion, sample, evals.fvd, "
            f"evals.synthetic_quality; print(sorted(m for m in {heavy!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_test_modules_share_helpers_not_each_other():
    """What tests share lives in tests/helpers/ (fixtures and hooks in tests/conftest.py): a test module or conftest
    imported by name is a second copy beside the one pytest collected (`test_x` and `tests.test_x`), its module state
    and autouse fixtures included."""
    tests = ROOT / "tests"
    forbidden = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    files = sorted(tests.rglob("*.py"))
    assert len(files) > len(forbidden)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from tests import test_x` names it in names
                modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                name = parts[1] if parts[0] == "tests" and len(parts) > 1 else parts[0]
                assert name not in forbidden, f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
