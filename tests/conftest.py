"""Shared test set-up: import the project's flat modules, register the
throw-away strategy (tests/toy_strategy.py) so that every test parametrised
over the registry runs it too, and run on one thread."""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
for folder in (str(HERE.parent), str(HERE)):   # the code under test, and this folder
    if folder not in sys.path:
        sys.path.insert(0, folder)

import toy_strategy  # noqa: E402,F401  (registers "toy_ema" in balancers.BALANCERS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors in the tests are tiny: extra threads only add
    synchronisation, which costs a lot on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
