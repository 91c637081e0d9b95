"""The multi-process tests' launcher: plumbing.spawn, which bench.py uses
too. Spawned workers import this module (through the test module that
imports it), so the test-only strategy is registered there as well."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (str(HERE.parent), str(HERE)):
    if folder not in sys.path:
        sys.path.insert(0, folder)

import toy_strategy  # noqa: E402,F401
from plumbing import spawn as run_distributed  # noqa: E402,F401
