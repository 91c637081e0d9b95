"""How `python -m pytest exercises` reports: per exercise, "not started",
"wrong" or "done".

- not started: the code under test raised NotImplementedError("exercise N: ...")
  -- the stub's message -- so the check is skipped, with the checker's HINT
  ("not finished" when some checks of the exercise already pass).
- wrong: a check failed; its message names the property in words.
- done: every check of the exercise passed.

EXERCISES_FROM chooses which copy is checked (exercises/checking.py):
unset for your own files, `solutions` for the reference solutions.
EXERCISES_HINTS=0 leaves the hints out (for graded work).
"""

import os
from collections import defaultdict

import pytest
import torch

from checking import source_folder

_exercise_of = {}                      # test id -> the checker module's EXERCISE title
_hint_of = {}                          # title -> HINT
_outcomes = defaultdict(list)          # title -> [(test name, outcome)]


def hints_shown():
    """Hints are on unless EXERCISES_HINTS=0: a teacher grading work wants
    the verdicts without the nudges."""
    return os.environ.get("EXERCISES_HINTS", "1").strip() != "0"


def pytest_configure(config):
    try:
        source_folder()
    except ValueError as e:                # EXERCISES_FROM names no folder: say so in one line
        raise pytest.UsageError(str(e)) from None


def pytest_report_header(config):
    chosen = os.environ.get("EXERCISES_FROM", "") or "unset"
    hints = "" if hints_shown() else ", hints off (EXERCISES_HINTS=0)"
    return f"exercises checked: {source_folder()} (EXERCISES_FROM={chosen}){hints}"


def pytest_collection_modifyitems(items):
    for item in items:
        title = getattr(item.module, "EXERCISE", item.module.__name__)
        _exercise_of[item.nodeid] = title
        _hint_of[title] = getattr(item.module, "HINT", "")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A stub that still raises NotImplementedError("exercise ...") turns its
    checks into skips: the exercise is not started, which is not a failure."""
    try:
        return (yield)
    except NotImplementedError as e:
        if not str(e).startswith("exercise"):
            raise                          # some other unimplemented thing: a real error
        pytest.skip(f"not started: {e}")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        title = _exercise_of.get(report.nodeid)
        if title is not None:
            _outcomes[title].append((report.nodeid.split("::")[-1], report.outcome))


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    tr = terminalreporter
    tr.section("exercises")
    show_hints = hints_shown()
    for title in sorted(_outcomes):
        results = _outcomes[title]
        failed = [name for name, outcome in results if outcome == "failed"]
        skipped = [name for name, outcome in results if outcome == "skipped"]
        if failed:
            tr.write_line(f"{title}: wrong -- {len(failed)} of {len(results)} checks fail: {', '.join(failed)}")
        elif len(skipped) == len(results):
            tr.write_line(f"{title}: not started")
            if show_hints:
                tr.write_line(f"    hint: {_hint_of[title]}")
        elif skipped:
            tr.write_line(f"{title}: not finished -- {len(results) - len(skipped)} of {len(results)} checks pass, "
                          f"the others reach code not written yet")
            if show_hints:
                tr.write_line(f"    hint: {_hint_of[title]}")
        else:
            tr.write_line(f"{title}: done")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: extra threads only add synchronisation (as in tests/)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
