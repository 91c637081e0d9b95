"""Tests that need a CUDA GPU: the bf16 grouped experts, and what must stay
true when a run moves from fp32 on a CPU to bf16 on a GPU. Every test here
is skipped on a machine without one; on a GPU run

    python -m pytest -q tests/test_cuda.py

The grouped-experts tests (and the bf16 causality test) also need PyTorch's
fast grouped kernel, which moe.py uses on compute capability 9.x only (H100,
H200; plumbing.kernels.grouped_mm_fast_on_cuda says why not 10.x); on other GPUs the
experts take the loop and those tests say so in their skip reason."""

from pathlib import Path

import pytest
import torch

from balancers import BALANCERS
from moe import GPT, Experts, GPTConfig, MoELayer
from plumbing.kernels import grouped_experts_bf16, grouped_mm_fast_on_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOKEN_CHOICE = [s for s, c in BALANCERS.items() if c.token_choice]
ROOT = Path(__file__).resolve().parent.parent


def cuda_config(strategy="none", **overrides):
    # Widths that are multiples of 8: bf16 rows on 16-byte boundaries, as the
    # grouped kernel needs.
    fields = dict(vocab_size=256, seq_len=32, n_layers=2, d_model=64, n_heads=4, n_experts=8,
                  top_k=2, d_expert=64, balancer=strategy)
    fields.update(overrides)
    return GPTConfig(**fields)


def bf16_autocast(enabled=True):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def require_fast_grouped(experts, x):
    with bf16_autocast():
        if not grouped_mm_fast_on_cuda(x, experts.w13, experts.w2):
            pytest.skip(f"no fast grouped kernel on {torch.cuda.get_device_name()} "
                        f"(capability {torch.cuda.get_device_capability()}): the experts take the loop")


# ----------------------------------------------------------------------------
# The grouped bf16 experts.

def experts_fwd_bwd(run, experts, x, counts, grad):
    x = x.clone().requires_grad_()
    experts.zero_grad()
    with bf16_autocast():
        out = run(x, counts)
    out.float().backward(grad)
    return out.float(), x.grad, experts.w13.grad.clone(), experts.w2.grad.clone()


def test_grouped_bf16_experts_equal_the_loop_within_bf16_tolerance():
    """The grouped way (explicit bf16 casts) and the loop under bf16 autocast
    compute the same rows and gradients up to bf16 rounding: a few parts in
    a thousand, not the exact agreement of fp32 on CPU. Empty, tiny and
    large experts included; the counts stay on the device."""
    torch.manual_seed(0)
    experts = Experts(cuda_config(n_experts=6)).cuda()
    with torch.no_grad():        # O(1) outputs, so that the tolerances mean something
        experts.w13.mul_(20.0)
        experts.w2.mul_(20.0)
    counts = torch.tensor([0, 3, 16, 200, 1, 57], device="cuda")
    x = torch.randn(int(counts.sum()), 64, device="cuda")
    grad = torch.randn_like(x)
    require_fast_grouped(experts, x)
    grouped = experts_fwd_bwd(lambda x, c: grouped_experts_bf16(x, c, experts.w13, experts.w2),
                              experts, x, counts, grad)
    loop = experts_fwd_bwd(experts.forward_loop, experts, x, counts.tolist(), grad)
    for name, a, b in zip(["output", "x grad", "w13 grad", "w2 grad"], grouped, loop):
        assert b.abs().max() > 0.1, name
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    assert experts.w13.grad.dtype == torch.float32      # fp32 master weights, fp32 gradients


def test_cuda_experts_never_wait_for_the_gpu():
    """One rank on a GPU: the MoE layer hands the experts the counts as a
    device tensor, and nothing in the experts' forward or backward copies a
    value to the host (which would stall the CPU once per layer)."""
    torch.manual_seed(0)
    experts = Experts(cuda_config()).cuda()
    counts = torch.tensor([5, 0, 40, 19, 7, 33, 2, 22], device="cuda")
    x = torch.randn(int(counts.sum()), 64, device="cuda", requires_grad=True)
    require_fast_grouped(experts, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with bf16_autocast():
            out = experts(x, counts)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == torch.float32          # back in the residual stream's dtype


def test_cuda_moe_layer_never_waits_for_the_gpu():
    """A whole MoE layer on one GPU, training mode, forward and backward:
    routing (lossfree), the per-expert counts, the sort, the gather, the
    grouped experts and the combine run without one copy to the host. The
    CUDA driver's own check (set_sync_debug_mode "error") sees every sync,
    also those inside C++ ops that tests/test_moe.py's CPU count cannot."""
    torch.manual_seed(0)
    layer = MoELayer(cuda_config("lossfree")).cuda().train()
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    require_fast_grouped(layer.experts, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with bf16_autocast():
            y, loss, _ = layer(x)
        (y.float().square().sum() + loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("strategy", TOKEN_CHOICE)
def test_token_choice_layer_is_bit_for_bit_reproducible_on_the_gpu(strategy):
    """Top-6 of 64 experts, 4096 tokens, bf16: three identical forward and
    backward passes give the same output and gradients to the last bit.
    (index_add_ summing each token's 6 rows with atomics, in whatever order
    they land, can change the last bits from one pass to the next; moe.py
    keeps it for expert choice only.)"""
    torch.manual_seed(0)
    layer = MoELayer(cuda_config(strategy, d_model=256, n_experts=64, top_k=6, d_expert=128)).cuda().train()
    x = torch.randn(4, 1024, 256, device="cuda")
    cotangent = torch.randn(4, 1024, 256, device="cuda")

    def run():
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        with bf16_autocast():
            y, loss, _ = layer(xi)
        outs = [y, loss] if loss.requires_grad else [y]
        torch.autograd.backward(outs, [cotangent.to(y.dtype), torch.ones_like(loss)][:len(outs)])
        return {"y": y.detach(), "x grad": xi.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}

    first = run()
    for _ in range(2):
        again = run()
        for name, value in first.items():
            assert torch.equal(value, again[name]), f"{name}: max difference {(value - again[name]).abs().max():.3e}"


# ----------------------------------------------------------------------------
# A whole model in bf16.

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("strategy", TOKEN_CHOICE)
def test_token_choice_model_is_exactly_causal_under_bf16(strategy, seed):
    """The causality probe reads exactly 0 for token choice in bf16 on a GPU
    too: without MIN_ROWS padding, the grouped kernel's arithmetic for a
    row must not depend on how many other rows went to the same expert."""
    torch.manual_seed(seed)
    model = GPT(cuda_config(strategy)).cuda().eval()
    # On the loop (a GPU without the fast kernel) cuBLAS picks its kernel by
    # the rows of each expert's matmul, so a row's last bits may depend on
    # how many other tokens chose its expert, and the probe need not read 0.
    require_fast_grouped(model.blocks[0].moe.experts, torch.empty(1, 64, device="cuda"))
    for layer in model.moe_layers():
        if hasattr(layer.balancer, "bias"):
            layer.balancer.bias.copy_(torch.randn(8, device="cuda") * 0.05)
    x = torch.randint(0, 256, (4, 32), device="cuda")
    x2 = x.clone()
    t = 11
    x2[:, t + 1:] = torch.randint(0, 256, x2[:, t + 1:].shape, device="cuda")
    with torch.no_grad(), bf16_autocast():
        before, after = model(x).logits[:, :t + 1], model(x2).logits[:, :t + 1]
    assert torch.equal(before, after), f"max change {(before - after).abs().max().item():.3e}"


def text_batches(steps, batch_size, seq_len, seed=0):
    """Windows of real text (this project's own source), the same for every run."""
    data = torch.tensor(list((ROOT / "moe.py").read_bytes() + (ROOT / "balancers.py").read_bytes()))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
        window = torch.stack([data[s:s + seq_len + 1] for s in start.tolist()])
        yield window[:, :-1].contiguous().cuda(), window[:, 1:].contiguous().cuda()


def train_losses(bf16, steps=80):
    torch.manual_seed(0)
    model = GPT(cuda_config("lossfree")).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for x, y in text_batches(steps, 16, 32):
        with bf16_autocast(enabled=bf16):
            out = model(x, y)
        (out.lm_loss + out.balance_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.end_step()
        losses.append(out.lm_loss.item())
    return torch.tensor(losses)


def test_bf16_training_tracks_fp32():
    """The same seed and batches trained in bf16 autocast (grouped bf16
    experts, fp32 router and master weights) and in plain fp32 on the GPU:
    while the loss falls by more than a nat, the curves stay within a few
    hundredths of a nat of each other. (The same model and batches on a CPU,
    bf16 autocast against fp32: gaps up to 0.03 averaged over 10 steps,
    0.08 on a single step.)"""
    fp32, bf16 = train_losses(bf16=False), train_losses(bf16=True)
    assert fp32[0] - fp32[-10:].mean() > 1.0, f"fp32 run did not learn: {fp32[0]:.2f} -> {fp32[-10:].mean():.2f}"
    gap = (bf16 - fp32).abs()
    # Smoothed over 10 steps: one batch's noise is not a drift.
    assert gap.max() < 0.2 and gap.unfold(0, 10, 10).mean(1).max() < 0.06, \
        f"bf16 drifts from fp32: step gaps {gap.tolist()}"
