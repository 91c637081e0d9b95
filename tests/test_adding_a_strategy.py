"""docs/adding-a-strategy.md, done as a student does it: the doc's file saved
as it is, trained with --import, its own knob checked, recorded and held
fixed on --resume. No project file is edited."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "adding-a-strategy.md"


def doc_file():
    """The first ```python block of the doc."""
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


def train(cwd, *flags):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--steps", "2", *flags],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_docs_strategy_file_is_the_one_the_suite_runs():
    """One source: the doc shows tests/toy_strategy.py verbatim, so what a
    student copies is what every registry-wide test checks."""
    assert doc_file() == (ROOT / "tests" / "toy_strategy.py").read_text()


def test_the_docs_strategy_saved_as_a_file_trains_with_its_own_knob_and_resume_holds_it(tmp_path):
    """Saved from the doc and imported by path: it trains, its knob's value
    is in summary.json, a changed value on --resume is refused in one line,
    and typing the default on --resume is the same run (values in effect are
    compared, not flags as typed)."""
    mine = tmp_path / "mine.py"
    mine.write_text(doc_file())
    first = train(tmp_path, "--import", str(mine), "--balancer", "toy_ema", "--ema-decay", "0.8", "--out", "a")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["strategy"]["ema_decay"] == 0.8 and summary["strategy"]["penalty"] == 0.05
    changed = train(tmp_path, "--import", "mine.py", "--balancer", "toy_ema", "--ema-decay", "0.5",
                    "--out", "a", "--steps", "3", "--resume")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1 and "--ema-decay was 0.8, now 0.5" in changed.stderr
    plain = train(tmp_path, "--import", "mine.py", "--balancer", "toy_ema", "--out", "b")
    assert plain.returncode == 0, plain.stderr[-2000:]
    default_typed = train(tmp_path, "--import", "mine.py", "--balancer", "toy_ema", "--ema-decay", "0.9",
                          "--out", "b", "--steps", "3", "--resume")
    assert default_typed.returncode == 0, default_typed.stderr[-2000:]


def test_a_knob_of_another_strategy_and_an_unknown_strategy_are_one_line_each(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text(doc_file())
    other = train(tmp_path, "--import", str(mine), "--balancer", "lossfree", "--ema-decay", "0.5", "--out", "c")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "--ema-decay does not apply to lossfree" in other.stderr
    unknown = train(tmp_path, "--balancer", "toy_ema", "--out", "d")
    assert unknown.returncode == 2 and "--import FILE" in unknown.stderr and "Traceback" not in unknown.stderr
