"""The multi-process tests' launcher: plumbing.spawn, which lab/bench.py
uses too. Spawned workers import this module (through the test module that
imports it), so the test-only strategy is registered there as well; their
sys.path is the parent's, which conftest.py set up."""

import toy_strategy  # noqa: F401
from plumbing import spawn as run_distributed  # noqa: F401
