"""
lab/claims.py -- the papers' claims as data: for each, the sentence, the
table or figure it mirrors, its arms (train.py flags that differ only in
what the paper varied) and its parts (which difference of which measure,
on which side). lab/compare.py trains the arms and judges the parts with
lab/stats.py; a comparison of your own arms (--arms) is one more Claim
built the same way, by strategy_comparison.

A part names its arms by label:
  Paired  d = a - b within seed, judged against a side of 0 or of a margin
  Single  one arm's own figure (itself a within-model difference) against 0
  Exact   a check with no noise (the causality probe), on every run of its arms
"""

import dataclasses
import math

from balancers import BALANCERS
from lab import stats

# Every run: train.py's tiny preset (2 layers, width 64) on batches of 32
# sequences of 64 bytes, validation on up to 512 windows per domain (the whole
# split where it is smaller; the same windows for every run). Two shapes of
# MoE layer, with about the same expert parameters and active width:
#   "model"  16 routed experts top-2, each 64 wide (no shared expert)
#   "fine"   the DeepSeekMoE shape both papers trained (Wang et al.: 2
#            shared + 64 routed top-6; Qiu et al.: 4 shared + 64 routed
#            top-4), scaled down: 2 shared + 32 routed top-4, each 32 wide.
#            Claim 1 (lossfree), the alpha sweep and the computation batch.
SIZES = {
    "default": dict(steps=500, batch=32, warmup=25, val_seqs=512,
                    model=["--preset", "tiny", "--n-experts", "16"],
                    fine=["--n-experts", "32", "--top-k", "4", "--shared-experts", "2", "--d-expert", "32"]),
    "quick": dict(steps=150, batch=32, warmup=10, val_seqs=128,
                  model=["--preset", "tiny", "--n-experts", "16"],
                  fine=["--n-experts", "32", "--top-k", "4", "--shared-experts", "2", "--d-expert", "32"]),
    "smoke": dict(steps=3, batch=16, warmup=1, val_seqs=4,
                  model=["--preset", "tiny", "--n-experts", "8", "--d-model", "32", "--n-heads", "2",
                         "--d-expert", "32", "--seq-len", "32"],
                  fine=["--n-experts", "8", "--top-k", "2", "--shared-experts", "1", "--d-expert", "16"]),
}
QIU_MICRO = 4      # Qiu et al.'s micro-batch here: 4 sequences of one domain (256 tokens); the global batch is 8x larger
CB_MID = 32        # "a moderate computation batch": the training batch, 2,048 tokens (one of Wang et al.'s sequences)
CB_BIG = 1024      # 65,536 tokens: 32 of Wang et al.'s sequences, inside Fig. 5's range of 0-100
ALPHAS = ("0", "1e-4", "3e-4", "1e-3", "1e-2", "1e-1", "1")   # Fig. 2's sweep, App. C.2's 3e-4, up to a plain cost
COLLAPSE = 1.0     # MaxVio_global above every aux arm of Wang et al.'s Tables 2 and 6 (0.52-0.94): "near collapse"
WANG_GROUP = 32    # Wang et al.'s Eq. 2 balances "a sequence of length T": 2,048 tokens, 32 of this project's sequences

# Non-inferiority margins, declared before any run, each no larger than the
# effect the paper itself reports for that comparison (nats of val loss).
MARGINS = {
    "lossfree": (math.log(9.56 / 9.50), "Wang et al. Table 2 (1B): ln(9.56 / 9.50)"),
    "softmax": (math.log(9.604 / 9.599), "Wang et al. Table 6: ln(9.604 / 9.599)"),
    "global": (math.log(8.041 / 8.038), "Qiu et al. Table 2 (120B, 128x, the row nearest this claim's 8x): "
                                        "shuffle vs global, ln(8.041 / 8.038)"),
}

# The most seeds a comparison of your own arms gets when --seeds is not given
# (the pilot may lower it, never below stats.MIN_SEEDS).
ARMS_SEEDS = 5


# ----------------------------------------------------------------------------
# The parts. Each judges itself from `values(label, metric, seeds)` (one
# figure per seed, in the order of `seeds`) and `token_choice(label)`.

def with_paper(out, paper, effect=None):
    return {**out, **({"paper": paper} if paper else {}), **({"effect": effect} if effect is not None else {})}


@dataclasses.dataclass
class Paired:
    """The claim "a - b is on `side` of `margin`", seed by seed. A margin
    makes it a "no worse" claim, reported beside superiority (against 0)."""
    what: str
    a: str
    b: str
    metric: str
    side: str                   # "<" or ">"
    margin: float = 0.0
    unit: str = ""
    paper: str | None = None    # what the paper reports for the same comparison
    effect: float | None = None  # that report as a number in this part's units: what the seeds are powered at
    add: bool = False           # judge a + b instead (two costs that each hold half of an effect)

    def arms(self):
        return [self.a, self.b]

    def judge(self, values, seeds, token_choice):
        b = [-v if self.add else v for v in values(self.b, self.metric, seeds)]
        out = {"part": self.what, "a": self.a, "b": self.b, "metric": self.metric, "unit": self.unit,
               **stats.paired(values(self.a, self.metric, seeds), b, self.side, self.margin)}
        return with_paper(out, self.paper, self.effect)


@dataclasses.dataclass
class Single:
    """One arm's own figure against zero, seed by seed: a difference taken
    inside each run (the causal gap, the shuffle cost, a fall along S)."""
    what: str
    a: str
    metric: str
    side: str
    unit: str = ""
    paper: str | None = None
    effect: float | None = None
    margin: float = 0.0         # judged against this level instead of 0

    def arms(self):
        return [self.a]

    def judge(self, values, seeds, token_choice):
        out = {"part": self.what, "a": self.a, "b": None, "metric": self.metric, "unit": self.unit,
               **stats.verdict(values(self.a, self.metric, seeds), self.side, self.margin)}
        return with_paper(out, self.paper, self.effect)


def frontier_loss(points, maxvio):
    """The val loss the aux-loss frontier needs to reach `maxvio`: points
    [(maxvio, loss)] of one seed's alpha sweep, linearly interpolated in
    MaxVio between the two arms that bracket it. Below the best-balanced
    arm's MaxVio the frontier does not reach it; it is given that arm's loss,
    which favours the frontier (along it, better balance costs loss). Above
    the worst-balanced arm's, that arm's loss."""
    pts = sorted(points)
    if maxvio <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if maxvio <= x1:
            return y0 + (y1 - y0) * (maxvio - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
    return pts[-1][1]


@dataclasses.dataclass
class Frontier:
    """Wang et al. 2024, Fig. 2's reading: `a` lies beyond the trade-off the
    `sweep` arms trace, seed by seed: d = loss(a) - frontier_loss(sweep's
    (MaxVio_global, loss) points, MaxVio_global(a)) < 0, i.e. lower loss
    than the frontier needs for a's balance (the interpolation is declared
    here, before any run)."""
    what: str
    a: str
    sweep: list
    paper: str | None = None

    def arms(self):
        return [self.a, *self.sweep]

    def judge(self, values, seeds, token_choice):
        mv = {lbl: values(lbl, "maxvio_global", seeds) for lbl in self.arms()}
        loss = {lbl: values(lbl, "val_loss", seeds) for lbl in self.arms()}
        d = [loss[self.a][i] - frontier_loss([(mv[lbl][i], loss[lbl][i]) for lbl in self.sweep], mv[self.a][i])
             for i in range(len(seeds))]
        out = {"part": self.what, "a": self.a, "b": "the alpha frontier", "metric": "val_loss", "unit": "nats",
               **stats.verdict(d, "<")}
        return with_paper(out, self.paper)


def leaks(leak, token_choice):
    return leak > 0


def causal_exactly_when_token_choice(leak, token_choice):
    return (leak == 0) == token_choice


@dataclasses.dataclass
class Exact:
    """A check with no noise to wait out: `rule(value, token_choice)` on every
    run of every arm in `labels`. A single failure contradicts the claim."""
    what: str
    labels: list
    metric: str
    rule: object

    def arms(self):
        return list(self.labels)

    def judge(self, values, seeds, token_choice):
        ok = [self.rule(v, token_choice(lbl)) for lbl in self.labels for v in values(lbl, self.metric, seeds)]
        return {"part": self.what, "verdict": "holds" if ok and all(ok) else "contradicted",
                "seeds": len(ok), "unit": "", "metric": self.metric}


@dataclasses.dataclass
class Claim:
    key: str
    text: str            # the paper's claim, in one sentence
    source: str          # the table or figure it mirrors
    seeds: int           # the most seeds the confirmatory run may give it (the time budget's share)
    arms: dict           # {label: train.py flags}
    parts: list = dataclasses.field(default_factory=list)   # Paired, Single, Frontier and Exact, over the arms' labels
    scale: str = ""      # whether this CPU scale can test the claim at all, in one line

    def __post_init__(self):
        unknown = {lbl for p in self.parts for lbl in p.arms()} - set(self.arms)
        if unknown:
            raise ValueError(f"claim {self.key!r}: a part names an arm it does not have: {', '.join(sorted(unknown))}")


# ----------------------------------------------------------------------------
# The papers' claims.

def paper_claims(size):
    """Every claim with its arms and parts. A label is what a table row
    says; arms of equal settings (the same label in two claims, or the
    default strategy and its explicit twin) are the same runs, trained once,
    and every part reads all the seeds its arms have.

    Every alpha is the per-layer coefficient of the paper quoted, as in the
    papers: GPT.forward adds each layer's balance loss with the full alpha
    (Switch Sec. 2.2). Wang et al.'s sweep (Fig. 2), their alpha 1e-3
    (Table 2) and 3e-4 (App. C.2), and Qiu et al.'s 0.008 (Table 4) are
    their own numbers, not rescaled."""
    batch, fine = SIZES[size]["batch"], SIZES[size]["fine"]
    group = min(WANG_GROUP, batch)      # the smoke size's batch is smaller than one of Wang's sequences
    aux = lambda alpha, *more: ["--balancer", "aux", "--alpha", alpha, "--balance-seqs", str(group), *more]
    ec = lambda seqs, *more: ["--balancer", "expert_choice", "--route-seqs", str(seqs), *more]
    lossfree = lambda u: (f"lossfree u={u}, 16 experts", ["--balancer", "lossfree", "--bias-rate", u])

    # Wang et al. Table 2: both arms sigmoid, alpha 1e-3, the DeepSeekMoE shape.
    aux_1e3, wang_lossfree = "aux sigmoid alpha=1e-3", "lossfree u=1e-3"
    lf = wang_lossfree

    def better_balanced_at_no_worse_loss(key, lf, aux_label, vio, effect):
        margin, why = MARGINS[key]
        return [Paired("MaxVio_global lower", lf, aux_label, "maxvio_global", "<", paper=f"MaxVio_global {vio}",
                       effect=effect),
                Paired(f"val loss better or no worse (margin {margin:.4f} nats: {why})", lf, aux_label, "val_loss",
                       "<", margin, "nats", paper=f"{-margin:+.4f} nats")]

    claim_lossfree = Claim(
        "lossfree", "Loss-free balancing reaches a lower MaxVio_global than the aux loss, at better or no worse "
                    "perplexity",
        "Wang et al. 2024, Table 2: sigmoid gate on both sides, alpha 1e-3, DeepSeekMoE shape", 8,
        {aux_1e3: aux("1e-3", "--gate", "sigmoid", *fine),
         lf: ["--balancer", "lossfree", "--bias-rate", "1e-3", *fine]},
        better_balanced_at_no_worse_loss("lossfree", lf, aux_1e3, "0.72 -> 0.04", 0.04 - 0.72),
        scale="only trivially: this sigmoid aux arm never reaches the papers' balance (lab.aux_diagnosis), so the "
              "balance part cannot fail and the alpha claim's frontier is the real test; the loss part asks for an "
              "effect (0.006 nats) below this scale's seed noise")

    # Wang et al. Fig. 2 as a frontier: the alpha sweep under the softmax gate,
    # where the aux loss balances (lab.aux_diagnosis: under the sigmoid gate
    # with Eq. 2's raw P it lowers every score instead of re-ranking, and no
    # alpha reaches the papers' range at this scale), and loss-free with
    # App. C.2's proportional update beside it. Alpha 3e-4 is App. C.2's.
    sweep = {f"aux softmax alpha={a}": aux(a, "--gate", "softmax", *fine) for a in ALPHAS}
    small, wang_softmax, big = (f"aux softmax alpha={a}" for a in ("1e-4", "3e-4", ALPHAS[-1]))
    lf_softmax = "lossfree softmax proportional"
    lossfree_softmax = {lf_softmax: ["--balancer", "lossfree", "--gate", "softmax", "--bias-update", "proportional",
                                     *fine]}
    claim_alpha = Claim(
        "alpha", "The aux loss is a dilemma: a large alpha balances but costs perplexity, a small alpha leaves "
                 "routing near collapse; loss-free balancing lies beyond that trade-off",
        f"Wang et al. 2024, Fig. 2 and its softmax twin App. C.1, Fig. 7 (softmax here: the sigmoid aux does not "
        f"balance at this scale): alpha {', '.join(ALPHAS)}, DeepSeekMoE shape", 6,
        {**sweep, **lossfree_softmax},
        [Paired(f"alpha {ALPHAS[-1]} balances better than alpha 3e-4 (MaxVio_global)", big, wang_softmax,
                "maxvio_global", "<", paper="\"a large alpha keeps load balance under control\" (Fig. 2)"),
         Paired(f"alpha {ALPHAS[-1]} costs val loss against alpha 3e-4, the softmax alpha of lowest perplexity",
                big, wang_softmax, "val_loss", ">", 0.0, "nats",
                paper="at a perplexity cost (Fig. 2); 3e-4 \"yields the lowest perplexity\" (App. C.2)"),
         Single(f"alpha 1e-4 stays out of the papers' balanced range (MaxVio_global above {COLLAPSE})", small,
                "maxvio_global", ">", margin=COLLAPSE,
                paper=f"\"a small alpha causes routing collapse\" (Fig. 2); the aux arms of Wang's Tables 2 and 6 read 0.52-0.94"),
         Frontier("loss-free lies beyond the alpha frontier: lower val loss than the frontier needs for its "
                  "MaxVio_global", lf_softmax, list(sweep), paper="off the trade-off curve (Fig. 2)")],
        scale="yes, with the softmax gate; the sigmoid sweep of the paper does not balance here (docs/comparison.md)")

    claim_cb = Claim(
        "computation_batch", "Loss-free's balance keeps improving as the computation batch grows; the aux loss's "
                             "levels off, so loss-free is better balanced from a moderate batch on",
        f"Wang et al. 2024, Sec. 5.1 and Fig. 5: the alpha claim's models (aux alpha 1e-2, balanced), MaxVio over "
        f"computation batches of S validation sequences drawn at random, above a random balanced router's", 6,
        {**lossfree_softmax, "aux softmax alpha=1e-2": sweep["aux softmax alpha=1e-2"]},
        [Single(f"loss-free's MaxVio above the noise floor falls from S = {CB_MID} to {CB_BIG} sequences "
                f"({CB_MID * 64:,} to {CB_BIG * 64:,} tokens)", lf_softmax, "cb_excess_fall", "<",
                paper="keeps improving (Fig. 5, 0-100 sequences of 2,048 tokens)"),
         Paired("the aux loss's falls less over the same range (levels off)", lf_softmax, "aux softmax alpha=1e-2",
                "cb_excess_fall", "<", paper="approximately constant when large (Fig. 5)"),
         Paired(f"loss-free lower at S = {CB_BIG} sequences", lf_softmax, "aux softmax alpha=1e-2", "cb_big", "<",
                paper="loss-free below the aux loss from a moderate batch on (Fig. 5)")],
        scale=f"in part: S up to {CB_BIG} sequences is 32 of Wang's 2,048-token sequences, within Fig. 5's range")

    claim_softmax = Claim(
        "softmax", "With the softmax gate, loss-free (proportional update) also balances better at better or no "
                   "worse perplexity", "Wang et al. 2024, App. C.2 and Table 6: softmax gate, alpha 3e-4", 6,
        {wang_softmax: sweep[wang_softmax], **lossfree_softmax},
        better_balanced_at_no_worse_loss("softmax", lf_softmax, wang_softmax, "0.937 -> 0.027", 0.027 - 0.937),
        scale="the balance part yes; the loss part asks for an effect (0.0005 nats) far below this scale's noise")

    # Qiu et al. (Sec. 4.1, Table 4), in their shape: shared experts beside the
    # routed ones, softmax gate, z-loss, LBL weight 0.008; every micro-batch of
    # one domain (QIU_MICRO sequences).
    qiu = lambda *flags: [*flags, *fine, "--gate", "softmax", "--alpha", "0.008", "--z-loss", "1e-3",
                          "--domain-block", str(QIU_MICRO)]
    balance = lambda n: f"aux, balance {n} seqs"
    micro, glob, shuffle = balance(QIU_MICRO), f"global_aux, balance {batch} seqs", \
        f"Shuffle LBL_micro, f of {QIU_MICRO} seqs of random tokens"
    margin, why = MARGINS["global"]
    claim_global = Claim(
        "global", f"Balancing over the global batch ({batch} sequences) instead of single-domain micro-batches "
                  f"({QIU_MICRO} sequences) lets experts specialise by domain and lowers perplexity; a balance group "
                  f"of micro-batch size drawn across the global batch does as well",
        f"Qiu et al. 2025, Tables 1-2 and Fig. 1b: Balance BSZ {QIU_MICRO} -> {batch} sequences "
        f"({batch // QIU_MICRO}x; {QIU_MICRO * 64} tokens a micro group, theirs 4 x 4,096), shared experts, "
        f"softmax gate, alpha 0.008, z-loss 1e-3", 5,
        {micro: qiu("--balancer", "aux", "--balance-seqs", str(QIU_MICRO)),
         glob: qiu("--balancer", "global_aux"),
         shuffle: qiu("--balancer", "aux", "--balance-seqs", str(QIU_MICRO), "--balance-shuffle")},
        [Paired("specialisation higher (global vs micro)", glob, micro, "specialization", ">",
                paper="domain-specific experts (Fig. 1b)"),
         Paired("specialisation with the byte held fixed higher (global vs micro)", glob, micro,
                "specialization_within_byte", ">", paper="domain-level, not only token-level, specialisation"),
         Paired("val loss lower (global vs micro)", glob, micro, "val_loss", "<", 0.0, "nats",
                paper=f"{math.log(8.062 / 8.167):+.4f} nats at 8x, this claim's ratio (Table 1, 120B: 4 -> 32)",
                effect=math.log(8.062 / 8.167)),
         Paired("shuffle better than micro", shuffle, micro, "val_loss", "<", 0.0, "nats",
                paper=f"{math.log(8.041 / 8.167):+.4f} nats (Table 2, 120B: micro 4, global 512, 128x)",
                effect=math.log(8.041 / 8.167)),
         Paired(f"shuffle no worse than global (margin {margin:.4f} nats: {why})", shuffle, glob, "val_loss",
                "<", margin, "nats", paper=f"{margin:+.4f} nats (Table 2, 120B, 128x)")],
        scale=f"in part: {batch // QIU_MICRO}x between micro and global batch where the paper has 32-512x")

    # Wang et al. App. D.2 / Fig. 9 train chunks of 512, 2,048 and 8,192 tokens (a quarter, one and four of
    # their sequences); the leak shows at 512, and their control is the 512 chunk trained shuffled.
    quarter, control = "EC, chunk of 16 tokens (a quarter seq)", "EC, chunk of 16 tokens, trained shuffled"
    chunks = {quarter: ec(1, "--route-tokens", "16"), "EC, chunk 1 seq": ec(1), "EC, chunk 4 seqs": ec(4),
              control: ec(1, "--route-tokens", "16", "--route-shuffle")}
    whole = "EC, chunk 1 seq"
    claim_ec = Claim(
        "expert_choice", "Expert choice leaks future tokens: the causality probe is non-zero, a quarter-sequence "
                         "chunk's teacher-forced loss understates its causal loss beyond what the shuffled control's "
                         "does, the model relies on the leak, and it trains to an abnormally low teacher-forced loss",
        "Wang et al. 2024, Sec. 5.2, App. D.2 and Fig. 9: chunks of a quarter, one and four sequences", 5, chunks,
        [Exact("causality probe > 0 for every expert-choice arm (two forwards, one permutation)", list(chunks),
               "causal_leak", leaks),
         Paired("the causal gap (causal minus teacher-forced loss) of the quarter chunk exceeds the shuffled "
                "control's", quarter, control, "causal_gap", ">", 0.0, "nats",
                paper="leakage \"prevents reliable evaluation\" (Sec. 5.2)"),
         Paired("the leak's share of the shuffle test: the quarter chunk's rise when shuffled plus the control's rise "
                "when grouped (each model's out-of-regime cost enters once, with opposite signs)", quarter, control,
                "shuffle_cost", ">", 0.0, "nats", add=True,
                paper="\"Shuffling tokens eliminates this loss drop\" (App. D.2, Fig. 9)"),
         Paired("a quarter-sequence chunk trains to a lower teacher-forced loss than a whole-sequence chunk",
                quarter, whole, "val_loss", "<", 0.0, "nats",
                paper="chunk 512 of 2,048 \"leads to an abnormal loss drop\" (App. D.2)")],
        scale="yes: the leak is a property of the routing rule, not of the scale")

    (slow, slow_flags), (mid, mid_flags), (fast, fast_flags) = lossfree("1e-4"), lossfree("1e-3"), lossfree("1e-2")
    claim_bias_rate = Claim(
        "bias_rate", "Update rate: u = 1e-4 balances too slowly, u = 1e-2 oscillates late in training",
        "Wang et al. 2024, Sec. 4.3 and Fig. 4", 5, {slow: slow_flags, mid: mid_flags, fast: fast_flags},
        [Paired("u=1e-4 less balanced early (MaxVio_batch, first quarter)", slow, mid, "maxvio_early", ">"),
         Paired("u=1e-2 less balanced late (MaxVio_batch, last quarter)", fast, mid, "maxvio_late", ">"),
         Paired("u=1e-2's bias reverses direction more often late", fast, mid, "bias_reversals", ">")],
        scale="yes: the rate's effect on the bias's path shows within 500 steps")

    since = {"lossfree": ["--balancer", "lossfree"], "quantile": ["--balancer", "quantile"],
             "momentum_bias": ["--balancer", "momentum_bias"], "threshold": ["--balancer", "threshold"],
             "expert_choice": ["--balancer", "expert_choice"], "aux": ["--balancer", "aux"],
             "lossfree, capacity 1.0, drop by probs": ["--balancer", "lossfree", "--expert-capacity", "1.0"],
             "lossfree, 2 of 4 expert groups": ["--balancer", "lossfree", "--n-groups", "4", "--topk-groups", "2"]}
    capped, grouped = list(since)[-2:]
    margin, why = MARGINS["lossfree"]
    claim_since = Claim(
        "since_2024", "Since loss-free balancing: quantile balancing balances faster than the sign step at no worse "
                      "loss; the momentum step reverses less late in training; expert-threshold routing is exactly "
                      "causal and balances better at lower loss than token choice with an aux loss; capacity drops "
                      "cost loss; group-limited routing costs none",
        "Su, MoE Journey part 6; Arcee Trinity Large Eqs. 23-28; Sun et al. 2026 (arXiv 2603.11535); GShard / "
        "Switch capacity; DeepSeek-V2 Sec. 2.2.2 and V3 Sec. 2.1.2: every strategy at its own defaults, 16 experts "
        "top-2", 8, since,
        [Paired("quantile balances faster than the sign step (MaxVio_batch, first quarter)", "quantile", "lossfree",
                "maxvio_early", "<", paper="balances \"very fast\" (Su, part 6)"),
         Paired(f"quantile's val loss no worse than the sign step's (margin {margin:.4f} nats: {why})", "quantile",
                "lossfree", "val_loss", "<", margin, "nats", paper="no gain where the sign rule balances (Su)"),
         Paired("the momentum step's bias reverses direction less often late (last quarter)", "momentum_bias",
                "lossfree", "bias_reversals", "<", paper="\"MaxVio stopped diverging\" (Trinity; no ablation)"),
         Exact("causality probe exactly 0 for expert threshold, > 0 for expert choice", ["threshold", "expert_choice"],
               "causal_leak", causal_exactly_when_token_choice),
         Paired("expert threshold's val loss lower than token choice with the aux loss", "threshold", "aux",
                "val_loss", "<", 0.0, "nats", paper="CE 2.620 vs 2.687: -0.067 (Sun et al., 2.4B)", effect=-0.067),
         Paired("expert threshold balances better than token choice with the aux loss (MaxVio_global)", "threshold",
                "aux", "maxvio_global", "<", paper="not reported"),
         Paired("capacity 1.0 with drops costs val loss against dropless", capped, "lossfree", "val_loss", ">", 0.0,
                "nats", paper="loss not reported; marin #4016: factor 1.25 -> 1.0 is 8-11% faster"),
         Paired(f"group-limited routing's val loss no worse than unrestricted (margin {margin:.4f} nats)", grouped,
                "lossfree", "val_loss", "<", margin, "nats",
                paper="M >= 3 of 8 devices \"roughly aligned with the unrestricted top-K\" (DeepSeek-V2 Sec. 2.2.2)")],
        scale="the balance and causality parts yes; the sources' loss effects come from 2B-scale runs")

    everyone = {name: ["--balancer", name] for name in BALANCERS}
    claim_main = Claim(
        "main", "Every registered strategy at its own defaults; token choice is exactly causal", "all papers", 3,
        everyone,
        [Exact("causality probe exactly 0 for every token-choice strategy, > 0 for expert choice", list(everyone),
               "causal_leak", causal_exactly_when_token_choice)],
        scale="yes: an exact property")

    return [claim_lossfree, claim_alpha, claim_cb, claim_softmax, claim_global, claim_ec, claim_bias_rate,
            claim_since, claim_main]


# ----------------------------------------------------------------------------
# Your own arms, as one more claim.

def strategy_comparison(arms, token_choice):
    """A comparison of any arms (--arms): every arm B against the first arm A,
    d = B - A within seed, on three measures, each claimed in the direction
    that is better for B: val loss lower, MaxVio_global lower, specialisation
    higher. "holds" says B is better than A on that measure, "contradicted"
    that it is worse, "unresolved" that the seeds cannot tell.

    The loss is the one generation sees: a pair with an arm whose strategy
    is not token choice (expert choice reads the future of its routing group
    under teacher forcing) compares causal losses, on the windows the causal
    evaluation covers, for both arms (token_choice: {label: bool})."""
    labels = list(arms)
    a = labels[0]
    parts = []
    for b in labels[1:]:
        causal = not (token_choice[a] and token_choice[b])
        loss = ("val loss as generated (causal, on the causal evaluation's windows)", "val_loss_as_generated") \
            if causal else ("val loss", "val_loss")
        parts += [Paired(f"{b} - {a}: {loss[0]} lower", b, a, loss[1], "<", unit="nats"),
                  Paired(f"{b} - {a}: MaxVio_global lower", b, a, "maxvio_global", "<"),
                  Paired(f"{b} - {a}: specialisation higher", b, a, "specialization", ">")]
    return Claim("arms", f"Each arm against {a}: lower val loss, lower MaxVio_global, higher specialisation",
                 "your arms (--arms), on paired seeds", ARMS_SEEDS, dict(arms), parts)
