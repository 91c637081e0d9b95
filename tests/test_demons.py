"""
The demons gallery (lab/demons.py): each shipped balancing bug, rebuilt as a
wrong variant, shows its symptom in numbers, and the project's code on the
same input does not. docs/demons.md cites every one.
"""

import json
import re
from pathlib import Path

import pytest
import torch

import balancers
import plumbing
import train
from balancers import BALANCERS, AuxLoss, LossFree
from distributed import run_distributed
from lab import demons
from moe import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def registry_restored():
    """A test that registers demons (--import lab/demon_strategies.py) leaves
    the registry as it found it, so no later test meets them."""
    before = dict(BALANCERS)
    yield
    BALANCERS.clear()
    BALANCERS.update(before)


def test_pooled_layers_loss_calls_a_model_balanced_whose_every_layer_is_collapsed():
    """Four layers, each sending every token to a different expert: pooled,
    the counts are even, the loss sits at its minimum (1) and its gradient is
    zero; per layer it is near its maximum (E per layer) and pushes back."""
    s = demons.pooled_layers_symptom()
    assert s["maxvio_by_layer"] == [3.0] * 4 and s["maxvio_pooled"] == 0      # E - 1: fully collapsed
    assert s["pooled_loss"] == pytest.approx(1.0, abs=1e-6)
    assert s["pooled_grad_norm"] < 1e-6
    assert s["per_layer_loss"] > 3.5 * 4 and s["per_layer_grad_norm"] > 1e-2


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_f_not_divided_by_k_scores_a_balanced_router_k_instead_of_1(top_k):
    s = demons.f_not_divided_by_k_symptom(top_k)
    assert s["project_loss"] == pytest.approx(1.0)
    assert s["demon_loss"] == pytest.approx(float(top_k))


def test_world_size_scaled_aux_doubles_only_the_demon_from_one_to_two_processes():
    s = demons.world_size_scaled_symptom()
    assert s["project_loss_2_process"] == pytest.approx(s["project_loss_1_process"])
    assert s["demon_loss_2_process"] == pytest.approx(2 * s["demon_loss_1_process"])


def balance_loss_on_ranks(rank, world_size, demon):
    """A spawned worker: the tiny model's balance loss on this rank's half of
    a fixed batch, averaged over ranks as train_step reports it."""
    strategy = "aux"
    if demon:
        strategy = "demon_world_size_scaled"
        balancers.register(strategy, demons.WorldSizeScaled)        # (the registry_restored fixture undoes it here)
    proc = plumbing.Proc(rank, world_size, torch.device("cpu")).start(None)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, seq_len=16, n_layers=2, d_model=16, n_heads=2, n_experts=4, top_k=2,
                    d_expert=8, balancer=strategy)
    model = GPT(cfg, proc.mesh)
    x = torch.randint(0, 32, (8, 16), generator=torch.Generator().manual_seed(1))
    b = 8 // world_size
    loss = model(x[rank * b:(rank + 1) * b]).balance_loss.detach()
    return (proc.all_reduce(loss) / world_size).item()


def test_world_size_scaled_aux_changes_the_loss_between_one_and_two_real_processes(registry_restored):
    """The same global batch through the expert-parallel model on 1 and on 2
    gloo processes: the project's aux loss is the same, the demon's doubles."""
    one = {demon: balance_loss_on_ranks(0, 1, demon) for demon in (False, True)}
    two = {demon: run_distributed(balance_loss_on_ranks, 2, demon)[0] for demon in (False, True)}
    assert two[False] == pytest.approx(one[False], rel=1e-5)
    assert two[True] == pytest.approx(2 * one[True], rel=1e-5)


def test_bf16_counts_flip_the_sign_of_a_bias_update_on_a_constructed_load():
    """Exactly, expert 0 is the underloaded one (1018 < 1019) and its bias
    must rise; summed in bf16 the counts read 1020 and 1016 and it falls."""
    s = demons.bf16_counts_symptom()
    assert s["exact_counts"] == [1018, 1019] and s["bf16_counts"] == [1020.0, 1016.0]
    assert s["project_bias_update"] == pytest.approx([1e-3, -1e-3])
    assert s["demon_bias_update"] == pytest.approx([-1e-3, 1e-3])


def test_counts_the_project_reduces_stay_exact_integers():
    """How the project avoids it: the loads end_step hands to step() are
    integers, summed as integers (moe.GPT.end_step)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, seq_len=8, n_layers=1, d_model=16, n_heads=2, n_experts=4, top_k=2,
                    d_expert=8, balancer="lossfree")
    model = GPT(cfg).train()
    model(torch.randint(0, 32, (2, 8)))
    assert model.end_step().dtype == torch.long


def test_the_folded_bias_receives_gradient_and_the_projects_bias_none():
    s = demons.folded_bias_symptom()
    assert s["project_bias_grad"] is None
    assert s["demon_bias_grad"] > 0


def test_the_silent_zero_loss_is_exactly_zero_and_the_project_refuses_an_unknown_key():
    s = demons.silent_zero_symptom()
    assert s["demon_loss"] == 0.0 and s["project_loss"] > 0
    assert s["project_refuses_the_unknown_key"]


def test_the_silent_zero_run_trains_exactly_like_none(tmp_path, monkeypatch):
    """Its loss is computed and added, and it is 0: MaxVio stays where `none`
    has it, step for step."""
    monkeypatch.setitem(BALANCERS, "demon_silent_zero", demons.SilentZero)
    curves = {}
    for name in ("none", "demon_silent_zero"):
        assert train.main(["--preset", "tiny", "--steps", "6", "--out", str(tmp_path / name),
                           "--balancer", name]) == 0
        records = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        curves[name] = [(r["loss"], r["maxvio_batch"], r["balance_loss"]) for r in records]
    assert curves["demon_silent_zero"] == curves["none"]


def test_a_demon_trains_through_import_and_its_folded_bias_leaves_the_sign_rules_grid(tmp_path, registry_restored):
    """--import lab/demon_strategies.py makes them --balancer choices. The
    sign rule moves a bias by exactly u = 1e-3 per step, so lossfree's bias
    stays on multiples of u; the folded bias is a parameter like any weight
    (initialised at random by GPT, moved by AdamW with its gradient) and is
    off that grid."""
    for name in ("lossfree", "demon_folded_bias"):
        assert train.main(["--preset", "tiny", "--steps", "3", "--out", str(tmp_path / name), "--balancer", name,
                           "--import", str(ROOT / "lab" / "demon_strategies.py")]) == 0
    off_grid = {}
    for name in ("lossfree", "demon_folded_bias"):
        bias = torch.tensor(json.loads((tmp_path / name / "summary.json").read_text())["state"]["bias"])
        off_grid[name] = (bias / 1e-3 - (bias / 1e-3).round()).abs().max().item()
    assert off_grid["lossfree"] < 1e-3 and off_grid["demon_folded_bias"] > 1e-2
    assert all(f"demon_{d.name}" in BALANCERS for d in demons.DEMONS.values() if d.strategy)


def test_importing_the_gallery_registers_nothing():
    assert not any(name.startswith("demon_") for name in BALANCERS)


def test_every_demon_is_in_docs_demons_md_with_its_threads():
    text = (ROOT / "docs" / "demons.md").read_text()
    for demon in demons.DEMONS.values():
        assert f"`{demon.name}`" in text, demon.name
        for thread in demon.threads:
            for number in re.findall(r"#\d+", thread):
                assert number in text, (demon.name, number)
    assert len(demons.DEMONS) >= 6


def test_the_gallery_prints_every_demon(capsys):
    assert demons.main([]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}:" in out for name in demons.DEMONS)
