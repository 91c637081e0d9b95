"""
plumbing/kernels.py -- the experts in two large operations instead of a
loop: the same numbers as moe.Experts.forward_loop, faster. Not the lesson;
moe.Experts.forward picks the way.

Nothing below changes what is computed. On CPU the results equal
Experts.forward_loop bit for bit; on CUDA they equal it up to bf16 rounding,
which autocast would apply to the loop's matmuls anyway (tests/test_moe.py,
tests/test_cuda.py). Read on only for speed.

torch._grouped_mm(x, w, offs=ends) multiplies row block e of x (the blocks
given by their end offsets) by w[e], for every e in one call. The experts
then cost two such calls around one activation over all rows: no Python
loop, no per-expert autograd nodes.
"""

import functools

import torch

import moe


def grouped_swiglu(x, ends, w13, w2):
    """swiglu on every expert's block of rows of x (block e ends at ends[e])."""
    return torch._grouped_mm(moe.silu_gate(torch._grouped_mm(x, w13, offs=ends)), w2, offs=ends)


# --- On a GPU.
#
# The CPU queues kernels and the GPU runs them, some way behind. Reading a
# value on the host (.item(), .tolist(), bincount sizing its output) makes
# the CPU wait until the queue has drained, and the GPU then idles while the
# CPU queues the next kernels. At ep = 1 an MoE layer's forward and backward
# never wait (tests/test_moe.py counts the calls, tests/test_cuda.py asks the
# driver); at ep > 1 the exchange's split sizes are the one wait per layer
# (MoELayer.run_experts).

def grouped_mm_fast_on_cuda(x, w13, w2):
    """Does torch._grouped_mm have its fast kernel for these tensors, and do
    we trust it?

    PyTorch's grouped CUDA kernel (CUTLASS) runs on compute capability 9.x
    and 10.x, with bf16 operands, row strides that are multiples of 16 bytes
    (8 bf16 values) and fewer than 1024 groups: the kernel checks
    group_count < 1024, so 1024 experts on one rank are refused (its message
    says "more than 1024"). Anywhere else torch runs the op as a loop of
    matmuls behind a host sync, which is forward_loop with extra steps.

    9.x only (Hopper): on 10.x (Blackwell) the weight gradient of an expert
    that received no rows comes out non-zero (pytorch#172439), and AdamW
    would move that expert. Zeroing those gradients by hand would also work;
    leaving Blackwell on the loop until the kernel is fixed is simpler.
    bf16 only where the run asked for it (autocast, as train.py does on
    CUDA): an fp32 run keeps fp32 experts."""
    if x.device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    wants_bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    n_experts, d, h = w13.shape[0], w13.shape[1], w2.shape[1]
    return (wants_bf16 and torch.cuda.get_device_capability(x.device)[0] == 9
            and d % 8 == 0 and h % 8 == 0 and n_experts < 1024)


def grouped_experts_bf16(x, counts, w13, w2):
    """The experts in bf16, as a GPU runs them.

    torch._grouped_mm is not on autocast's list of ops, so the bf16 casts are
    written out: input and the fp32 master weights go to bf16 here (their
    gradients come back in fp32), while the router stays fp32 (Router).
    The block ends are a cumsum of the counts *on the device*: the CPU never
    waits for the GPU, where counts.tolist() would stall it once per layer.
    No moe.MIN_ROWS padding either: the kernel's tile shape depends on the total
    rows and the widths, not on how the rows split into blocks, so a token's
    arithmetic does not depend on how many other tokens chose its expert."""
    ends = torch.as_tensor(counts, device=x.device).cumsum(0, dtype=torch.int32)
    bf16 = torch.bfloat16
    return grouped_swiglu(x.to(bf16), ends, w13.to(bf16), w2.to(bf16))


# --- On a CPU.

@functools.cache
def grouped_mm_on_cpu():
    """Can this PyTorch run torch._grouped_mm (a private op, not on CPU in
    every version) forward and backward on CPU? Tried once on a tiny input."""
    try:
        x = torch.ones(32, 16, requires_grad=True)
        w = torch.ones(2, 16, 16, requires_grad=True)
        torch._grouped_mm(x, w, offs=torch.tensor([16, 32], dtype=torch.int32)).backward(torch.ones(32, 16))
        return True
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


# PyTorch runs an elementwise op of up to this many elements on one thread
# (its grain size for splitting work across threads).
ELEMENTS_PER_THREAD = 32768


def grouped_is_faster_on_cpu(x, counts, w13, w2):
    """The rule: grouped while the mean expert's activation block (its rows
    x d_expert values) is under ELEMENTS_PER_THREAD per thread, else the loop.

    On CPU torch._grouped_mm is itself a loop of matmuls (in C++), so the
    matmuls cost the same both ways; the ways differ around them.
      grouped  no Python or autograd work per expert (a dozen small ops
               each), and one activation op over all N rows, which every
               thread shares;
      loop     each expert's activation runs while its block is still in
               cache (grouped writes an [N, 2h] tensor to memory and reads
               it back), but on one thread until the block is big enough.
    So the loop wins once one expert's block keeps every thread busy. The
    measured crossover is in docs/speed.md. (The grouped op
    also needs row strides that are multiples of 16 bytes, and operands of
    one dtype: it is not on autocast's list, so bf16 rows under CPU autocast
    take the loop, whose matmuls autocast does cast.)"""
    if x.device.type != "cpu" or not grouped_mm_on_cpu() or x.dtype != w13.dtype:
        return False
    if any(width * x.element_size() % 16 for width in (w13.shape[1], w2.shape[1])):
        return False
    block = x.shape[0] / max(1, len(counts)) * w2.shape[1]
    return block < ELEMENTS_PER_THREAD * torch.get_num_threads()


def grouped_experts_cpu(x, counts, w13, w2):
    """The experts in two grouped matmuls on CPU, each expert's block padded
    to at least moe.MIN_ROWS rows as forward_loop pads it (expert_rows says why),
    so both ways use the same BLAS kernel for every row and agree bit for bit."""
    sizes = [n if n == 0 or n >= moe.MIN_ROWS else moe.MIN_ROWS for n in counts]
    rows = None
    if sizes != counts:
        # `rows` is where each real row sits in the padded blocks; rarely
        # needed after the first steps, when no expert is nearly empty.
        x, rows = pad_blocks(x, counts, sizes)
    ends = torch.tensor(sizes, device=x.device).cumsum(0).to(torch.int32)
    out = grouped_swiglu(x, ends, w13, w2)
    return out if rows is None else out.index_select(0, rows)


def pad_blocks(x, counts, sizes):
    """Copy the row blocks of x (block e has counts[e] rows) into a zeroed
    tensor whose block e has sizes[e] >= counts[e] rows. Returns the padded
    tensor and the position of every original row in it."""
    counts_t = torch.tensor(counts, device=x.device)
    pad = torch.tensor(sizes, device=x.device) - counts_t      # zero rows added to block e
    shift = pad.cumsum(0) - pad                                 # zero rows added before block e
    rows = torch.arange(x.shape[0], device=x.device) + shift.repeat_interleave(counts_t)
    return x.new_zeros(sum(sizes), x.shape[1]).index_copy(0, rows, x), rows
