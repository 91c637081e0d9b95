"""What the checkers (exercises/test_ex*.py) share: which copy of the
exercises they check, and a few small fixtures built from the project.

Which copy: the environment variable EXERCISES_FROM.

    (unset) or "stubs"   exercises/*.py, the files a student edits
    "solutions"          exercises/solutions/*.py, the reference solutions
    any folder path      a folder with the same file names (the main suite
                         uses this to check that deliberately wrong
                         solutions fail; tests/test_exercises.py)

Each exercise file is imported from that folder under its own module name, so
a stub and its solution never clash, and a strategy registers itself in
balancers.BALANCERS (balancers.register, under its exN_ name) the moment its
file is imported, like tests/toy_strategy.py.
"""

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:                  # the project's flat modules
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moe import GPT, GPTConfig  # noqa: E402
from train import causal_probe, max_violation  # noqa: E402

# The exercise files, in order. Exercises 1-5 each add a strategy; 6 is a
# measurement; 7 and 8 are strategies with a shipped bug to find (docs/demons.md).
EXERCISES = ["ex1_multiplicative", "ex2_centred_bias", "ex3_capacity", "ex4_global_no_buffer",
             "ex5_causal_expert_choice", "ex6_first_specialist", "ex7_aux_loss_bug", "ex8_lossfree_bug"]


def source_folder():
    """The folder the exercise files are imported from (see the module docstring)."""
    choice = os.environ.get("EXERCISES_FROM", "").strip()
    if choice in ("", "stubs"):
        return HERE
    if choice == "solutions":
        return HERE / "solutions"
    folder = Path(choice).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"EXERCISES_FROM={choice!r}: no such folder; use 'stubs', 'solutions' or a folder path")
    return folder


def exercise(name):
    """The module exercises/<name>.py (or its copy in the chosen folder),
    imported once. Importing it registers its strategy."""
    module_name = f"exercise_{name}"
    if module_name not in sys.modules:
        path = source_folder() / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]


def diagnosed(module, number):
    """The module of a find-the-bug exercise (7, 8), once its DIAGNOSIS is
    written. Those files have no stub to fill in: untouched, they run, bug
    and all, so nothing in them raises NotImplementedError by itself. The
    DIAGNOSIS line is what the student writes, so until it is there the
    checks raise the stub's NotImplementedError for them, and the exercise
    reads "not started" like the others instead of failing on the shipped bug."""
    if not str(getattr(module, "DIAGNOSIS", None) or "").strip():
        raise NotImplementedError(f"exercise {number}: find the bug, fix it, and write DIAGNOSIS "
                                  f"(one line: what was wrong)")
    return module


# ----------------------------------------------------------------------------
# Small fixtures, the same sizes as the main suite's.

def skewed_logits(n_tokens=512, n_experts=8, seed=7, skew=2.0):
    """Router logits with a strong fixed preference: expert 0 >> expert E-1,
    plus per-token noise (tests/test_balancers.py uses the same router)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_tokens, n_experts, generator=g) + torch.linspace(skew, -skew, n_experts)


def drive(balancer, logits, steps):
    """Route the same batch `steps` times, calling step() with its load after
    each: a router that does not learn, and a balancer that must. Returns the
    MaxVio of every step."""
    vio = []
    for _ in range(steps):
        load = torch.bincount(balancer.route(logits).expert_idx, minlength=balancer.n_experts)
        vio.append(max_violation(load).item())
        balancer.step(load)
    return vio


def tiny_gpt(strategy, seed=0, seq_len=16, **knobs):
    """A 2-layer GPT with 4 experts top-2 that routes with `strategy`."""
    cfg = GPTConfig(vocab_size=32, seq_len=seq_len, n_layers=2, d_model=16, n_heads=2, n_experts=4,
                    top_k=2, d_expert=8, balancer=strategy, balance=dict(**knobs))
    torch.manual_seed(seed)
    return GPT(cfg)


def train_a_little(model, steps=3, batch=4, seed=0, lr=1e-2):
    """A few optimizer steps on random tokens, each ending with end_step(), so
    that the strategy's state (bias, multiplier, thresholds) is no longer its
    initial value when a test looks at it."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.seq_len), generator=g)
        out = model(x, x.roll(-1, dims=1))
        (out.lm_loss + out.balance_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.end_step()
    return model


def leak(model, t=7, seed=1):
    """train.causal_probe on a batch of 2 random sequences: how far the
    logits at positions <= t move when the tokens after t change (0 for a
    causal model)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.seq_len), generator=g)
    return causal_probe(model, x, t, torch.Generator().manual_seed(seed + 1))
