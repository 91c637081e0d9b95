"""
Routing health (plumbing/health.py), the collapse alarm and --tensorboard
(plumbing/board.py): the figures on loads worked by hand, the alarm's two
conditions, the figures in log.jsonl and summary.json of a real run, the
alarm on `none` and its silence on the balancing strategies, and the event
files read back with TensorBoard's own reader.
"""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import plumbing
import train
from moe import GPT, GPTConfig
from plumbing.health import Health, health_line, state_summary

ROOT = Path(__file__).resolve().parent.parent

# Where `none` collapses and stays collapsed (docs/health.md): the tiny preset
# with top-1 of 16 experts. Checkpoints only at the end, to keep it quick.
COLLAPSE = ["--preset", "tiny", "--n-experts", "16", "--top-k", "1", "--steps", "300", "--ckpt-every", "1000",
            "--log-every", "50"]


def run(out, *flags):
    assert train.main(["--preset", "tiny", "--out", str(out), *flags]) == 0
    records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return records, json.loads((Path(out) / "summary.json").read_text())


def health(layers=2, experts=4, tokens=8, **kw):
    return Health(layers, experts, tokens, **kw)


def no_state():
    return {}


# ----------------------------------------------------------------------------
# The figures, on loads worked by hand.

def test_figures_of_a_hand_made_load_match_their_definitions():
    h = health(dead_steps=2)
    load = torch.tensor([[2, 2, 2, 2], [8, 0, 0, 0]])
    figures, alarms = h.update(1, load, torch.tensor([1.0, 0.5]), no_state())
    assert figures["tokens_min"] == [2, 0] and figures["tokens_max"] == [2, 8]
    assert figures["tokens_std"] == pytest.approx([0.0, math.sqrt(12)])       # 8 and three 0s: mean 2
    assert figures["busiest_share"] == [0.25, 1.0]                           # of the 8 tokens
    assert figures["load_entropy"] == pytest.approx([math.log(4), 0.0])     # even: ln E; one expert: 0
    assert figures["router_entropy"] == [1.0, 0.5]
    assert figures["dead"] == [0, 0] and not alarms                          # one empty step is not dead
    figures, _ = h.update(2, load, torch.tensor([1.0, 0.5]), no_state())
    assert figures["dead"] == [0, 3]                                         # empty for dead_steps = 2 steps
    figures, _ = h.update(3, torch.tensor([[2, 2, 2, 2], [5, 1, 1, 1]]), torch.zeros(2), no_state())
    assert figures["dead"] == [0, 0]                                         # one token revives them
    assert "load" not in figures
    assert h.update(4, load, torch.zeros(2), no_state(), full=True)[0]["load"] == load.tolist()


def test_the_default_alarm_share_is_the_cube_root_of_the_even_share():
    """0.40 for top-1 of 16 and 0.63 for top-2 of 8, the two measured settings (docs/health.md)."""
    assert plumbing.default_alarm_share(1, 16) == pytest.approx(0.397, abs=1e-3)
    assert plumbing.default_alarm_share(2, 8) == pytest.approx(0.630, abs=1e-3)
    args = train.parse_args(["--preset", "tiny", "--n-experts", "16", "--top-k", "1"])
    assert Health.for_run(args, plumbing.model_config(args)).alarm_share == plumbing.default_alarm_share(1, 16)
    args = train.parse_args(["--preset", "tiny", "--alarm-share", "0.9"])
    assert Health.for_run(args, plumbing.model_config(args)).alarm_share == 0.9


def test_state_summary_gives_the_range_and_how_many_experts_sit_at_each_end():
    bias = torch.tensor([[-0.002, -0.002, 0.001, 0.003], [0.0, 0.0, 0.0, 0.0]])
    s = state_summary({"bias": bias, "steps_done": torch.tensor([3, 3])})
    assert list(s) == ["bias"]                                   # integer counters are not summarised
    assert s["bias"]["min"] == pytest.approx([-0.002, 0.0]) and s["bias"]["max"] == pytest.approx([0.003, 0.0])
    assert s["bias"]["at_min"] == [2, 4] and s["bias"]["at_max"] == [1, 4]


def test_router_entropy_is_the_mean_over_tokens_of_each_tokens_entropy():
    """end_step(entropy=True) divides the summed per-token entropies of every
    micro-step by their token count, per layer, and resets the sums."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layers=2, d_model=16, n_heads=2, n_experts=4, top_k=2,
                    d_expert=8, balancer="aux")
    model = GPT(cfg).train()
    xs = [torch.randint(0, 32, (2, 8)) for _ in range(2)]
    per_token = [[], []]
    for x in xs:
        out = model(x)
        for layer, routing in enumerate(out.routings):
            p = routing.probs.detach().double()
            per_token[layer].append(-(p * p.log()).sum(-1).flatten())
    loads, ent = model.end_step(entropy=True)
    assert loads.shape == (2, 4) and loads.sum() == 2 * 2 * 2 * 8 * 2
    want = torch.stack([torch.cat(t).mean() for t in per_token])
    torch.testing.assert_close(ent, want.to(ent.dtype))
    assert all(layer.entropy.sum() == 0 for layer in model.moe_layers())
    assert torch.equal(model.end_step(), torch.zeros(2, 4, dtype=torch.long))   # no entropy asked: loads alone


# ----------------------------------------------------------------------------
# The alarm's conditions.

def feed(h, shares, experts=4, tokens=100):
    """One step per share: expert 0 takes that share of the tokens of layer 0,
    the rest spread over the others; layer 1 stays even. Returns the alarms."""
    lines = []
    for step, share in enumerate(shares, 1):
        busy = round(share * tokens)
        rest = [(tokens - busy) // (experts - 1)] * (experts - 1)
        rest[0] += tokens - busy - sum(rest)
        load = torch.tensor([[busy, *rest], [tokens // experts] * experts])
        lines += h.update(step, load, torch.zeros(2), no_state())[1]
    return lines


def test_a_collapse_that_persists_for_the_window_raises_one_alarm_naming_layer_expert_and_step():
    h = health(tokens=100, alarm_share=0.4, alarm_window=10)
    lines = feed(h, [0.8] * 30, tokens=100)
    assert len(lines) == 1                                        # once, not at every step after
    assert "step 10" in lines[0] and "layer 0" in lines[0] and "expert 0" in lines[0] and "40%" in lines[0]


def test_a_collapse_that_is_being_corrected_raises_no_alarm():
    """lossfree's shape: collapsed at first, the share falling step by step
    while still above the threshold for longer than the window."""
    h = health(tokens=100, alarm_share=0.4, alarm_window=10)
    assert feed(h, [0.9 - 0.015 * i for i in range(30)], tokens=100) == []


def test_the_share_must_hold_on_nine_steps_in_ten_of_the_window():
    """A collapsed layer has the odd step below the threshold: one in ten is
    forgiven, one in five is not a collapse."""
    assert feed(health(tokens=100, alarm_share=0.4, alarm_window=10), ([0.8] * 4 + [0.3]) * 6, tokens=100) == []
    assert len(feed(health(tokens=100, alarm_share=0.4, alarm_window=10), ([0.8] * 9 + [0.3]) * 3, tokens=100)) == 1


def test_experts_dead_for_alarm_dead_steps_raise_one_alarm_naming_them():
    h = health(tokens=8, alarm_dead_steps=5)
    load = torch.tensor([[8, 0, 0, 0], [2, 2, 2, 2]])
    lines = [line for step in range(1, 9) for line in h.update(step, load, torch.zeros(2), no_state())[1]
             if "no token" in line]
    # share 1.0 on every step, but the window (125) is longer than 8 steps: the dead alarm trips first
    assert len(lines) == 1 and "step 5" in lines[0] and "layer 0" in lines[0] and "experts 1, 2, 3" in lines[0]


def test_the_alarms_and_counters_come_back_from_a_checkpoint():
    """A resumed run neither repeats an alarm nor forgets a collapse in progress."""
    a = health(tokens=100, alarm_share=0.4, alarm_window=10)
    feed(a, [0.8] * 6, tokens=100)
    b = health(tokens=100, alarm_share=0.4, alarm_window=10)
    b.load_state_dict(a.state_dict())
    assert len(feed(b, [0.8] * 4, tokens=100)) == 1            # 6 + 4 = the window
    c = health(tokens=100, alarm_share=0.4, alarm_window=10)
    c.load_state_dict(b.state_dict())
    assert feed(c, [0.8] * 20, tokens=100) == []               # layer 0 has had its alarm
    assert c.summary()["alarms"] == b.summary()["alarms"]


# ----------------------------------------------------------------------------
# In a real run.

def test_a_tiny_run_logs_the_health_of_every_layer_and_the_summary_holds_the_final_counts(tmp_path, capsys):
    records, summary = run(tmp_path, "--steps", "4", "--eval-every", "2")
    layers, experts, k = 2, 8, 2                                     # the tiny preset
    for r in records:
        h = r["health"]
        for key in ("tokens_min", "tokens_max", "tokens_std", "busiest_share", "dead", "load_entropy",
                    "router_entropy"):
            assert len(h[key]) == layers, key
        assert all(0 < e <= math.log(experts) + 1e-6 for e in h["router_entropy"])
        assert set(h["state"]["bias"]) == {"min", "max", "at_min", "at_max"}     # lossfree, the default
    evaluated = [r for r in records if "val_loss" in r]
    assert evaluated and all(len(r["health"]["load"]) == layers for r in evaluated)
    tokens = 8 * 64                                                  # batch x seq_len
    assert [sum(row) for row in summary["load_by_layer"]] == [tokens * k] * layers
    assert summary["load_by_layer"] == records[-1]["health"]["load"]
    assert summary["alarms"] == []
    text = capsys.readouterr().out
    assert plumbing.evaluation_line(2, evaluated[0]) in text and "routing: dead experts" in text


def alarm_lines(capsys):
    out = capsys.readouterr()
    return [line for line in (out.out + out.err).splitlines() if "collapse alarm" in line]


def test_none_trips_the_collapse_alarm_once_per_layer_at_most(tmp_path, capsys):
    records, summary = run(tmp_path, *COLLAPSE, "--balancer", "none")
    lines = alarm_lines(capsys)
    assert lines, "none should collapse on top-1 of 16 experts (docs/health.md)"
    layers = [re.search(r"in layer (\d+)", line).group(1) for line in lines]
    assert len(layers) == len(set(layers))                           # at most once per layer
    assert summary["alarms"] == lines
    logged = [a for r in records for a in r["health"].get("alarms", [])]
    assert logged == lines                                           # the alarm's step is always logged


@pytest.mark.parametrize("balancer", ["lossfree", "aux", "global_aux"])
def test_balancing_strategies_at_their_defaults_raise_no_alarm(tmp_path, capsys, balancer):
    """lossfree starts as collapsed as none (docs/health.md) but corrects it."""
    _, summary = run(tmp_path, *COLLAPSE, "--balancer", balancer)
    assert alarm_lines(capsys) == [] and summary["alarms"] == []


@pytest.mark.parametrize("flags, words", [
    (["--alarm-share", "0"], "--alarm-share"),
    (["--alarm-share", "1.5"], "--alarm-share"),
    (["--alarm-window", "0"], "--alarm-window"),
    (["--dead-steps", "0"], "--dead-steps"),
    (["--alarm-dead-steps", "-1"], "--alarm-dead-steps"),
])
def test_bad_health_flags_give_one_line_and_status_2(tmp_path, capsys, monkeypatch, flags, words):
    monkeypatch.setattr(sys, "argv", ["train.py", "--preset", "tiny", "--out", str(tmp_path / "o"), *flags])
    with pytest.raises(SystemExit) as exc:
        plumbing.cli(train.main)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err


# ----------------------------------------------------------------------------
# TensorBoard.

def documented_tags():
    """Every tag docs/health.md names in backquotes in its tables (the table
    of TensorBoard tags: a lossfree run's)."""
    rows = [line for line in (ROOT / "docs" / "health.md").read_text().splitlines() if line.startswith("|")]
    return set(re.findall(r"`((?:train|eval|health|load|state)/[A-Za-z0-9_/]+)`", "\n".join(rows)))


def test_tensorboard_writes_the_documented_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    records, _ = run(tmp_path, "--steps", "4", "--eval-every", "2", "--tensorboard")
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    written = set(tags["scalars"]) | set(tags["histograms"])
    named = documented_tags()
    assert len(named) >= 20, "docs/health.md should list the tags"
    assert named <= written, f"documented but not written: {sorted(named - written)}"
    # The numbers are the log's: the same loss at every logged step.
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records])
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [2, 4]
    assert len(acc.Histograms("load/layer0")) == len(records)


def test_tensorboard_dir_can_be_named(tmp_path):
    pytest.importorskip("tensorboard")
    run(tmp_path / "out", "--steps", "2", "--tensorboard", str(tmp_path / "tb"))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not (tmp_path / "out" / "tensorboard").exists()


def test_tensorboard_without_the_package_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    # None in sys.modules makes `import tensorboard` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(sys, "argv", ["train.py", "--preset", "tiny", "--out", str(tmp_path / "o"), "--tensorboard"])
    with pytest.raises(SystemExit) as exc:
        plumbing.cli(train.main)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip() == f"error: {plumbing.TENSORBOARD_MISSING}"
    assert not (tmp_path / "o").exists()                              # refused before anything was made


def test_the_health_line_is_short_at_any_depth():
    h = {"dead": [0] * 8, "busiest_share": [0.2] * 8, "load_entropy": [4.0] * 8, "router_entropy": [3.0] * 8,
         "state": {"bias": {"min": [-0.01] * 8, "max": [0.02] * 8, "at_min": [1] * 8, "at_max": [2] * 8}}}
    assert len(health_line(h, 64)) < 240
