"""How a refused run must look: one 'error: ...' line and no traceback, and the files it found left as they were."""
from pathlib import Path


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_untouched(folder: Path, before: dict) -> None:
    """Every file that was there is still there with the same bytes; log.txt may only have grown at its end."""
    after = snapshot(folder)
    for name, data in before.items():
        assert name in after, f"{folder / name} was deleted"
        if name == "log.txt":
            assert after[name].startswith(data), f"{folder / name} was rewritten"
        else:
            assert after[name] == data, f"{folder / name} was overwritten"


def assert_one_line_error(proc, *culprits, exit_code=None) -> str:
    """A non-zero exit whose stderr ends in one 'error: ...' line naming each culprit, with no traceback."""
    assert proc.returncode != 0, f"expected a failure:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    if exit_code is not None:
        assert proc.returncode == exit_code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    for culprit in culprits:
        assert str(culprit) in lines[-1], f"{culprit!r} not named in: {lines[-1]}"
    return lines[-1]
