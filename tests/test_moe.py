"""Tests for moe.py on one process: the MoE layer against a per-token loop,
causality of the whole model, the once-per-step hook and the configuration
checks. (Expert parallelism across processes is in test_parallel.py.)"""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe
from balancers import BALANCERS, gate_scores
from moe import (GPT, MIN_ROWS, Experts, GPTConfig, Mesh, MoELayer, check_config, clip_grad_norm, count_per_expert,
                 swiglu)
from plumbing import kernels
from plumbing.kernels import (ELEMENTS_PER_THREAD, grouped_experts_bf16, grouped_experts_cpu, grouped_is_faster_on_cpu,
                              grouped_mm_fast_on_cuda, grouped_mm_on_cpu, pad_blocks)
import train
from train import max_violation

# The fast tier: python -m pytest -m lesson
pytestmark = pytest.mark.lesson

STRATEGIES = list(BALANCERS)
TOKEN_CHOICE = [n for n, c in BALANCERS.items() if c.token_choice]


def small_config(strategy, **overrides):
    fields = dict(vocab_size=64, seq_len=12, n_layers=2, d_model=16, n_heads=2, n_experts=4,
                  top_k=2, d_expert=8, balancer=strategy)
    fields.update(overrides)
    return GPTConfig(**fields)


# ----------------------------------------------------------------------------
# The layer equals the definition: y_t = sum over t's assignments of g * E_e(x_t).

def naive_moe(layer, x, routing):
    """The MoE layer written as the papers state it, one token at a time:
    y_t = sum over the (t, e) assignments of s_{e,t} * SwiGLU_e(x_t)
    (+ the shared expert), with s the gate score recomputed from the router
    weight -- unbiased, whatever chose the experts."""
    B, T, d = x.shape
    h = x.reshape(B * T, d)
    scores = gate_scores(h @ layer.router.weight.T, layer.balancer.cfg.gate)
    w13, w2 = layer.experts.w13, layer.experts.w2
    rows = []
    for t in range(B * T):
        y = torch.zeros(d)
        for e in routing.expert_idx[routing.token_idx == t].tolist():
            y = y + scores[t, e] * swiglu(h[t], w13[e], w2[e])
        if layer.shared is not None:
            y = y + swiglu(h[t], layer.shared.w13, layer.shared.w2)
        rows.append(y)
    return torch.stack(rows).view(B, T, d)


def test_swiglu_is_silu_gate_times_linear_then_down_projection():
    """SwiGLU (Shazeer 2020): (silu(x W1) * x W3) W2, with W1 and W3 stored
    side by side in one [d, 2h] matrix (W1 first)."""
    g = torch.Generator().manual_seed(0)
    x, w1, w3, w2 = (torch.randn(*shape, generator=g) for shape in ((5, 4), (4, 3), (4, 3), (3, 4)))
    a = x @ w1
    expected = (a * torch.sigmoid(a) * (x @ w3)) @ w2
    torch.testing.assert_close(swiglu(x, torch.cat([w1, w3], dim=1), w2), expected)


def test_pad_blocks_puts_each_block_at_the_start_of_its_padded_block():
    x = torch.arange(6.0).view(6, 1)                 # blocks of 2, 0 and 4 rows
    padded, rows = pad_blocks(x, [2, 0, 4], [5, 0, 6])
    assert rows.tolist() == [0, 1, 5, 6, 7, 8]
    assert padded.view(-1).tolist() == [0, 1, 0, 0, 0, 2, 3, 4, 5, 0, 0]


def experts_fwd_bwd(run, experts, x, counts, grad):
    """Output and every gradient of one way of running the experts."""
    x = x.clone().requires_grad_()
    experts.zero_grad()
    out = run(x, counts)
    out.backward(grad)
    return out, x.grad, experts.w13.grad.clone(), experts.w2.grad.clone()


@pytest.mark.skipif(not grouped_mm_on_cpu(), reason="torch._grouped_mm does not run on this CPU build")
def test_grouped_experts_equal_the_loop_bit_for_bit_including_padded_small_experts():
    """The two ways to run the experts give the same rows and gradients to
    the last bit, also when some experts have no rows and some fewer than
    MIN_ROWS (padded): which way runs may then depend on the shape alone."""
    torch.manual_seed(0)
    experts = Experts(small_config("none", n_experts=5, d_model=16, d_expert=8))
    counts = [0, 3, MIN_ROWS, 40, 1]
    x = torch.randn(sum(counts), 16)
    grad = torch.randn_like(x)
    grouped = experts_fwd_bwd(lambda x, c: grouped_experts_cpu(x, c, experts.w13, experts.w2),
                              experts, x, counts, grad)
    loop = experts_fwd_bwd(experts.forward_loop, experts, x, counts, grad)
    for name, a, b in zip(["output", "x grad", "w13 grad", "w2 grad"], grouped, loop):
        assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max().item():.2e}"


@pytest.mark.skipif(not grouped_mm_on_cpu(), reason="torch._grouped_mm does not run on this CPU build")
@pytest.mark.parametrize("threads", [1, 2])
def test_experts_take_the_grouped_way_only_for_small_blocks(threads):
    """The CPU rule (moe.grouped_is_faster_on_cpu): grouped while the mean
    expert's activation block (rows x d_expert) is under ELEMENTS_PER_THREAD
    per thread, the loop from there on, and the loop for widths the grouped
    op cannot take (rows not on 16-byte boundaries)."""
    experts = Experts(small_config("none", n_experts=4, d_model=16, d_expert=8))
    w13, w2 = experts.w13, experts.w2
    rows = ELEMENTS_PER_THREAD * threads // 8          # per expert, at the threshold
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert grouped_is_faster_on_cpu(torch.zeros(4 * rows - 1, 16), [rows] * 4, w13, w2)
        assert not grouped_is_faster_on_cpu(torch.zeros(4 * rows, 16), [rows] * 4, w13, w2)
        odd = Experts(small_config("none", n_experts=4, d_model=16, d_expert=6))   # 6 floats = 24 bytes
        assert not grouped_is_faster_on_cpu(torch.zeros(4, 16), [1] * 4, odd.w13, odd.w2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("block", ["small", "large"])
def test_experts_forward_equals_the_loop_whichever_way_it_takes(block):
    """Experts.forward, on either side of the rule and with the counts as a
    list or as a tensor (what MoELayer hands it), is the loop bit for bit."""
    torch.manual_seed(0)
    experts = Experts(small_config("none", n_experts=4, d_model=16, d_expert=8))
    rows = ELEMENTS_PER_THREAD * torch.get_num_threads() // 8     # per expert, at the threshold
    rows = rows // 4 if block == "small" else 2 * rows
    counts = [rows + delta for delta in (-3, 5, 0, -2)]
    x = torch.randn(sum(counts), 16)
    grad = torch.randn_like(x)
    loop = experts_fwd_bwd(experts.forward_loop, experts, x, counts, grad)
    for given in (counts, torch.tensor(counts)):
        got = experts_fwd_bwd(experts, experts, x, given, grad)
        assert all(torch.equal(a, b) for a, b in zip(got, loop))


def grouped_mm_bf16_on_cpu():
    try:
        torch._grouped_mm(torch.ones(16, 8, dtype=torch.bfloat16), torch.ones(1, 8, 8, dtype=torch.bfloat16),
                          offs=torch.tensor([16], dtype=torch.int32))
        return True
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


@pytest.mark.skipif(not grouped_mm_bf16_on_cpu(), reason="torch._grouped_mm has no bf16 CPU kernel here")
def test_bf16_grouped_experts_cast_explicitly_and_keep_fp32_gradients():
    """The GPU's way (grouped_experts_bf16) run on the CPU's kernel, so that
    it is exercised without a GPU: counts as a tensor, bf16 rows out, fp32
    gradients for the fp32 master weights, and the rows of the loop under
    bf16 autocast. (tests/test_cuda.py checks it on the GPU's kernel.)"""
    torch.manual_seed(0)
    experts = Experts(small_config("none", n_experts=5, d_model=16, d_expert=8))
    with torch.no_grad():
        experts.w13.mul_(20.0)
        experts.w2.mul_(20.0)
    counts = [0, 3, 16, 40, 1]
    x = torch.randn(sum(counts), 16)
    grad = torch.randn_like(x)
    bf16 = experts_fwd_bwd(lambda x, c: grouped_experts_bf16(x, torch.tensor(c), experts.w13, experts.w2),
                           experts, x, counts, grad)
    assert bf16[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in bf16[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loop = experts_fwd_bwd(experts.forward_loop, experts, x, counts, grad)
    for name, a, b in zip(["output", "x grad", "w13 grad", "w2 grad"], bf16, loop):
        assert b.abs().max() > 0.1, name
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_moe_layer_equals_per_token_reference(strategy, shared):
    """Sorting by expert, the batched expert matmuls and index_add must
    compute exactly the per-token sum of gated expert outputs: same output,
    same gradient w.r.t. the input, the router weight and every expert weight."""
    torch.manual_seed(0)
    cfg = small_config(strategy, n_experts=4, top_k=2, d_model=8, d_expert=6, shared_experts=shared)
    layer = MoELayer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():    # O(1) values so that the tolerances below are meaningful
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for buf in layer.balancer.state().values():    # a trained-looking state (lossfree's bias)
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    cotangent = torch.randn(2, 5, 8, generator=g)

    y, _, routing = layer(x)
    (y * cotangent).sum().backward()
    got = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    x.grad = None
    layer.zero_grad()

    ref = naive_moe(layer, x, routing)
    (ref * cotangent).sum().backward()
    expected = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}

    # float32 with values of order 1: torch's default tolerances for float32
    # (rtol 1.3e-6, atol 1e-5) sit at the rounding level of sums of O(1) terms.
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(y, ref)
    assert got.keys() == expected.keys()
    assert {"router.weight", "experts.w13", "experts.w2"} <= got.keys()
    for name in expected:
        assert expected[name].abs().max() > 0.1, name
        torch.testing.assert_close(got[name], expected[name], msg=lambda m: f"gradient of {name}: {m}")


def layer_fwd_bwd(layer, x, cotangent):
    """The layer's output and the gradients of x and of every parameter."""
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y, loss, _ = layer(x)
    outs = [y, loss] if loss.requires_grad else [y]
    torch.autograd.backward(outs, [cotangent, torch.ones_like(loss)][:len(outs)])
    return {"y": y.detach(), "x grad": x.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("strategy", TOKEN_CHOICE)
def test_token_choice_layer_is_bit_for_bit_reproducible_with_top_6(strategy):
    """Two identical passes of a top-6 token-choice layer give the same output
    and gradients to the last bit. (The CPU would pass this with index_add_
    too; on a GPU index_add_'s atomics land in any order once k >= 3, which
    the next test rules out and tests/test_cuda.py measures.)"""
    torch.manual_seed(0)
    layer = MoELayer(small_config(strategy, n_experts=8, top_k=6, d_model=16, d_expert=8))
    x, cotangent = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    first, second = layer_fwd_bwd(layer, x, cotangent), layer_fwd_bwd(layer, x, cotangent)
    for name, value in first.items():
        assert value.abs().max() > 0, name
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_token_choice_sums_each_tokens_k_rows_without_index_add(strategy, monkeypatch):
    """Token choice combines without index_add_ (atomic adds in no fixed
    order on a GPU): every token has exactly k rows, summed in a fixed order.
    Expert choice and expert-threshold routing, whose tokens have 0 to E rows
    (fixed_k False), still use it: that shows the count does see the calls."""
    calls, real = [], torch.Tensor.index_add_

    def counting(self, *args, **kwargs):
        calls.append(self.shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_add_", counting)
    torch.manual_seed(0)
    layer = MoELayer(small_config(strategy, n_experts=8, top_k=6, d_model=16, d_expert=8))
    layer_fwd_bwd(layer, torch.randn(2, 12, 16), torch.randn(2, 12, 16))
    assert (len(calls) == 0) == BALANCERS[strategy].fixed_k, calls


def test_count_per_expert_equals_bincount_including_unused_experts():
    idx = torch.tensor([3, 0, 3, 3, 5, 0])
    assert count_per_expert(idx, 7).tolist() == torch.bincount(idx, minlength=7).tolist() == [2, 0, 0, 3, 0, 1, 0]
    assert count_per_expert(idx[:0], 3).tolist() == [0, 0, 0]


# What a sync costs on a GPU: the CPU stops queueing kernels until the GPU
# has caught up. These are the Python calls that copy a device value to the
# host (or, for bincount and nonzero, size their output by one).
HOST_SYNCS = [(torch.Tensor, name) for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__",
                                                "__float__", "__index__")] + [(torch, "bincount"), (torch, "nonzero")]


@pytest.mark.skipif(not grouped_mm_bf16_on_cpu(), reason="torch._grouped_mm has no bf16 CPU kernel here")
# A variable number of experts per token (fixed_k False) needs the number of
# assignments on the host: threshold routing reads it once per forward.
@pytest.mark.parametrize("strategy", [n for n, c in BALANCERS.items() if c.fixed_k])
def test_one_layer_forward_and_backward_never_waits_for_the_device(strategy, monkeypatch):
    """One process (ep = 1), training mode, bf16 autocast, on the path a
    Hopper GPU takes: the grouped bf16 experts (grouped_mm_fast_on_cuda
    forced to True; torch._grouped_mm runs them on the CPU's kernel).

    Counting method: every Python-level way to read a tensor's value on the
    host -- Tensor.item, .tolist, .cpu, .numpy, .nonzero, bool(), int(),
    float(), operator.index(), torch.bincount and torch.nonzero -- is
    replaced by a wrapper that records the call and then does the real
    thing; the layer's forward and backward must record none. A sync inside
    a C++ op is not seen here; tests/test_cuda.py runs the same layer under
    torch.cuda.set_sync_debug_mode("error"), which sees those too."""
    torch.manual_seed(0)
    layer = MoELayer(small_config(strategy, n_experts=8, top_k=2, d_model=16, d_expert=16)).train()
    x = torch.randn(2, 12, 16, requires_grad=True)
    monkeypatch.setattr(kernels, "grouped_mm_fast_on_cuda", lambda *args: True)
    calls = []
    for owner, name in HOST_SYNCS:
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, loss, _ = layer(x)
    (y.float().square().sum() + loss).backward()
    monkeypatch.undo()
    assert calls == [], calls
    assert x.grad.abs().max() > 0 and layer.load.sum() == 2 * 12 * 2


def test_dispatch_runs_in_the_autocast_dtype_and_the_residual_stream_stays_fp32():
    """Under bf16 autocast the rows reach the experts in bf16 and the layer
    returns bf16 (the gather, the gate weighting and the sum move half the
    bytes); the block adds that into its fp32 residual stream. Without
    autocast everything stays fp32."""
    torch.manual_seed(0)
    block = GPT(small_config("lossfree")).blocks[0]
    seen, forward = [], block.moe.experts.forward
    block.moe.experts.forward = lambda rows, counts: seen.append(rows.dtype) or forward(rows, counts)
    x = torch.randn(2, 12, 16)
    for autocast, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, _, _ = block.moe(x)
            out, _, _ = block(x)
        assert seen[-1] == y.dtype == dtype and out.dtype == torch.float32, autocast


@pytest.mark.parametrize("capability,n_experts,fast", [
    ((9, 0), 1023, True), ((9, 0), 1024, False), ((10, 0), 8, False), ((8, 0), 8, False), ((12, 0), 8, False)])
def test_fast_grouped_kernel_only_on_hopper_with_fewer_than_1024_experts(capability, n_experts, fast, monkeypatch):
    """The CUDA rule, read with a stand-in for a GPU tensor: capability 9.x
    only (10.x gives experts without rows non-zero weight gradients,
    pytorch#172439) and fewer than 1024 experts per rank (the kernel refuses
    group_count >= 1024)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    x = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    w13, w2 = SimpleNamespace(shape=(n_experts, 16, 32)), SimpleNamespace(shape=(n_experts, 16, 16))
    assert grouped_mm_fast_on_cuda(x, w13, w2) is fast


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside it (one or more GPU kernels each)."""

    def __enter__(self):
        self.ops = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def clip_against_torch(n_layers):
    """clip_grad_norm on a one-process model with gradients, beside
    torch.nn.utils.clip_grad_norm_ on copies of the same gradients. Returns
    both norms, both sets of clipped gradients and the ops clip_grad_norm ran."""
    torch.manual_seed(0)
    model = GPT(small_config("aux", n_layers=n_layers))
    out = model(torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12)))
    (out.lm_loss + out.balance_loss).backward()
    ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for r, p in zip(ref, model.parameters()):
        r.grad = p.grad.clone()
    max_norm = 0.5 * torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref])).item()
    with OpCounter() as counter:
        norm = clip_grad_norm(model, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    return norm, ref_norm, [p.grad for p in model.parameters()], [r.grad for r in ref], counter.ops


def test_clip_grad_norm_is_torchs_norm_in_ops_that_do_not_grow_with_the_parameters():
    """On one process clip_grad_norm is torch.nn.utils.clip_grad_norm_: the
    same norm and the same clipped gradients (to float rounding). It runs
    the same ops for 2 and 4 layers: foreach kernels over all gradients, not
    a loop over parameters (2 layers have 18 parameter tensors, 4 have 32)."""
    ops = {}
    for n_layers in (2, 4):
        norm, ref_norm, grads, ref_grads, ops[n_layers] = clip_against_torch(n_layers)
        torch.testing.assert_close(norm, ref_norm)
        assert norm > 0.1
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r)
    assert ops[2] == ops[4] and "aten._foreach_norm" in ops[2] and "aten._foreach_mul_" in ops[2], ops


def test_layer_loss_adds_router_z_loss():
    """ST-MoE's z-loss, z * mean(logsumexp(logits)^2), is added to the
    strategy's loss when configured."""
    g = torch.Generator().manual_seed(0)
    plain = MoELayer(small_config("aux"))
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    with_z = MoELayer(small_config("aux", balance=dict(z_loss=1e-2)))
    with_z.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 16, generator=g)
    _, loss, routing = plain(x)
    _, loss_z, _ = with_z(x)
    z = torch.logsumexp(routing.logits, dim=-1).pow(2).mean()
    assert z > 0.1
    torch.testing.assert_close(loss_z, loss + 1e-2 * z, rtol=1e-6, atol=0)


def test_moe_layer_initialises_all_its_parameters_from_the_seed():
    """A layer built on its own must be a function of the random seed, like
    the experts are: uninitialised memory would make runs irreproducible and
    can hold huge values or NaN."""
    torch.manual_seed(0)
    a = MoELayer(small_config("aux"))
    torch.manual_seed(0)
    b = MoELayer(small_config("aux"))
    torch.manual_seed(1)
    c = MoELayer(small_config("aux"))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.isfinite(pa).all(), name
        assert torch.equal(pa, pb), f"{name} differs under the same seed"
        assert not torch.equal(pa, pc), f"{name} does not depend on the seed"


# ----------------------------------------------------------------------------
# Causality: a language model's output at t must not depend on tokens after t.

def logits_before_and_after_changing_the_future(strategy, seed, t=5):
    torch.manual_seed(seed)
    model = GPT(small_config(strategy)).eval()
    for layer in model.moe_layers():
        for buf in layer.balancer.state().values():   # a trained-looking state, fixed during evaluation
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape) * 0.05)
    x = torch.randint(0, 64, (2, 12))
    x2 = x.clone()
    x2[:, t + 1:] = torch.randint(0, 64, x2[:, t + 1:].shape)
    with torch.no_grad():
        return model(x).logits[:, :t + 1], model(x2).logits[:, :t + 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strategy", TOKEN_CHOICE)
def test_token_choice_model_is_exactly_causal(strategy, seed):
    """Token-choice routing decides per token (and lossfree's bias comes from
    past batches), so changing the tokens after position t leaves the
    logits at positions <= t bit-for-bit unchanged."""
    before, after = logits_before_and_after_changing_the_future(strategy, seed)
    assert torch.equal(before, after), f"max change {(before - after).abs().max().item():.3e}"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strategy", [n for n, c in BALANCERS.items() if not c.token_choice])
def test_expert_choice_leaks_future_tokens(strategy, seed):
    """Expert choice compares all tokens of the routing group, later ones
    included: changing the future changes the past outputs (Wang et al. 2024,
    Sec. 5.2 and App. D). This is the leak the causality probe measures."""
    before, after = logits_before_and_after_changing_the_future(strategy, seed)
    # A real change: logits here are ~0.1, so float32 rounding is ~1e-8; the
    # leak moves them by ~1e-4 (token choice: exactly 0).
    assert (before - after).abs().max() > 1e-5


SHUFFLED = [("expert_choice", dict(route_shuffle=True, route_seqs=1))]


@pytest.mark.parametrize("strategy,balance", [(n, None) for n in BALANCERS] + SHUFFLED)
def test_the_probe_reads_exactly_0_on_identical_inputs_for_every_strategy(strategy, balance):
    """The causality probe's baseline: its two forwards of the *same* input
    agree bit for bit, for every strategy, including expert choice routed
    over groups shuffled at random (train.forward_twice replays the first
    forward's permutation). Two plain forwards of a shuffled model draw two
    permutations and differ: without the replay the probe would read noise
    as a leak."""
    model = GPT(small_config(strategy, **({"balance": balance} if balance else {}))).eval()
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = train.forward_twice(model, x, x)
        assert torch.equal(a, b)
        if balance:
            assert not torch.equal(model(x).logits, model(x).logits)


# ----------------------------------------------------------------------------
# The once-per-step hook and the balance metric.

def test_end_step_hands_global_load_to_strategy_and_resets():
    """end_step returns each layer's assignment counts over all micro-steps
    of the optimizer step, gives them to the strategy (lossfree moves its
    bias) and starts the next step from zero."""
    torch.manual_seed(0)
    model = GPT(small_config("lossfree", balance=dict(bias_rate=0.25)))
    expected = torch.zeros(2, 4, dtype=torch.long)
    for micro in range(2):
        out = model(torch.randint(0, 64, (2, 12)))
        for l, r in enumerate(out.routings):
            expected[l] += torch.bincount(r.expert_idx, minlength=4)
    assert expected.sum() == 2 * 2 * 12 * 2 * 2      # micro-steps x B x T x k x layers
    loads = model.end_step()
    assert torch.equal(loads, expected)
    for layer, load in zip(model.moe_layers(), loads):
        assert layer.load.sum() == 0
        mean = load.float().mean()
        want = torch.where(load > mean, -0.25, torch.where(load < mean, 0.25, 0.0))
        assert torch.equal(layer.balancer.bias, want)


def test_max_violation_is_relative_excess_of_busiest_expert():
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024,
    Eq. 4): 0 when even, E - 1 when one expert takes everything."""
    loads = torch.tensor([[4, 4, 4, 4], [16, 0, 0, 0], [6, 2, 4, 4], [0, 0, 0, 0]])
    assert max_violation(loads).tolist() == [0.0, 3.0, 0.5, 0.0]


# ----------------------------------------------------------------------------
# Configuration mistakes.

@pytest.mark.parametrize("overrides,world_size,setting", [
    ({"top_k": 5}, 1, "top_k"),
    ({"n_experts": 4}, 3, "n_experts"),
    ({"balancer": "switch"}, 1, "no such strategy"),
    ({"balancer": "expert_choice", "balance": dict(capacity_factor=0.0)}, 1, "capacity-factor"),
    ({"balancer": "expert_choice", "balance": dict(capacity_factor=-2.0)}, 1, "capacity-factor"),
    ({"balance": dict(capacity_factor=2.0)}, 1, "does not apply to lossfree"),
    ({"d_model": 10, "n_heads": 4}, 1, "n_heads"),
    ({"shared_experts": -1}, 1, "shared_experts"),
])
def test_bad_config_raises_value_error_naming_the_setting(overrides, world_size, setting):
    """check_config rejects a bad setting before anything is built, with a
    ValueError that names it; building the model runs the same check."""
    cfg = small_config("lossfree", **overrides)
    with pytest.raises(ValueError, match=setting):
        check_config(cfg, world_size)
    with pytest.raises(ValueError, match=setting):
        GPT(cfg, Mesh(0, world_size, world_size))


def test_valid_config_passes_check():
    """The checks are not over-eager: the shapes used by the tests are fine
    for every strategy and 1, 2 or 4 processes."""
    for strategy in STRATEGIES:
        for world_size in (1, 2, 4):
            check_config(small_config(strategy), world_size)
