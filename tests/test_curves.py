"""lab/curves.py: a run's log.jsonl drawn into one PNG, and a folder that is
no run refused in one line."""

import pytest

import plumbing
import train
from lab import curves


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step lossfree run: every panel has something to draw, the bias
    included."""
    out = tmp_path_factory.mktemp("run") / "lossfree"
    assert train.main(["--preset", "tiny", "--steps", "4", "--balancer", "lossfree", "--out", str(out)]) == 0
    return out


def test_a_run_is_drawn_into_one_non_empty_png_named_by_the_prefix(tiny_run, tmp_path, capsys):
    assert curves.main([str(tiny_run), "--out", str(tmp_path / "curves")]) == 0
    png = tmp_path / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert capsys.readouterr().out.strip() == str(png)


def test_every_figure_the_panels_need_is_read_from_the_log(tiny_run):
    """MaxVio by layer, the health figures and the bias per expert: what the
    panels draw, read from the log of a real run (so a renamed field shows
    here, not as an empty panel)."""
    records = curves.read_runs([tiny_run])["lossfree"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for get in (lambda r: r["maxvio_batch_by_layer"][1], lambda r: max(r["health"]["busiest_share"]),
                lambda r: sum(r["health"]["dead"]), lambda r: r["loss"], lambda r: r["balance_loss"]):
        assert len(curves.series(records, get)[1]) == 4
    bias = curves.state_series(records)
    assert {name for name, _, _ in bias} == {"bias"} and len(bias) == 2 * 8        # tiny: 2 layers, 8 experts


def test_runs_in_folders_of_the_same_name_keep_apart_by_their_paths(tiny_run, tmp_path):
    twin = tmp_path / "other" / tiny_run.name
    twin.mkdir(parents=True)
    (twin / "log.jsonl").write_text((tiny_run / "log.jsonl").read_text())
    assert sorted(curves.read_runs([tiny_run, twin])) == sorted([str(tiny_run), str(twin)])


def test_a_folder_without_log_jsonl_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    """Through the command (plumbing.cli): exit code 2, one line naming the
    folder, and no PNG half drawn from the runs that were fine."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as stopped:
        plumbing.cli(lambda: curves.main([str(tiny_run), str(empty), "--out", str(tmp_path / "curves")]))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and "no log.jsonl" in err[0], err
    assert not (tmp_path / "curves.png").exists()
