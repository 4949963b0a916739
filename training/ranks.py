"""Work one rank does for all, and user errors every rank raises together, so that none hangs waiting."""
from __future__ import annotations

from core.cli import RunError
from core.distributed import DistInfo, all_gather_object, broadcast_object


def on_main(dist: DistInfo, fn):
    """fn() on rank 0, its result on every rank; an error there is raised on every rank (none hangs waiting)."""
    result, error = broadcast_object(attempt(fn) if dist.is_main else (None, None))
    if error is not None:
        raise error
    return result


def attempt(fn) -> tuple:
    """(fn(), None), or (None, the user error it raised): to be shared with the other ranks before raising."""
    try:
        return fn(), None
    except (ValueError, OSError, RunError) as exc:
        return None, exc


def raise_first(errors: list) -> None:
    error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def build_on_ranks(dist: DistInfo, build):
    """build() on rank 0 first, then on the others (which then read what rank 0 cached instead of probing); an
    error on any rank (a wrong data path) reaches every rank as the same one line, so that none is left waiting for
    the others at a barrier."""
    result, error = attempt(build) if dist.is_main else (None, None)
    raise_first([broadcast_object(error)])
    if not dist.is_main:
        result, error = attempt(build)
    raise_first(all_gather_object(error))
    return result
