"""The README's facts that code knows are the code's: the strategies table
comes from the registry, and the lesson's size is the four files' lines and
within the 2,000 a reader can take in one sitting."""

import re
from pathlib import Path

import pytest

from lab import readme

pytestmark = pytest.mark.lesson
ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_strategies_table_and_lesson_size_are_what_the_code_says():
    assert readme.rewritten((ROOT / "README.md").read_text()) == (ROOT / "README.md").read_text(), \
        "run python -m lab.readme"


def test_the_lesson_is_at_most_2000_lines_and_the_readme_says_how_many():
    lines = readme.lesson_lines()
    assert lines <= 2000
    stated = re.search(r"The lesson is four files, ([\d,]+) lines", (ROOT / "README.md").read_text()).group(1)
    assert int(stated.replace(",", "")) == lines


def test_the_readme_is_a_front_door():
    """At most 180 lines, the routing picture in its first 15, the notebook in its first 60."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 180
    assert any(line.startswith("![") for line in lines[:15])
    assert any("lesson.ipynb" in line for line in lines[:60])


def test_no_lesson_file_starts_with_settings_or_validation():
    """What comes first in each lesson file, after its docstring and imports,
    is the lesson: a class or function that is not a check or a flag."""
    for name in readme.LESSON:
        first = next(line for line in (ROOT / name).read_text().splitlines()
                     if re.match(r"(def|class|[A-Z_]+ =|@)", line))
        assert not re.search(r"check|valid|flag|parse|AT_LEAST", first), (name, first)
