"""lab/plan.py: the bytes of one training step, checked against a case small
enough to count by hand, and its command line."""

import pytest

import plumbing
import train
from lab import plan


def tiny_plan(nodes, gpus_per_node, ep_size):
    """The tiny preset (lossfree): 2 layers, d_model 64, 8 experts top-2 of
    width 64, no shared expert, 64-byte sequences, 8 sequences per step."""
    cfg = plumbing.model_config(train.parse_args(["--preset", "tiny"]))
    return plan.plan(cfg, batch_size=8, grad_accum=1, nodes=nodes, gpus_per_node=gpus_per_node, ep_size=ep_size)


# The tiny model by hand.
#   replicated, per layer: qkv 3*64*64 + proj 64*64 + router 8*64 + 2 norms of 64 = 17024;
#     2 layers 34048, plus embeddings 256*64 + 64*64, head 256*64, final norm 64: 70976
#   one expert in one layer: w13 64*128 + w2 64*64 = 12288; all 8 x 2 layers: 196608
REPLICATED, ONE_EXPERT_LAYER = 70976, 12288


def test_plan_counts_the_bytes_of_a_hand_computed_mesh():
    """2 nodes x 2 GPUs, ep 2: rows of the mesh are ranks [0, 1] and [2, 3]
    (one node each), columns [0, 2] and [1, 3] (across the nodes)."""
    p = tiny_plan(nodes=2, gpus_per_node=2, ep_size=2)
    assert (p["world_size"], p["dp_size"]) == (4, 2)
    assert p["replicated_params"] == REPLICATED
    assert p["expert_params_per_gpu"] == 2 * 4 * ONE_EXPERT_LAYER == 98304
    # 8 x 64 tokens over 4 GPUs: 128 each, 256 rows with top-2. Per layer 4
    # exchanges (out, back, and both in the backward) of 256 rows x 64 x 2
    # bytes (bf16) = 131072, half of it to the other rank of the row.
    assert p["tokens_per_micro_step"] == 128
    assert p["a2a_bytes_per_layer"] == 65536
    assert (p["a2a_bytes_per_layer_nvlink"], p["a2a_bytes_per_layer_ib"]) == (65536, 0)
    assert p["a2a_bytes"] == 2 * 65536
    assert p["count_bytes"] == 2 * 8 * 8 // 2                 # 8 int64 counts per layer, half leave
    # fp32 gradients, ring all-reduce: each rank sends 2 (n-1)/n of the buffer.
    assert p["allreduce_replicated_buffer"] == 4 * REPLICATED == 283904
    assert p["allreduce_replicated_bytes"] == 283904 * 2 * 3 // 4 == 425856
    assert p["allreduce_expert_buffer"] == 4 * 98304 == 393216
    assert p["allreduce_expert_bytes"] == 393216 * 2 * 1 // 2
    assert p["allreduce_replicated_crosses_nodes"] and p["allreduce_expert_crosses_nodes"]
    # fp32 weights, gradients and two AdamW moments of this GPU's share.
    assert p["param_bytes_per_gpu"] == p["grad_bytes_per_gpu"] == 4 * (REPLICATED + 98304) == 677120
    assert p["adam_bytes_per_gpu"] == 2 * 677120
    # The folder: weights and moments (12 bytes) of everything, plus lossfree's
    # bias (2 layers x 8 fp32): 2 expert shards of one rank's 4 experts, and
    # the replicated state. A resuming rank reads its shard and the replicated state.
    assert p["ckpt_bytes"] == 12 * (REPLICATED + 196608) + 2 * 8 * 4 == 3211072
    assert p["ckpt_shard_bytes"] == 12 * 98304
    assert p["ckpt_replicated_bytes"] == 12 * REPLICATED + 64
    assert 2 * p["ckpt_shard_bytes"] + p["ckpt_replicated_bytes"] == p["ckpt_bytes"]
    assert p["ckpt_resume_read_bytes"] == 4 * (12 * 98304 + 12 * REPLICATED + 64)
    assert p["ckpt_hash_read_bytes"] == p["ckpt_bytes"]          # the sha256s: every file once


def test_plan_sends_the_exchange_over_infiniband_when_a_row_spans_nodes():
    """2 nodes x 1 GPU, ep 2: the row [0, 1] is two nodes, so the rows that
    leave a rank cross InfiniBand; with no replicas, no expert all-reduce."""
    p = tiny_plan(nodes=2, gpus_per_node=1, ep_size=2)
    assert p["tokens_per_micro_step"] == 256
    assert (p["a2a_bytes_per_layer_nvlink"], p["a2a_bytes_per_layer_ib"]) == (0, 4 * 512 * 64 * 2 // 2)
    assert p["allreduce_expert_bytes"] == 0 and p["dp_size"] == 1


def test_plan_times_are_bytes_over_the_one_way_rate():
    """With both links at 1 GB/s each way, a step's exchange is the bytes
    that leave a rank, and the two all-reduces add up."""
    p = tiny_plan(nodes=2, gpus_per_node=2, ep_size=2)
    t = plan.times(p, plan.Links(nvlink_GBps=2.0, ib_Gbps=8.0))
    assert t["a2a"] == pytest.approx(2 * 65536 / 1e9)
    assert t["allreduce"] == pytest.approx((425856 + 393216) / 1e9)


def test_plan_prints_the_gpu_preset_on_8_nodes(capsys):
    assert plan.main(["--nodes", "8", "--gpus-per-node", "8", "--ep-size", "8", "--preset", "gpu"]) == 0
    out = capsys.readouterr().out
    assert "64 ranks; ep 8 x dp 8" in out and "all-to-all" in out and "largest share of a step" in out


def test_plan_refuses_an_ep_size_that_does_not_divide_the_gpus_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        plumbing.cli(lambda: plan.main(["--nodes", "1", "--gpus-per-node", "8", "--ep-size", "3", "--preset", "gpu"]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--ep-size 3" in err
