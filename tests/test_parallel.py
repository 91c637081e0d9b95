"""Multi-process tests: expert parallelism, the (dp, ep) mesh, and the
balancing statistics that must be global (gloo on CPU, 2 and 4 processes).

The promise of train.py is that the global batch is the unit of everything:
the number of processes and --grad-accum only decide how it is cut up. So a
2-process run must reproduce the 1-process run on the same global batch, and
the strategies that balance over the global batch (global_aux, lossfree)
must see the same counts on every rank.

The same holds for 4 processes in a mesh of 2 replicas x 2 expert-parallel
ranks, and a checkpoint it writes resumes on 2 processes and on 1.

Spawning costs a few seconds, so one spawn does every 2-process run of the
module, one every 4-process run, and the tests compare slices of their
results."""

import functools
import sys

import pytest
import torch
import torch.distributed.checkpoint

import plumbing
import train
from balancers import BALANCERS, make_balancer
from data import Corpus
from distributed import run_distributed
from moe import GPT, MeshLayout, MoELayer, is_expert_param

WORLD = 2
STEPS = 3
STRATEGIES = list(BALANCERS)
# global_aux's Algorithm-1 buffer lets early micro-steps see only the counts
# seen so far, so its loss changes with accumulation by design.
ACCUM_INVARIANT = [s for s in STRATEGIES if BALANCERS[s].accum_invariant]


# ----------------------------------------------------------------------------
# Expert-parallel training runs (tiny preset, a random 3-domain corpus).

def tiny_corpus():
    """Three domains of random bytes, each with its own byte range, so the
    ranks' local batches really differ."""
    g = torch.Generator().manual_seed(1234)
    train_streams = [torch.randint(lo, lo + 100, (4000,), generator=g, dtype=torch.uint8)
                     for lo in (0, 80, 156)]
    val_streams = [torch.randint(lo, lo + 100, (600,), generator=g, dtype=torch.uint8)
                   for lo in (0, 80, 156)]
    return Corpus(domains=["a", "b", "c"], train=train_streams, val=val_streams,
                  train_docs=[1, 1, 1], val_docs=[1, 1, 1], source="random bytes")


# AdamW's first steps are ~ g / (|g| + eps). For a gradient element below
# eps = 1e-8 (at initialisation a few attention weights get gradients of a
# few 1e-9), float rounding of ~1e-10 -- which any change of summation order
# produces, e.g. 8 sequences in one matmul vs 4 + 4 and an all-reduce -- moves
# that parameter by up to lr * 1e-10 / 1e-8: a relative 1e-3 on one weight
# after a single step, with no bug anywhere. The runs below use eps = 1e-6,
# which keeps the parameters a function of the gradients, not of the
# rounding; how the batch is split does not interact with eps.
ADAM_EPS = 1e-6


def tiny_args(balancer, grad_accum=1, ep_size=None):
    """The tiny preset on 32-byte sequences. The gradient norm is ~0.5 here,
    so --grad-clip 0.25 makes clipping, and with it the norm summed over the
    ranks' expert shards, part of the tests."""
    return train.parse_args(["--preset", "tiny", "--balancer", balancer, "--steps", str(STEPS),
                             "--seq-len", "32", "--warmup", "0", "--grad-clip", "0.25",
                             "--grad-accum", str(grad_accum)] + (["--ep-size", str(ep_size)] if ep_size else []))


def build_run(args, rank, world_size):
    """Proc (with its mesh), model and optimizer, as train.main makes them."""
    plumbing.check_args(args, world_size)
    proc = plumbing.Proc(rank, world_size, torch.device("cpu")).start(args.ep_size)
    model, opt = train.build(args, proc)
    for group in opt.param_groups:
        group["eps"] = ADAM_EPS
    return proc, model, opt


def train_run(balancer, grad_accum, rank, world_size, ep_size=None):
    """STEPS optimizer steps of train.train_step; returns what the tests compare."""
    args = tiny_args(balancer, grad_accum, ep_size)
    proc, model, opt = build_run(args, rank, world_size)
    local_loads, global_loads, grads = [], [], []
    end_step, opt_step = model.end_step, opt.step

    def recording_end_step(**kw):
        local_loads.append(torch.stack([layer.load.clone() for layer in model.moe_layers()]))
        out = end_step(**kw)
        # train_step asks for (loads, router entropy) with entropy=True
        global_loads.append((out[0] if kw.get("entropy") else out).clone())
        return out

    def recording_opt_step(*a, **kw):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return opt_step(*a, **kw)

    model.end_step, opt.step = recording_end_step, recording_opt_step
    corpus = tiny_corpus()
    recs = [train.train_step(model, opt, corpus, step, args, proc) for step in range(STEPS)]
    return {
        "loss": torch.tensor([r["loss"] for r in recs], dtype=torch.float64),
        "balance_loss": torch.tensor([r["balance_loss"] for r in recs], dtype=torch.float64),
        "grad_norm": torch.tensor([r["grad_norm"] for r in recs], dtype=torch.float64),
        "router_entropy": torch.stack([r["router_entropy"] for r in recs]),   # [steps, layers], health figure
        "grads": grads,                              # what AdamW received at each step (synced, clipped)
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "local_loads": torch.stack(local_loads),     # [steps, layers, E] before the all-reduce
        "loads": torch.stack(global_loads),          # [steps, layers, E] what step() received
        "state": model.strategy_state(),             # {name: [layers, ...]}, e.g. lossfree's bias
    }


RUNS_2RANK = [(s, 1) for s in STRATEGIES] + [(s, 2) for s in ACCUM_INVARIANT]


@pytest.fixture(scope="module")
def two_rank(spawned):
    """Every 2-process training run: {(strategy, grad_accum): [rank0, rank1]}."""
    return {run: [r["training"][run] for r in spawned] for run in RUNS_2RANK}


@functools.lru_cache(maxsize=None)
def one_rank(balancer, grad_accum):
    return train_run(balancer, grad_accum, 0, 1)


def full_model(ranks, ep_size=None):
    """One model's parameters and per-step gradients from the ranks' views:
    expert tensors are the concatenation of the shards of the mesh's first
    row (its rank 0 owns the first experts); replicated ones are rank 0's."""
    row = [ranks[r] for r in MeshLayout(len(ranks), ep_size or len(ranks)).ep_groups()[0]]
    return dict(row[0], params=merge_shards([r["params"] for r in row]),
                grads=[merge_shards([r["grads"][s] for r in row]) for s in range(STEPS)])


def merge_shards(views):
    """{name: tensor} of one row of the mesh, its expert shards side by side."""
    return {n: torch.cat([v[n] for v in views]) if is_expert_param(n) else views[0][n] for n in views[0]}


def assert_tensor_close(got, ref, rtol, what):
    """||got - ref|| <= rtol * ||ref||: a relative error per tensor. (Per
    element it is meaningless for weights that pass through zero.)"""
    assert got.shape == ref.shape, what
    err = (got.double() - ref.double()).norm().item()
    assert err <= rtol * ref.double().norm().item(), \
        f"{what}: relative error {err / max(ref.double().norm().item(), 1e-30):.2e} > {rtol:.0e}"


def assert_same_training(got, ref, what):
    """Same losses and gradient norms at every step, same gradients at the
    first step (where both runs start from identical parameters, so any
    difference is the parallel code's) and same parameters after the last
    step, to a relative 1e-5; the same load counts exactly."""
    for key in ("loss", "balance_loss", "grad_norm"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=0,
                                   msg=lambda m: f"{what}: {key} differs\n{m}")
    assert torch.equal(got["loads"], ref["loads"]), f"{what}: expert loads differ"
    torch.testing.assert_close(got["router_entropy"], ref["router_entropy"], rtol=1e-5, atol=0,
                               msg=lambda m: f"{what}: mean router entropy differs\n{m}")
    assert len(got["grads"]) == len(ref["grads"]) == STEPS
    assert got["grads"][0].keys() == ref["grads"][0].keys()
    for name, r in ref["grads"][0].items():
        assert_tensor_close(got["grads"][0][name], r, 1e-5, f"{what}: first-step gradient of {name}")
    assert got["params"].keys() == ref["params"].keys()
    for name, p in ref["params"].items():
        assert_tensor_close(got["params"][name], p, 1e-5, f"{what}: parameter {name}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_rank_expert_parallel_equals_one_rank(two_rank, strategy):
    """Expert parallelism only moves tokens between ranks: 2 processes must
    train like 1 process on the same global batch -- losses, gradients (whose
    global norm catches a wrong scale on expert gradients, which AdamW's
    scale invariance would hide) and every parameter after 3 steps, the
    expert weights being the two ranks' shards side by side."""
    assert_same_training(full_model(two_rank[(strategy, 1)]), one_rank(strategy, 1),
                         f"{strategy}, 2 ranks vs 1")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replicated_parameters_stay_identical_on_every_rank(two_rank, strategy):
    """Attention, router, norms and embeddings are replicated: after the
    gradient all-reduce every rank must hold bit-identical copies, or the
    ranks silently train different models."""
    r0, r1 = two_rank[(strategy, 1)]
    for name, p in r0["params"].items():
        if not is_expert_param(name):
            assert torch.equal(p, r1["params"][name]), name


@pytest.mark.parametrize("strategy", ACCUM_INVARIANT)
def test_grad_accumulation_equals_one_big_batch(strategy):
    """--grad-accum 2 cuts the same global batch in two micro-steps; for every
    strategy whose statistics are defined per sequence group or per global
    batch, training must not change."""
    assert_same_training(one_rank(strategy, 2), one_rank(strategy, 1), f"{strategy}, accum 2 vs 1")


@pytest.mark.parametrize("strategy", ACCUM_INVARIANT)
def test_two_rank_with_grad_accumulation_equals_one_rank(two_rank, strategy):
    """2 processes x 2 micro-steps is a third way to cut the same global batch."""
    assert_same_training(full_model(two_rank[(strategy, 2)]), one_rank(strategy, 1),
                         f"{strategy}, 2 ranks x accum 2 vs 1 rank")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_state_is_identical_on_every_rank_and_equals_one_rank(two_rank, strategy):
    """Whatever state a strategy keeps (lossfree's bias, Wang et al. 2024,
    Alg. 1) follows the load of the whole global batch. The ranks see
    different tokens, so their local counts differ, yet step() must get the
    same all-reduced counts everywhere and every rank must end with the same
    state as one process (else the replicas route differently). A strategy
    that keeps state must also have moved it."""
    for accum in (1, 2) if strategy in ACCUM_INVARIANT else (1,):
        r0, r1 = two_rank[(strategy, accum)]
        ref = one_rank(strategy, 1)
        if BALANCERS[strategy].token_choice:    # expert choice's loads are equal by construction
            assert not torch.equal(r0["local_loads"], r1["local_loads"]), "ranks saw the same routing"
        assert torch.equal(r0["loads"], r0["local_loads"] + r1["local_loads"])
        assert torch.equal(r0["loads"], r1["loads"])
        assert torch.equal(r0["loads"], ref["loads"])
        assert r0["state"].keys() == r1["state"].keys() == ref["state"].keys()
        for name, value in ref["state"].items():
            assert value.shape[0] == 2, f"{name}: one entry per layer"
            if value.is_floating_point():
                assert value.abs().sum() > 0, f"{strategy}: state {name} never moved"
            assert torch.equal(r0["state"][name], value), f"{strategy}: {name} on rank 0 differs from 1 rank"
            assert torch.equal(r1["state"][name], value), f"{strategy}: {name} on rank 1 differs from 1 rank"


# ----------------------------------------------------------------------------
# global_aux on its own: the counts are global, P stays local.

E, K, D = 8, 2, 16
ALPHA = 1e-2


def rank_logits(rank, seed, weight):
    """Router logits of one rank's local batch [2 seqs, 6 tokens, E]. Each
    rank's tokens lean towards a different half of the experts, so local and
    global counts are far apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, D, generator=g)
    lean = torch.zeros(E)
    lean[rank * E // 2:(rank + 1) * E // 2] = 1.5
    return x @ weight.T + lean


def router_weight():
    return torch.randn(E, D, generator=torch.Generator().manual_seed(7)) * 0.5


def global_aux_worker(rank, world_size):
    bal = make_balancer("global_aux", E, K, dict(alpha=ALPHA), world_size).train()
    out = {}
    # One micro-step: loss and gradients.
    w = torch.nn.Parameter(router_weight())
    logits = rank_logits(rank, 100 + rank, w)
    logits.retain_grad()
    routing = bal.route(logits)
    loss = bal.loss(routing)
    loss.backward()
    out["one"] = dict(loss=loss.detach(), w_grad=w.grad.clone(), logits_grad=logits.grad.clone(),
                      expert_idx=routing.expert_idx.clone(), seen=bal.seen.clone())
    bal.step(torch.zeros(E, dtype=torch.long))
    out["seen_after_step"] = bal.seen.clone()
    # A uniform router on every rank.
    out["uniform_loss"] = bal.loss(bal.route(torch.zeros(2, 6, E))).detach()
    bal.step(torch.zeros(E, dtype=torch.long))
    # Two micro-steps of gradient accumulation.
    micro = []
    for m in range(2):
        routing = bal.route(rank_logits(rank, 200 + 10 * rank + m, router_weight()))
        loss = bal.loss(routing)
        micro.append(dict(loss=loss.detach(), probs=routing.probs.detach(),
                          expert_idx=routing.expert_idx.clone(), seen=bal.seen.clone()))
    out["accum"] = micro
    bal.step(torch.zeros(E, dtype=torch.long))
    out["accum_seen_after_step"] = bal.seen.clone()
    return out


@pytest.fixture(scope="module")
def global_aux_ranks(spawned):
    return [r["global_aux"] for r in spawned]


# ----------------------------------------------------------------------------
# One spawn for the whole module (starting 2 Python processes that import
# torch costs several seconds).

def worker(rank, world_size):
    return {"training": {run: train_run(*run, rank, world_size) for run in RUNS_2RANK},
            "global_aux": global_aux_worker(rank, world_size),
            "host_syncs": host_syncs_of_one_layer(rank, world_size)}


def host_syncs_of_one_layer(rank, world_size):
    """The Python calls that read a tensor's value on the host during one
    expert-parallel (ep = 2) MoE layer's forward and backward under bf16
    autocast, on the GPU's grouped path (forced, as tests/test_moe.py does
    for ep = 1; None where this CPU has no bf16 grouped kernel)."""
    from plumbing import kernels
    from test_moe import HOST_SYNCS, grouped_mm_bf16_on_cpu, small_config
    if not grouped_mm_bf16_on_cpu():
        return None
    mesh = plumbing.Proc(rank, world_size, torch.device("cpu")).start(world_size).mesh
    torch.manual_seed(0)
    layer = MoELayer(small_config("lossfree", n_experts=8, top_k=2, d_model=16, d_expert=16), mesh).train()
    x = torch.randn(2, 12, 16, requires_grad=True)
    real_fast, kernels.grouped_mm_fast_on_cuda = kernels.grouped_mm_fast_on_cuda, lambda *args: True
    calls, originals = [], [(owner, name, getattr(owner, name)) for owner, name in HOST_SYNCS]
    for owner, name, real in originals:
        setattr(owner, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, loss, _ = layer(x)
        (y.float().square().sum() + loss).backward()
    finally:
        for owner, name, real in originals:
            setattr(owner, name, real)
        kernels.grouped_mm_fast_on_cuda = real_fast
    return calls


def test_an_expert_parallel_layer_waits_for_the_device_once_for_the_split_sizes(spawned):
    """At ep > 1 an MoE layer's forward and backward read the device exactly
    once: the all-to-all's split sizes, which NCCL takes as host integers
    (MoELayer.run_experts fetches both lists in one .tolist()). The backward
    reuses them. Counting method as in test_moe's ep = 1 test, whose answer
    is zero."""
    for r in spawned:
        if r["host_syncs"] is None:
            pytest.skip("torch._grouped_mm has no bf16 CPU kernel here")
        assert r["host_syncs"] == ["tolist"], r["host_syncs"]


@pytest.fixture(scope="module")
def spawned():
    return run_distributed(worker, WORLD)


def test_global_aux_two_ranks_equal_one_process_on_concatenated_batch(global_aux_ranks):
    """Qiu et al. 2025, Eq. 5: with fbar all-reduced and P local, the mean of
    the ranks' losses (what gradient averaging optimises) is the loss of one
    process on the concatenated batch, and so are its gradients w.r.t. the
    router weight and the logits."""
    ranks = [r["one"] for r in global_aux_ranks]
    w = torch.nn.Parameter(router_weight())
    logits = torch.cat([rank_logits(r, 100 + r, w) for r in range(WORLD)])
    logits.retain_grad()
    bal = make_balancer("global_aux", E, K, dict(alpha=ALPHA)).train()
    routing = bal.route(logits)
    loss = bal.loss(routing)
    loss.backward()
    assert torch.equal(torch.cat([r["expert_idx"] for r in ranks]), routing.expert_idx)
    losses = torch.stack([r["loss"] for r in ranks])
    assert not torch.allclose(losses[0], losses[1]), "ranks should see different P"
    # Values are ~1e-2 (loss) and ~1e-4 (gradients): relative tolerances only.
    torch.testing.assert_close(losses.mean(), loss.detach(), rtol=1e-6, atol=0)
    assert w.grad.abs().max() > 1e-4 and logits.grad.abs().max() > 1e-5
    torch.testing.assert_close(torch.stack([r["w_grad"] for r in ranks]).mean(0), w.grad,
                               rtol=1e-5, atol=1e-10)
    # d(mean over ranks)/d(rank j's logits) = (1 / world) d(loss_j)/d(logits_j)
    torch.testing.assert_close(torch.cat([r["logits_grad"] for r in ranks]) / WORLD, logits.grad,
                               rtol=1e-5, atol=1e-10)
    for r in ranks:
        assert torch.equal(r["seen"], torch.bincount(routing.expert_idx, minlength=E))


def test_global_aux_loss_does_not_shrink_with_world_size(global_aux_ranks):
    """A uniform router scores exactly alpha on every rank, as on one process.
    (One shipped implementation divided by the global token count squared
    while P was local, scaling the loss by 1/world_size.)"""
    bal = make_balancer("global_aux", E, K, dict(alpha=ALPHA)).train()
    single = bal.loss(bal.route(torch.zeros(2 * WORLD, 6, E))).detach()
    assert single == torch.tensor(ALPHA)
    for r in global_aux_ranks:
        assert r["uniform_loss"] == torch.tensor(ALPHA)


def test_global_aux_last_micro_step_uses_counts_of_whole_global_batch(global_aux_ranks):
    """Qiu et al. 2025, Algorithm 1: the buffer adds every micro-step's
    all-reduced counts, so at the last micro-step f is exactly the global
    batch's (both ranks, both micro-steps) while P is the local micro-batch's."""
    acc = [r["accum"] for r in global_aux_ranks]
    first = torch.bincount(torch.cat([a[0]["expert_idx"] for a in acc]), minlength=E)
    total = torch.bincount(torch.cat([a[m]["expert_idx"] for a in acc for m in range(2)]), minlength=E)
    for a in acc:
        assert torch.equal(a[0]["seen"], first)
        assert torch.equal(a[1]["seen"], total)
        f = total.double() / total.sum()
        P = a[1]["probs"].double().reshape(-1, E).mean(0)
        expected = ALPHA * E * (f * P).sum()
        torch.testing.assert_close(a[1]["loss"].double(), expected, rtol=1e-6, atol=0)


def test_global_aux_buffer_resets_after_step(global_aux_ranks):
    """step() runs once per optimizer step; the next global batch must start
    counting from zero, not inherit the previous batch's counts."""
    for r in global_aux_ranks:
        assert r["one"]["seen"].sum() > 0
        assert torch.equal(r["seen_after_step"], torch.zeros(E, dtype=torch.long))
        assert torch.equal(r["accum_seen_after_step"], torch.zeros(E, dtype=torch.long))


# ----------------------------------------------------------------------------
# The (dp, ep) mesh: 4 processes, 2 replicas (dp) x 2 expert-parallel ranks
# (ep). Ranks 0 and 1 share the experts out and exchange tokens; ranks 2 and
# 3 do the same with copies of those experts. The global batch is still the
# unit: this must train like 1 process too.

MESH_WORLD, MESH_EP = 4, 2
RESUME_AT = 2          # the checkpoint's step; the resumed runs train the rest of STEPS


def resume_run(rank, world_size, ep_size, path, load):
    """lossfree on the given mesh: either the first RESUME_AT steps and then a
    checkpoint at `path`, or that checkpoint loaded and the steps after it."""
    args = tiny_args("lossfree", ep_size=ep_size)
    proc, model, opt = build_run(args, rank, world_size)
    if load:
        plumbing.load_checkpoint(plumbing.read_checkpoint(path), model, opt, proc)
    steps = range(RESUME_AT, STEPS) if load else range(RESUME_AT)
    recs = [train.train_step(model, opt, tiny_corpus(), step, args, proc) for step in steps]
    if not load:
        plumbing.save_checkpoint(path, model, opt, RESUME_AT, {"config": vars(args)}, proc)
    # The memory behind each expert tensor's AdamW moments: this rank's share, or the whole loaded tensor?
    moments = [(v.untyped_storage().nbytes(), v.numel() * v.element_size())
               for n, p in model.named_parameters() if is_expert_param(n)
               for k, v in opt.state[p].items() if k.startswith("exp_avg")]
    return {"loss": torch.tensor([r["loss"] for r in recs], dtype=torch.float64),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": model.strategy_state(), "moments": moments}


def wire_run(rank, world_size):
    """One MoE layer on the 2 x 2 mesh, forward and backward under CPU bf16
    autocast, with every all_to_all_single call's input dtype recorded (moe.py
    calls it through the torch.distributed module, so wrapping the attribute
    catches the count exchange and the rows, both ways)."""
    proc = plumbing.Proc(rank, world_size, torch.device("cpu")).start(MESH_EP)
    torch.manual_seed(0)
    layer = MoELayer(plumbing.model_config(tiny_args("lossfree")), proc.mesh).train()
    sent, real = [], torch.distributed.all_to_all_single

    def recording(output, tensor, *a, **kw):
        sent.append(tensor.dtype)
        return real(output, tensor, *a, **kw)

    torch.distributed.all_to_all_single = recording
    try:
        x = torch.randn(2, 16, layer.router.weight.shape[1], requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _, _ = layer(x)
        y.sum().backward()
    finally:
        torch.distributed.all_to_all_single = real
    return {"sent": sent, "out": y.dtype, "x_grad": x.grad.dtype}


OTHER_EP = (1, 4)      # 4 replicas of all experts (data parallel only); 1 row of 4 (expert parallel only)


def mesh_worker(rank, world_size, ckpt_path):
    return {"training": {s: train_run(s, 1, rank, world_size, MESH_EP) for s in STRATEGIES},
            "other_ep": {ep: train_run("lossfree", 1, rank, world_size, ep) for ep in OTHER_EP},
            "saved": resume_run(rank, world_size, MESH_EP, ckpt_path, load=False),
            "wire": wire_run(rank, world_size)}


def resume_worker(rank, world_size, ckpt_path, ep_size):
    return resume_run(rank, world_size, ep_size, ckpt_path, load=True)


@pytest.fixture(scope="module")
def mesh_ckpt(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mesh") / "ckpt.pt")


@pytest.fixture(scope="module")
def mesh_spawned(mesh_ckpt):
    """Every 4-process run, in one launch."""
    return run_distributed(mesh_worker, MESH_WORLD, mesh_ckpt)


@pytest.fixture(scope="module")
def mesh(mesh_spawned):
    return {s: [r["training"][s] for r in mesh_spawned] for s in STRATEGIES}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mesh_of_two_replicas_by_two_expert_ranks_equals_one_rank(mesh, strategy):
    """4 processes with --ep-size 2 train like 1 process on the same global
    batch: losses, gradient norms, the first step's gradients (an expert
    gradient averaged over the replicas with the wrong scale shows here) and
    every parameter after 3 steps, the experts being the first row's shards."""
    assert_same_training(full_model(mesh[strategy], MESH_EP), one_rank(strategy, 1),
                         f"{strategy}, 4 ranks ep 2 vs 1")


@pytest.mark.parametrize("ep_size", OTHER_EP)
def test_mesh_of_4_ranks_equals_one_rank_at_the_extreme_ep_sizes(mesh_spawned, ep_size):
    """The two ends of the grid: --ep-size 1 (every rank holds every expert,
    no token exchange, expert gradients averaged over all 4) and --ep-size 4
    (one row, no replicas) train like 1 process too."""
    ranks = [r["other_ep"][ep_size] for r in mesh_spawned]
    assert_same_training(full_model(ranks, ep_size), one_rank("lossfree", 1), f"lossfree, 4 ranks ep {ep_size} vs 1")
    for r in ranks:
        assert torch.equal(r["state"]["bias"], one_rank("lossfree", 1)["state"]["bias"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mesh_replicas_hold_bit_identical_parameters(mesh, strategy):
    """Replicated parameters are the same on all 4 ranks, and each expert
    shard is the same on both ranks of its data-parallel column (0 and 2,
    1 and 3), bit for bit: otherwise the replicas drift apart."""
    ranks = mesh[strategy]
    for column in MeshLayout(MESH_WORLD, MESH_EP).dp_groups():
        for name, p in ranks[column[0]]["params"].items():
            for r in column[1:] if is_expert_param(name) else range(MESH_WORLD):
                assert torch.equal(p, ranks[r]["params"][name]), f"{name}: rank {r} differs from rank {column[0]}"
    assert not torch.equal(ranks[0]["params"]["blocks.0.moe.experts.w13"],
                           ranks[1]["params"]["blocks.0.moe.experts.w13"]), "ranks 0 and 1 hold the same experts"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mesh_strategy_counts_are_those_of_the_whole_global_batch(mesh, strategy):
    """The loads the strategies step on (lossfree's bias, global_aux's
    buffer, MaxVio) are summed over all 4 ranks, not over one expert-parallel
    group: every rank gets the global batch's counts and ends with the
    1-process state."""
    ranks, ref = mesh[strategy], one_rank(strategy, 1)
    total = sum(r["local_loads"] for r in ranks)
    for r in ranks:
        assert torch.equal(r["loads"], total)
        assert torch.equal(r["loads"], ref["loads"])
        for name, value in ref["state"].items():
            assert torch.equal(r["state"][name], value), f"{strategy}: {name} differs from 1 rank"


@pytest.mark.parametrize("world_size, flags, words", [
    (4, ["--ep-size", "3"], "--ep-size 3 must divide the 4 processes"),
    (1, ["--ep-size", "2"], "--ep-size 2 must divide the 1 processes"),
    (4, ["--ep-size", "0"], "--ep-size 0"),
    (4, ["--ep-size", "4", "--n-experts", "6"], "n_experts=6 is not divisible by the 4 expert-parallel"),
])
def test_bad_ep_size_gives_one_line_and_status_2_before_any_process_group(tmp_path, capsys, monkeypatch,
                                                                         world_size, flags, words):
    """As torchrun's rank 0 of world_size sees it: the flags are checked from
    the environment alone, so no rendezvous is attempted and no folder made."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["train.py", "--preset", "tiny", "--out", str(tmp_path / "o"), *flags])
    with pytest.raises(SystemExit) as stop:
        plumbing.cli(train.main)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not torch.distributed.is_initialized() and not (tmp_path / "o").exists()


# Bigger meshes, laid out without launching them.

@pytest.mark.parametrize("world_size,ep_size", [(32, 16), (32, 4), (8, 2)])
def test_mesh_layout_gives_each_row_every_expert_once_and_each_column_the_same_experts(world_size, ep_size):
    """16 experts on W processes in rows of ep_size: the rows (the token
    exchange) and the columns (the replicas) each cover every rank once, a
    row and a column meet in one rank, every row holds each expert exactly
    once, the ranks of a column hold the same experts, and a row is
    consecutive ranks, so with ep_size = GPUs per node tokens never leave a
    node."""
    E, layout = 16, MeshLayout(world_size, ep_size)
    rows, columns = layout.ep_groups(), layout.dp_groups()
    assert len(rows) == world_size // ep_size and len(columns) == ep_size
    assert sorted(sum(rows, [])) == list(range(world_size)) == sorted(sum(columns, []))
    assert all(len(set(row) & set(col)) == 1 for row in rows for col in columns)
    for row in rows:
        assert row == list(range(row[0], row[0] + ep_size))
        assert sorted(e for r in row for e in layout.experts_of(r, E)) == list(range(E))
    for col in columns:
        assert len({tuple(layout.experts_of(r, E)) for r in col}) == 1


@pytest.mark.parametrize("world_size,ep_size", [(32, 16), (32, 4)])
def test_proc_forms_the_layouts_groups_and_experts_for_32_ranks(world_size, ep_size):
    """What each of 32 ranks gets from Proc.start (PyTorch's init_device_mesh
    on a fake process group: collectives do nothing, nothing is launched):
    its row and column as the process groups, and, once the model is built
    on that mesh, the experts MeshLayout assigns it, with the weights those
    experts have on one process."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    args = tiny_args("none")
    args.n_experts = 16
    cfg = plumbing.model_config(args)
    torch.manual_seed(0)
    whole = GPT(cfg).blocks[0].moe.experts.w13.detach()
    layout = MeshLayout(world_size, ep_size)
    for rank in range(world_size):
        torch.distributed.init_process_group("fake", rank=rank, world_size=world_size, store=fake_pg.FakeStore())
        try:
            mesh = plumbing.Proc(rank, world_size).start(ep_size).mesh
            groups = [torch.distributed.get_process_group_ranks(g) for g in (mesh.ep_group, mesh.dp_group)]
        finally:
            torch.distributed.destroy_process_group()
        assert groups[0] in layout.ep_groups() and groups[1] in layout.dp_groups() and rank in groups[0] + groups[1]
        assert mesh.ep_rank == groups[0].index(rank) and mesh.dp_size == world_size // ep_size
        torch.manual_seed(0)
        mine = layout.experts_of(rank, 16)
        assert torch.equal(GPT(cfg, mesh).blocks[0].moe.experts.w13.detach(), whole[mine.start:mine.stop])


@pytest.fixture(scope="module")
def two_rank_resumed(mesh_spawned, mesh_ckpt):
    return run_distributed(resume_worker, 2, mesh_ckpt, 2)


def assert_resumed_like_uninterrupted(ranks, ep_size, what):
    """The steps after the checkpoint give the uninterrupted 1-process run's
    losses, final parameters and strategy state."""
    ref = one_rank("lossfree", 1)
    torch.testing.assert_close(ranks[0]["loss"], ref["loss"][RESUME_AT:], rtol=1e-5, atol=0)
    got = merge_shards([ranks[r]["params"] for r in MeshLayout(len(ranks), ep_size).ep_groups()[0]])
    for name, p in ref["params"].items():
        assert_tensor_close(got[name], p, 1e-5, f"{what}: parameter {name}")
    for r in ranks:
        assert torch.equal(r["state"]["bias"], ref["state"]["bias"]), f"{what}: lossfree bias"


def test_checkpoint_of_4_ranks_ep_2_resumes_on_2_ranks_ep_2(two_rank_resumed):
    assert_resumed_like_uninterrupted(two_rank_resumed, 2, "4 ranks ep 2 -> 2 ranks ep 2")


def test_a_resumed_rank_keeps_only_its_own_experts_moments(two_rank_resumed):
    """After loading, each rank's AdamW moments of the experts are backed by
    memory for its own experts only, not by the whole tensor read from the
    file (a slice would keep all experts' moments alive on every rank)."""
    for r in two_rank_resumed:
        assert r["moments"] and all(held == own for held, own in r["moments"]), r["moments"]


def test_checkpoint_of_4_ranks_ep_2_resumes_on_1_process(mesh_spawned, mesh_ckpt):
    assert_resumed_like_uninterrupted([resume_run(0, 1, None, mesh_ckpt, load=True)], 1, "4 ranks ep 2 -> 1")


def test_checkpoint_of_1_process_resumes_on_2_ranks(tmp_path):
    """The other direction: every expert stored whole by one process, each
    of 2 ranks keeping its half of the rows."""
    path = str(tmp_path / "ckpt.pt")
    resume_run(0, 1, None, path, load=False)
    assert_resumed_like_uninterrupted(run_distributed(resume_worker, 2, path, 2), 2, "1 -> 2 ranks ep 2")


@pytest.fixture(scope="module")
def four_rank_resumed(mesh_spawned, mesh_ckpt):
    return run_distributed(resume_worker, 4, mesh_ckpt, 4)


def test_checkpoint_of_4_ranks_ep_2_resumes_on_4_ranks_ep_4(four_rank_resumed):
    """Another mesh on the same number of processes: each rank now holds 2
    experts, rows that two different ranks wrote."""
    assert_resumed_like_uninterrupted(four_rank_resumed, 4, "4 ranks ep 2 -> 4 ranks ep 4")


def test_checkpoint_of_4_ranks_is_per_rank_shards_of_each_writers_own_experts(mesh_spawned, mesh_ckpt):
    """torch.distributed.checkpoint's metadata says which rows of which
    tensor each file holds. Every expert tensor (weights and both AdamW
    moments) is stored as E/ep-row shards, each in the file of a rank that
    holds those experts, each row once; no file holds all experts; and a
    replicated tensor is stored once, not once per rank."""
    E, layout = tiny_args("lossfree").n_experts, MeshLayout(MESH_WORLD, MESH_EP)
    folder = plumbing.read_checkpoint(mesh_ckpt)["folder"]
    meta = torch.distributed.checkpoint.FileSystemReader(folder).read_metadata()
    chunks = {}
    for where, info in meta.storage_data.items():
        chunks.setdefault(where.fqn, []).append((where.offset, info.relative_path))
    expert_keys = [k for k in chunks if is_expert_param(k) and len(chunks[k][0][0])]   # not AdamW's step count
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg_sq") for k in expert_keys)
    files = {}
    for key in expert_keys:
        rows = sorted(offset[0] for offset, _ in chunks[key])
        assert rows == list(range(0, E, E // MESH_EP)), (key, rows)       # each shard once
        for offset, file in chunks[key]:
            writer = int(file.split("_")[2])                               # __<rank>_<n>.distcp
            assert offset[0] == layout.experts_of(writer, E).start, (key, offset, file)
            files.setdefault(file, set()).add(offset[0])
    assert all(len(rows) < MESH_EP for rows in files.values()), files      # no file holds every expert
    for key in (k for k in chunks if k not in expert_keys):
        assert len(chunks[key]) == 1, (key, chunks[key])


def test_dispatched_rows_travel_in_the_autocast_dtype(mesh_spawned):
    """Under bf16 autocast the rows go out and the results come back in bf16
    (half the bytes of fp32), forward and backward; only the counts travel
    as integers. The layer hands its bf16 output to the block, which adds it
    into the fp32 residual stream, and the gradient reaching x is fp32."""
    for r in mesh_spawned:
        wire = r["wire"]
        assert wire["sent"] == [torch.long] + [torch.bfloat16] * 4, wire["sent"]
        assert wire["out"] == torch.bfloat16 and wire["x_grad"] == torch.float32
