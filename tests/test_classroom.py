"""The classroom loop: edit a strategy, run the same command again, compare.
Without --out every run gets a folder of its own, so a rerun never meets the
previous run; runs/BALANCER/latest names the newest, which sample.py and
lab/show_routing.py find, and --resume continues."""

import os

import pytest

import plumbing
import train

pytestmark = pytest.mark.lesson


def test_the_same_command_twice_keeps_both_runs_and_latest_names_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert train.main(["--preset", "tiny", "--steps", "2", "--balancer", "lossfree"]) == 0
    family = tmp_path / "runs" / "lossfree"
    assert sorted(p.name for p in family.iterdir()) == ["latest", "run-001", "run-002"]
    assert os.readlink(family / "latest") == "run-002"
    assert (family / "run-001" / "summary.json").exists() and (family / "run-002" / "summary.json").exists()
    # sample.py and lab/show_routing.py read a checkpoint through load_model: the family folder means its newest run
    _, ckpt = plumbing.load_model(family)
    assert ckpt["run_id"] == plumbing.read_checkpoint(family / "run-002" / "ckpt.pt")["run_id"]
    # --resume without --out continues the newest run, in its own folder
    assert train.main(["--preset", "tiny", "--steps", "3", "--balancer", "lossfree", "--resume"]) == 0
    assert plumbing.read_checkpoint(family / "run-002" / "ckpt.pt")["step"] == 3
    assert not (family / "run-003").exists()


def test_resume_without_an_earlier_run_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no earlier run in runs/aux/ to continue"):
        train.main(["--preset", "tiny", "--steps", "2", "--balancer", "aux", "--resume"])
    assert not (tmp_path / "runs" / "aux").exists()
