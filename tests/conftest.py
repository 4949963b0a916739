"""The suite's pytest hooks and fixtures; the helpers test modules share live in tests/helpers/."""
import pytest
import torch

# Before the helpers are imported: their asserts (run_python's, the failure checks') then explain a failure as a test
# module's do.
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers.processes import CORES, LAUNCHED, WORKERS, run_python, run_torchrun  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test file that trains for minutes; scheduled first")
    if WORKERS > 1:  # the in-process tests of each worker: its share of the cores
        torch.set_num_threads(max(1, CORES // WORKERS))


def pytest_collection_modifyitems(config, items):
    """The files marked slow run first (a stable sort keeps the order within each group): the workers of
    scripts/test.sh, which take files in this order, then end together instead of one waiting for the longest."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# Autouse for every test: after a test that launched nothing it checks an empty list, and any test module that adds
# to LAUNCHED is covered without having to ask for it.
@pytest.fixture(autouse=True)
def reap_processes():
    """A failed assertion must not leave a training process running: kill whatever this test launched."""
    yield
    while LAUNCHED:
        proc = LAUNCHED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def python_runner():
    return run_python


@pytest.fixture
def torchrun_runner():
    return run_torchrun
