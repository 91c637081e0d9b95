"""The lab: tools that study the lesson (train.py, balancers.py, moe.py,
data.py) from outside it. Each runs as a module from the repository root,
where the lesson's modules import as they do for train.py:

    python -m lab.compare        the papers' claims, or your strategy against others, on paired seeds
    python -m lab.aux_diagnosis  why the sigmoid-gate aux loss lowers every score instead of balancing
    python -m lab.show_routing   which expert every byte went to, drawn
    python -m lab.curves         runs' log.jsonl drawn (MaxVio, health, loss, strategy state), no TensorBoard
    python -m lab.plan           a GPU cluster's bytes and memory per step, on paper
    python -m lab.bench          how fast the MoE layer is, and where the time goes
    python -m lab.gpu_check      the GPU path checked in one command (timeout 600 on a CUDA machine)
    python -m lab.readme         the README's strategies table and lesson size, from the code

lab.stats holds the statistics every comparison uses (paired differences,
intervals, the three-way verdict, Holm, seed counts); lab.claims the papers'
claims, written as data over it.
"""
