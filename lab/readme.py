"""
lab/readme.py -- the README's facts that code knows: the strategies table
(from the registry, so a new strategy appears without a copy to forget) and
the lesson's size (the four lesson files' lines).

    python -m lab.readme            # rewrite them in README.md
    python -m lab.readme --check    # is README.md current? (tests/test_readme.py)
"""

import argparse
import sys
from pathlib import Path

from balancers import BALANCERS

ROOT = Path(__file__).resolve().parent.parent
LESSON = ("balancers.py", "moe.py", "data.py", "train.py")
MARKS = {"strategies": ("<!-- strategies: begin -->", "<!-- strategies: end -->"),
         "lesson": ("<!-- lesson size: begin -->", "<!-- lesson size: end -->")}


def project_strategies():
    """The project's own strategies (balancers.py and strategies/), not one a
    user or a test registered from a file of their own."""
    return {name: cls for name, cls in BALANCERS.items()
            if cls.__module__ == "balancers" or cls.__module__.startswith("strategies")}


def strategy_table():
    rows = ["| strategy | source | idea |", "|---|---|---|"]
    for name, cls in project_strategies().items():
        where = "balancers.py" if cls.__module__ == "balancers" else cls.__module__.replace(".", "/") + ".py"
        rows.append(f"| `{name}` ({where}) | {cls.paper} | {cls.summary} |")
    return "\n".join(rows)


def lesson_lines():
    return sum(len((ROOT / f).read_text().splitlines()) for f in LESSON)


def lesson_sentence():
    return (f"The lesson is four files, {lesson_lines():,} lines in all: "
            f"{', '.join(f'`{f}`' for f in LESSON)}.")


def rewritten(readme):
    for key, text in (("strategies", strategy_table()), ("lesson", lesson_sentence())):
        begin, end = MARKS[key]
        head, rest = readme.split(begin, 1)
        readme = head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    return readme


def main(argv=None):
    p = argparse.ArgumentParser(description="Rewrite the README's strategies table and lesson size from the code.")
    p.prog = "python -m lab.readme"   # what --help and errors call it: it runs as a module
    p.add_argument("--check", action="store_true", help="only say whether README.md is current (exit 1 if not)")
    args = p.parse_args(argv)
    path = ROOT / "README.md"
    old = path.read_text()
    new = rewritten(old)
    if args.check:
        if new != old:
            print("README.md's strategies table or lesson size is stale: run python -m lab.readme", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    print(f"README.md: {len(project_strategies())} strategies, the lesson {lesson_lines()} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
