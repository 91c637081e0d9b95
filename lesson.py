"""
lesson.py -- the lesson notebook, as a percent-format script.

    python lesson.py --build     # writes lesson.ipynb next to this file
    python lesson.py --check     # is the committed lesson.ipynb the built one?
    python lesson.py             # runs the lesson as a plain script

Every `# %%` line below starts a code cell and every `# %% [markdown]` line
a text cell (the format jupytext and VS Code read). Everything above the
first cell marker, this builder included, stays out of the notebook. The
builder numbers the cells itself instead of drawing random cell ids, so the
same lesson.py always gives the same lesson.ipynb (tests/test_notebook.py
checks that the committed notebook is the built one, then runs it).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cells(source):
    """[(kind, text)] of a percent-format source, without the preamble."""
    out, kind, lines = [], None, []
    for line in source.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                out.append((kind, lines))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line[2:] if kind == "markdown" and line.startswith("# ") else
                         "" if kind == "markdown" and line == "#" else line)
    if kind is not None:
        out.append((kind, lines))
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in out]


def notebook(source):
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, (kind, text) in enumerate(cells(source)):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(text, id=f"cell-{i:02d}"))
    return nbformat.writes(nb) + "\n"


def build(check=False):
    """Write lesson.ipynb, or (check) say whether the committed one is current."""
    built = notebook((HERE / "lesson.py").read_text(encoding="utf-8"))
    target = HERE / "lesson.ipynb"
    if check:
        if not target.exists() or target.read_text(encoding="utf-8") != built:
            print(f"{target} is not what lesson.py builds: run python lesson.py --build", file=sys.stderr)
            return 1
        print(f"{target} is up to date")
        return 0
    target.write_text(built, encoding="utf-8")
    print(f"wrote {target}")
    return 0


if sys.argv[1:] in (["--build"], ["--check"]):
    sys.exit(build(check=sys.argv[1] == "--check"))

# %% [markdown]
# # Load balancing in a Mixture of Experts, on a laptop
#
# A Mixture-of-Experts layer sends every token to a few of its experts. Left alone, the router
# sends most tokens to a few experts, which then learn faster and attract even more tokens. This
# notebook walks through the project's answers, importing its files (`moe.py`, `balancers.py`,
# `train.py`, `lab/show_routing.py`, `sample.py`) rather than copying them:
#
# 1. the router and top-k on a toy batch;
# 2. the auxiliary loss of Switch Transformer computed by hand, and checked against `balancers.py`,
#    and why under a sigmoid gate it can lower every score instead of balancing;
# 3. a short run of `aux` against `lossfree`: their MaxVio curves and the loss-free bias, and the
#    bias read as a price (the dual of an assignment problem) on a toy batch;
# 4. expert choice, balanced by construction, and the causality probe that shows its leak;
# 5. which expert each byte went to;
# 6. letting the trained models write.
#
# It runs top to bottom on a CPU in a few minutes at most with the built-in corpus (docs/lesson.md
# has the measured time). Run it from the project folder. In Colab, first run a cell with
# `!git clone` and the project's address, then `%cd` into the folder it made, and
# `!pip install einops` (Colab has the other packages).

# %%
import json
import tempfile
import time
from pathlib import Path

if not Path("moe.py").exists():
    raise FileNotFoundError("run this notebook from the project folder, where moe.py is "
                            "(in Colab: !git clone the project, then %cd into it)")

import matplotlib.pyplot as plt
import torch

import balancers
import data
import moe
import plumbing
import sample
from lab import show_routing
import train

# The tensors here are tiny: more threads only add synchronisation, which on
# a busy 2-core machine made the runs below ten times slower.
torch.set_num_threads(1)
torch.manual_seed(0)
WORK = Path(tempfile.mkdtemp(prefix="moe-lesson-"))   # every run of this notebook writes here
t_start = time.time()
print("runs go to", WORK)

# %% [markdown]
# ## 1. The router and top-k
#
# The router is one matrix: expert `i` has a vector `e_i`, and token `t` (its hidden state `u_t`)
# scores `u_t . e_i` against every expert. A softmax turns the scores into gate values `s_{i,t}`,
# and each token keeps its `k` best experts (token choice). The toy batch: one sequence of six
# tokens of width 8, four experts, `k = 2`. The router's weights are drawn larger than in the model
# (which starts them at 0.02) so that the experts' scores differ visibly.

# %%
E, k, d = 4, 2, 8
router = moe.Router(d, E)
with torch.no_grad():
    router.weight.normal_(0, 1)
x = torch.randn(1, 6, d)                      # [batch, tokens, width]
logits = router(x)                            # [1, 6, E]: u_t . e_i
scores = logits.softmax(-1)                   # s_{i,t}, each row sums to 1
top = scores.topk(k, dim=-1)
print("gate values s_{i,t} (rows: tokens, columns: experts)")
print(scores[0].detach().numpy().round(3))
print("each token's two experts:", top.indices[0].tolist())

# %% [markdown]
# `balancers.top_k_routing` does the same and returns what every strategy returns: a flat list of
# assignments `(token, expert, weight)`, the one thing `moe.py`'s MoE layer needs.

# %%
routing = balancers.top_k_routing(logits, balancers.gate_scores(logits, "softmax"), k)
assert torch.equal(routing.expert_idx.view(1, 6, k), top.indices)
for t, e, w in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.weight.tolist()):
    print(f"token {t} -> expert {e}, weight {w:.3f}")

# %% [markdown]
# ## 2. The auxiliary loss by hand
#
# Switch Transformer (Fedus et al. 2021, Sec. 2.2) adds to the language-model loss
#
# $$\text{loss} = \alpha \, N \sum_{i=1}^{N} f_i \, P_i \qquad \text{(Eq. 4)}$$
#
# with $f_i$ the fraction of the tokens' assignments that went to expert $i$ (Eq. 5; with $k$
# experts per token the project divides by $k\,T$, so that the $f_i$ sum to 1) and $P_i$ the mean
# gate value of expert $i$ over the $T$ tokens (Eq. 6). $f$ counts and has no gradient; $P$ carries
# the gradient and is pushed down where $f$ is large. A uniform router scores exactly $\alpha$.

# %%
T, alpha = x.shape[1], 0.01
f = torch.bincount(routing.expert_idx, minlength=E).float() / (k * T)   # Eq. 5
P = scores[0].mean(0)                                                   # Eq. 6
by_hand = alpha * E * (f * P).sum()                                     # Eq. 4
print("f =", f.numpy().round(3), " P =", P.detach().numpy().round(3), f" loss = {by_hand.item():.5f}")

aux = balancers.AuxLoss(E, k, dict(alpha=alpha, balance_seqs=1))
from_project = aux.loss(aux.route(logits))
torch.testing.assert_close(by_hand, from_project)
print(f"balancers.AuxLoss gives {from_project.item():.5f}: the same")

uniform = torch.zeros(1, 6, E)                # every expert scored alike
print(f"a uniform router scores {aux.loss(aux.route(uniform)).item():.5f} (= alpha)")

# %% [markdown]
# ### 2b. The same loss under a sigmoid gate, and why it can fail to balance
#
# Wang et al. 2024 (Eq. 2) use the sigmoid gate and take $P_i$ as the mean of the raw sigmoid
# scores. Then $\partial\,\text{loss} / \partial u_{i,t} = \alpha N f_i\, s_{i,t}(1 - s_{i,t}) / T$ is
# never negative: the loss can only *lower* scores, and it goes down just as well when every score
# falls together, which changes no top-k. A softmax cannot do that (adding a constant to every logit
# changes nothing, and its gradient raises the idle experts), so the only way down is to re-rank.

# %%
shift = torch.full_like(logits, -3.0)          # every logit 3 lower: the same top-k for every token
for gate in ("sigmoid", "softmax"):
    bal = balancers.AuxLoss(E, k, dict(alpha=alpha, balance_seqs=1, gate=gate))
    before, after = bal.loss(bal.route(logits)).item(), bal.loss(bal.route(logits + shift)).item()
    u = logits.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(bal.loss(bal.route(u)), u)
    print(f"{gate:8s} loss {before:.5f} -> {after:.5f} with every score lowered; "
          f"gradient entries that would raise a score: {(grad < 0).float().mean().item():.0%}")

# %% [markdown]
# In training it happens. `python -m lab.aux_diagnosis` trains the comparison's model with each gate
# (alpha 1e-2) and measures one fixed batch along the way; its figures are in
# `results/aux_diagnosis.json`. Under the sigmoid gate the chosen experts' mean score falls from
# about 0.56 to about 0.01 within the first 125 steps while MaxVio stays high; under the softmax the
# scores keep their level, more than half of the gradient raises idle experts, and MaxVio falls.

# %%
diagnosis = json.loads(Path("results/aux_diagnosis.json").read_text())
for gate in ("sigmoid", "softmax"):
    for row in diagnosis[gate]:
        print(f"{gate:8s} step {row['step']:4d}  MaxVio {row['maxvio']:.2f}  score of chosen experts "
              f"{row['score_chosen']:.3f}, of the others {row['score_other']:.3f}  "
              f"gradient raising a score {row['negative_share']:.0%}")

# %% [markdown]
# ## 3. A short run: `aux` against `lossfree`
#
# `train.main` takes the same flags as `python train.py`. The tiny preset (2 layers, 8 experts,
# top-2) runs a few hundred steps in well under a minute. Two strategies:
#
# * `aux`: the loss above over balance groups of 2 sequences;
# * `lossfree` (Wang et al. 2024): no loss at all; after every step, each expert's bias moves by
#   $u$ against its load ($b_i \mathrel{+}= u \cdot \text{sign}(\bar{c} - c_i)$, Alg. 1), and the bias
#   only decides *which* experts win the top-k. The run is short, so the update rate $u$ is raised
#   from the paper's $10^{-3}$ to $10^{-2}$: the bias has 300 steps instead of thousands to find
#   its place.
#
# MaxVio (Wang et al., Eq. 4) is `(max load - mean load) / mean load`: 0 is perfect balance.
# `MaxVio_batch` is measured on every training batch, `MaxVio_global` on the whole validation set
# at each evaluation.

# %%
STEPS = 300
common = ["--preset", "tiny", "--steps", str(STEPS), "--eval-every", "50"]
runs = {}
for name, extra in (("aux", []), ("lossfree", ["--bias-rate", "0.01"])):
    assert train.main(common + ["--balancer", name, "--out", str(WORK / name)] + extra) == 0
    runs[name] = [json.loads(line) for line in open(WORK / name / "log.jsonl")]

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for name, log in runs.items():
    steps = [r["step"] for r in log]
    smooth = torch.tensor([r["maxvio_batch"] for r in log]).unfold(0, 20, 1).mean(1)   # 20-step mean
    ax1.plot(steps[19:], smooth, label=f"{name}: MaxVio_batch (20-step mean)")
    evals = [r for r in log if "maxvio_global" in r]
    ax1.plot([r["step"] for r in evals], [r["maxvio_global"] for r in evals], "o--", label=f"{name}: MaxVio_global")
ax1.set_xlabel("step")
ax1.set_ylabel("MaxVio (0 = balanced)")
ax1.legend(fontsize=8)
bias = torch.tensor([r["state"]["bias"][0] for r in runs["lossfree"]])   # [steps, E] of layer 0
ax2.plot([r["step"] for r in runs["lossfree"]], bias)
ax2.set_xlabel("step")
ax2.set_ylabel("bias b_i, layer 0")
ax2.set_title("lossfree: one line per expert", fontsize=10)
fig.tight_layout()
for name, log in runs.items():
    last = log[-1]
    print(f"{name:9s} val loss {last['val_loss']:.3f}  MaxVio_global {last['maxvio_global']:.3f}")

# %% [markdown]
# After each step an expert busier than average has its bias lowered and an idle one has it raised;
# only the differences between the biases change a top-k, so the lines may drift together. The
# loss never sees the bias. The figures of a full-size comparison, with several seeds, are in the README's results.
#
# ### 3b. The bias is a price: the dual reading
#
# Sending $m$ tokens to $k$ experts each, with every expert taking exactly its share $C = mk/n$,
# is an assignment problem: maximise $\sum_{ij} x_{ij} s_{ij}$ over $0 \le x \le 1$ with
# $\sum_j x_{ij} = k$ for each token and $\sum_i x_{ij} = C$ for each expert. Put a price
# $\beta_j$ on each expert's constraint instead of enforcing it, and the best answer is read off
# token by token: the top-$k$ of $s_{ij} - \beta_j$. That is lossfree's routing with $b = -\beta$.
# The prices that make the constraints hold minimise the dual function
#
# $$g(\beta) = \sum_i \text{top-}k_j\,(s_{ij} - \beta_j) + C \sum_j \beta_j, \qquad
# \partial g / \partial \beta_j = C - \text{load}_j .$$
#
# Lossfree's update is a sign step down that gradient (SignSGD, as Su reads it). Quantile balancing
# (`strategies/quantile.py`) jumps instead: with each token's own price $\alpha_i$ (its $(k+1)$-th
# best $s_{ij} - \beta_j$), $\beta_j$ becomes the level that exactly $C$ of the column
# $s_{:,j} - \alpha$ exceed. Below: 48 tokens, 4 experts, top-1, expert 0 favoured by every token.
# And a certificate: once every load is exactly $C$, the routing's total score equals $g(\beta)$,
# which no feasible assignment can beat, so it is the best balanced assignment (LP duality).

# %%
m, n, k1 = 48, 4, 1
C = m * k1 // n
s_toy = torch.rand(m, n, generator=torch.Generator().manual_seed(3))
s_toy[:, 0] += 0.3                                  # every token likes expert 0 a little more


def toy_route(beta):
    # the project's routing, with lossfree's bias b = -beta
    r = balancers.top_k_routing(s_toy.log()[None], s_toy[None], k1, -beta)
    return r.expert_idx.view(m, k1)


def toy_load(beta):
    return torch.bincount(toy_route(beta).reshape(-1), minlength=n)


def dual(beta):
    return ((s_toy - beta).topk(k1, dim=-1).values.sum() + C * beta.sum()).item()


def sign_step(beta, u=0.02):
    # Wang Alg. 1 on b = -beta: an expert over its share gets a higher price
    return beta + u * torch.sign(toy_load(beta) - C)


def quantile_step(beta):
    # Su, MoE Journey part 6: alpha_i, then beta_j as the level C of s_:,j - alpha exceed
    alpha = (s_toy - beta).topk(k1 + 1, dim=-1).values[:, -1:]
    column = (s_toy - alpha).sort(dim=0, descending=True).values
    return (column[C - 1] + column[C]) / 2


for name, step in (("sign step", sign_step), ("quantile step", quantile_step)):
    beta = torch.zeros(n)
    print(f"{name}:")
    for it in range(31):
        if it in (0, 1, 2, 5, 10, 30):
            print(f"  after {it:2d} steps: loads {toy_load(beta).tolist()} (C = {C}), g(beta) = {dual(beta):.4f}")
        beta = step(beta)
    chosen = toy_route(beta)
    total = s_toy.gather(1, chosen).sum().item()
    if toy_load(beta).eq(C).all():
        print(f"  balanced; its total score {total:.4f} equals g(beta) = {dual(beta):.4f}: optimal by duality")

# %% [markdown]
# Here the quantile step reaches exact balance within ten steps, with no step size to choose (each
# step solves one set of prices exactly, the others held fixed). The sign step gets close as fast
# and then circles the answer a token or so off, because its step never shrinks: the paper's rate
# $u$ trades the speed of the first approach against the size of that circling (its Fig. 4), and
# later methods smooth the step (`strategies/momentum_bias.py`). docs/beyond-lossfree.md
# has the whole family and what the comparison found.
#
# ## 4. Expert choice, and the causality probe
#
# Expert choice (Zhou et al. 2022) turns routing around: each expert takes the $C$ tokens of its
# routing group that score it highest. Every expert gets exactly $C$ tokens: MaxVio is 0 by
# construction. The catch (Wang et al. 2024, Sec. 5.2): whether token $t$ is taken depends on how
# the *later* tokens of the group score, so the output at $t$ depends on the future.
#
# `train.causal_probe` changes every token after position $t$ and measures how far the logits at
# positions $\le t$ move. A causal language model must answer exactly 0.

# %%
assert train.main(common + ["--balancer", "expert_choice", "--out", str(WORK / "expert_choice")]) == 0
models = {name: plumbing.load_model(WORK / name)[0] for name in ("aux", "lossfree", "expert_choice")}
corpus = data.load_corpus(None, seq_len=64, log=lambda *a: None)
x_val, y_val, _ = data.val_batches(corpus, 64, 8, 8)[0]
for name, model in models.items():
    leak = train.causal_probe(model, x_val, 32, torch.Generator().manual_seed(0))
    print(f"{name:14s} largest change of a logit at positions <= 32: {leak:.2e}")

# %% [markdown]
# The leak has a price that teacher forcing hides. Scored as in training (one forward over the
# whole sequence), expert choice sees where each byte's group is going; scored causally (the
# model run on each prefix alone, `moe.causal_logits`, which is what generation can do), it does
# not. For token choice the two agree.

# %%
import torch.nn.functional as F

xs, ys = x_val[:2], y_val[:2]
for name, model in models.items():
    with torch.no_grad():
        teacher = F.cross_entropy(model(xs).logits.transpose(1, 2), ys).item()
    causal = F.cross_entropy(moe.causal_logits(model, xs).transpose(1, 2), ys).item()
    print(f"{name:14s} validation loss teacher-forced {teacher:.4f}   causal {causal:.4f}")

# %% [markdown]
# ## 5. Which expert did each byte go to?
#
# `lab/show_routing.py` colours every byte of a code, a math and a prose sample by its top-1 expert,
# one column per run, with how often each domain uses each expert below (Qiu et al. 2025, Fig. 1b).
# It writes `routing.html` (hover a byte for all its experts) and `routing.png` next to the first
# checkpoint.

# %%
from IPython.display import Image, display

show_routing.main([str(WORK / "aux"), str(WORK / "lossfree"), "--bytes", "160", "--val-seqs", "8"])
display(Image(filename=str(WORK / "aux" / "routing.png")))

# %% [markdown]
# ## 6. Let the models write
#
# `sample.py` generates one byte at a time, rerunning the model on the whole prefix at each step.
# For a token-choice model the logits of each drawn byte are those teacher forcing gives at that
# position; for expert choice they are not, and scoring its own text both ways shows the leak
# once more. Three hundred steps of a 2-layer model on bytes produce word-like fragments, not
# prose: `python train.py` (the default preset) writes much better.

# %%
for name in ("lossfree", "expert_choice"):
    gen = sample.generate(models[name], b"def ", 160, temperature=0.8, seed=0)
    teacher, causal, n = sample.own_loss(models[name], gen)
    print(f"--- {name}: loss of its own last {n} bytes, teacher-forced {teacher:.4f}, causal {causal:.4f}")
    print(sample.printable(gen.text))

# %% [markdown]
# The same from a terminal, with every byte coloured by its expert and a page written next to the
# checkpoint:
#
#     python sample.py runs/lossfree --prompt "def " --tokens 300 --show-experts

# %%
print(f"the whole lesson took {time.time() - t_start:.0f} s")
