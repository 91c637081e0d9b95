"""
Tests of the lesson notebook: the committed lesson.ipynb is what
`python lesson.py --build` makes of lesson.py, and it runs top to bottom.

Running it trains three tiny models (about a minute on an idle 2-core
machine; docs/lesson.md has the measured time), so it is the slowest test of
the suite by design: it is the notebook a class will run.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat, nbclient and ipykernel "
                                                   "(pip install nbformat nbclient ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbclient and ipykernel "
                                                   "(pip install nbclient ipykernel)")
pytest.importorskip("ipykernel", reason="the notebook tests need ipykernel (pip install ipykernel)")

def test_the_committed_notebook_is_the_one_lesson_py_builds():
    """The builder numbers the cells instead of drawing random ids, so a
    rebuild of an unchanged lesson.py is the committed file byte for byte."""
    res = subprocess.run([sys.executable, str(ROOT / "lesson.py"), "--check"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


def test_every_cell_of_lesson_py_is_in_the_notebook_and_nothing_of_the_builder():
    nb = nbformat.reads((ROOT / "lesson.ipynb").read_text(encoding="utf-8"), as_version=4)
    source = (ROOT / "lesson.py").read_text(encoding="utf-8")
    assert len(nb.cells) == source.count("\n# %%") and nb.cells[0].cell_type == "markdown"
    assert not any("def notebook(" in cell.source for cell in nb.cells)


def test_the_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.reads((ROOT / "lesson.ipynb").read_text(encoding="utf-8"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()         # a cell that raises fails the test with its traceback
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
    text = "".join(o.get("text", "") for o in outputs)
    assert "balancers.AuxLoss gives" in text and "the whole lesson took" in text
