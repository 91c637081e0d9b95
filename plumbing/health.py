"""
plumbing/health.py -- routing health in every run, and the collapse alarm.

Everything here is computed from what train_step already has: each layer's
exact per-expert counts of the global batch ([layers, E], summed over every
rank by GPT.end_step) and each layer's mean per-token router entropy (summed
in the same place). No extra collective, no extra forward. Per layer and
optimizer step:

  tokens_min/max/std   the step's assignments per expert
  busiest_share        the busiest expert's share of the layer's tokens: 1.0
                       means every token of the step went to that expert
  dead                 experts that got no token over the last --dead-steps steps
  load_entropy         entropy of the load distribution, in nats: ln E when
                       every expert gets the same, 0 when one gets everything
  router_entropy       the mean over tokens of the entropy of the router's
                       per-token distribution (Routing.probs), in nats
  dropped              assignments the step dropped for --expert-capacity
                       (Routing.dropped, summed over micro-steps and ranks)
  state                for every floating-point state tensor of the strategy
                       (lossfree's bias): its range per layer and how many
                       experts sit at its minimum and at its maximum

and, once per layer, the collapse alarm (docs/health.md has the thresholds
and the measurements behind them). log.jsonl gets the figures under
"health", summary.json the final counts ("load_by_layer"), the terminal one
line at each evaluation.
"""

import math
from collections import deque

import torch

# The defaults of the health flags; docs/health.md has the measurements that
# chose them (tiny preset, top-1 of 16 experts, 300 steps, 6 seeds).
DEAD_STEPS = 20
ALARM_WINDOW = 125
ALARM_DEAD_STEPS = 200
# The share condition must hold on this fraction of the window's steps: a
# collapsed layer still has the odd step below the threshold, and one such
# step must not restart the count.
ALARM_FRACTION = 0.9


def add_health_flags(parser):
    """The health flags, as one group of train.py's command line."""
    g = parser.add_argument_group("routing health (docs/health.md)")
    g.add_argument("--dead-steps", type=int, default=DEAD_STEPS, metavar="N",
                   help=f"an expert with no token over the last N steps counts as dead (default: {DEAD_STEPS})")
    g.add_argument("--alarm-share", type=float, metavar="X",
                   help=f"collapse alarm: a layer's busiest expert sees more than this share of its tokens on "
                        f"{ALARM_FRACTION * 100:.0f}%% of the last --alarm-window steps, and that share is not falling "
                        f"(default: (top_k / n_experts) ** (1/3), 0.40 for top-1 of 16)")
    g.add_argument("--alarm-window", type=int, default=ALARM_WINDOW, metavar="W",
                   help=f"the steps the share condition is judged over (default: {ALARM_WINDOW})")
    g.add_argument("--alarm-dead-steps", type=int, default=ALARM_DEAD_STEPS, metavar="N",
                   help=f"collapse alarm: an expert has had no token for N steps (default: {ALARM_DEAD_STEPS})")
    g.add_argument("--tensorboard", nargs="?", const=True, default=None, metavar="DIR",
                   help="also write TensorBoard event files there (default DIR: OUT/tensorboard); needs the "
                        "tensorboard package")


def check_health_flags(args):
    """The health flags' ranges, one line naming the flag."""
    for name in ("dead_steps", "alarm_window", "alarm_dead_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a number of steps >= 1 (got {getattr(args, name)})")
    if args.alarm_share is not None and not 0 < args.alarm_share <= 1:
        raise ValueError(f"--alarm-share must be a share of the tokens in (0, 1] (got {args.alarm_share})")
    if args.tensorboard is not None:
        from .board import check_tensorboard
        check_tensorboard()


def default_alarm_share(top_k, n_experts):
    """(k/E)^(1/3): two thirds of the way, on a log scale, from the even share
    of the tokens (k/E) to all of them. Measured (docs/health.md): 0.40 for
    top-1 of 16 and 0.63 for top-2 of 8 separate `none` from the balancing
    strategies, where one fixed number cannot (0.4 is balanced for top-2 of 8)."""
    return (min(top_k, n_experts) / n_experts) ** (1 / 3)


def state_summary(state):
    """{name: {"min", "max", "at_min", "at_max"}} per layer, for every
    floating-point strategy state of shape [layers, E, ...]. "At" the min or
    max means within a thousandth of the range of it: the sign update moves
    every bias by the same step, so experts pinned at an end share one value
    up to float rounding."""
    out = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.dim() < 2:
            continue
        t = t.detach().float().cpu().flatten(1)
        lo, hi = t.min(1).values, t.max(1).values
        tol = 1e-3 * (hi - lo) + 1e-12
        out[name] = {"min": lo.tolist(), "max": hi.tolist(),
                     "at_min": (t <= (lo + tol)[:, None]).sum(1).tolist(),
                     "at_max": (t >= (hi - tol)[:, None]).sum(1).tolist()}
    return out


def entropy(p):
    """Entropy in nats along the last axis of a distribution (0 log 0 = 0)."""
    return torch.special.entr(p).sum(-1)


class Health:
    """The running figures of one run: per expert, the steps since it last
    got a token; per layer, the last `alarm_window` steps' busiest share and
    busiest expert; the alarms raised so far (each layer raises one at most).
    Its state goes into the checkpoint, so a resumed run alarms as the
    uninterrupted one would."""

    def __init__(self, n_layers, n_experts, tokens_per_step, dead_steps=DEAD_STEPS, alarm_share=0.4,
                 alarm_window=ALARM_WINDOW, alarm_dead_steps=ALARM_DEAD_STEPS):
        self.n_layers, self.n_experts, self.tokens = n_layers, n_experts, tokens_per_step
        self.dead_steps, self.alarm_share = dead_steps, alarm_share
        self.alarm_window, self.alarm_dead_steps = alarm_window, alarm_dead_steps
        self.idle = torch.zeros(n_layers, n_experts, dtype=torch.long)
        self.recent = deque(maxlen=alarm_window)        # (busiest share [L], busiest expert [L]) per step
        self.alarms = {}                                 # layer -> its alarm line
        self.last_load = torch.zeros(n_layers, n_experts, dtype=torch.long)
        self.dropped = torch.zeros(n_layers, dtype=torch.long)      # over the whole run, per layer

    @classmethod
    def for_run(cls, args, cfg):
        share = args.alarm_share or default_alarm_share(cfg.top_k, cfg.n_experts)
        return cls(cfg.n_layers, cfg.n_experts, args.batch_size * args.seq_len, args.dead_steps, share,
                   args.alarm_window, args.alarm_dead_steps)

    def update(self, step, load, router_entropy, state, full=False, dropped=None):
        """After optimizer step `step` (1-based): load [L, E] counts of the
        global batch, router_entropy [L] mean nats per token, state the
        strategy's {name: [L, ...]}. Returns (figures for the log line, new
        alarm lines). full: also the whole count vector (at evaluations).
        dropped [L]: the step's assignments dropped for capacity (None: none)."""
        load = load.detach().cpu().long()
        self.last_load = load
        self.idle = torch.where(load > 0, torch.zeros_like(self.idle), self.idle + 1)
        f = load.double()
        share = f.max(1).values / max(1, self.tokens)
        self.recent.append((share, f.argmax(1)))
        figures = {"tokens_min": load.min(1).values.tolist(), "tokens_max": load.max(1).values.tolist(),
                   "tokens_std": f.std(1, unbiased=False).tolist(), "busiest_share": share.tolist(),
                   "dead": (self.idle >= self.dead_steps).sum(1).tolist(),
                   "load_entropy": entropy(f / f.sum(1, keepdim=True).clamp(min=1)).tolist(),
                   "router_entropy": [float(x) for x in router_entropy.detach().cpu().tolist()]}
        dropped = torch.zeros(self.n_layers, dtype=torch.long) if dropped is None else dropped.detach().cpu().long()
        self.dropped += dropped
        figures["dropped"] = dropped.tolist()
        summary = state_summary(state)
        if summary:
            figures["state"] = summary
        if full:
            figures["load"] = load.tolist()
        new = [line for line in (self.check(layer, step) for layer in range(self.n_layers)) if line]
        if new:
            figures["alarms"] = new
        return figures, new

    def check(self, layer, step):
        """The alarm line for `layer` if it trips now for the first time."""
        if layer in self.alarms:
            return None
        line = self.share_alarm(layer, step) or self.dead_alarm(layer, step)
        if line:
            self.alarms[layer] = line
        return line

    def share_alarm(self, layer, step):
        """The busiest expert saw more than alarm_share of the layer's tokens
        on at least ALARM_FRACTION of the last alarm_window steps, and the
        newer half of the window is no better than the older half. The second
        clause is what tells a collapse that persists from one a strategy is
        correcting: lossfree starts collapsed and its bias pulls the share
        down step by step, so its window falls; a collapse left alone does not."""
        W = self.alarm_window
        if len(self.recent) < W:
            return None
        shares = torch.stack([s[layer] for s, _ in self.recent])
        over = int((shares > self.alarm_share).sum())
        if over < ALARM_FRACTION * W:
            return None
        half = W // 2
        if shares[-half:].mean() < shares[:W - half].mean():
            return None
        busiest = torch.stack([b[layer] for _, b in self.recent])
        counts = torch.bincount(busiest, minlength=self.n_experts)
        top = [e for e in counts.argsort(descending=True).tolist()[:4] if counts[e]]
        named = ", ".join(f"expert {e} ({counts[e]})" for e in top)
        return (f"collapse alarm at step {step}: in layer {layer} the busiest expert took more than "
                f"{self.alarm_share:.0%} of the tokens on {over} of the last {W} steps (mean {shares.mean():.0%}), "
                f"and it is not falling; the busiest (on how many of those steps): {named}")

    def dead_alarm(self, layer, step):
        """Some experts of the layer have had no token for alarm_dead_steps steps."""
        dead = (self.idle[layer] >= self.alarm_dead_steps).nonzero().flatten().tolist()
        if not dead:
            return None
        return (f"collapse alarm at step {step}: in layer {layer} {len(dead)} of {self.n_experts} experts have "
                f"had no token for {self.alarm_dead_steps} steps or more: experts {', '.join(map(str, dead))}")

    # -- in the checkpoint and summary.json --------------------------------------

    def state_dict(self):
        return {"idle": self.idle.tolist(), "alarms": {str(k): v for k, v in self.alarms.items()},
                "recent": [(s.tolist(), b.tolist()) for s, b in self.recent],
                "last_load": self.last_load.tolist(), "dropped": self.dropped.tolist()}

    def load_state_dict(self, d):
        """From a checkpoint's state_dict(); None (a checkpoint written before
        health existed) starts the counters afresh."""
        if not d:
            return
        self.idle = torch.tensor(d["idle"], dtype=torch.long)
        self.alarms = {int(k): v for k, v in d["alarms"].items()}
        self.recent.clear()
        for s, b in d["recent"]:
            self.recent.append((torch.tensor(s, dtype=torch.float64), torch.tensor(b, dtype=torch.long)))
        self.last_load = torch.tensor(d["last_load"], dtype=torch.long)
        if "dropped" in d:                              # absent from checkpoints written before capacity
            self.dropped = torch.tensor(d["dropped"], dtype=torch.long)

    def summary(self):
        """summary.json's part: the last step's per-expert counts per layer,
        the dead experts then, every alarm raised, and per layer the
        assignments dropped for capacity over the whole run."""
        return {"load_by_layer": self.last_load.tolist(),
                "dead_by_layer": (self.idle >= self.dead_steps).sum(1).tolist(),
                "alarms": list(self.alarms.values()),                      # in the order raised
                "dropped_by_layer": self.dropped.tolist()}


def health_line(h, n_experts):
    """The one line an evaluation prints about routing, from a log record's
    "health": the worst layer for each figure, so it stays short at any depth."""
    def worst(key, pick=max):
        values = h[key]
        layer = values.index(pick(values))
        return values[layer], layer
    dead, dl = worst("dead")
    share, sl = worst("busiest_share")
    parts = [f"dead experts {dead}/{n_experts} (worst layer {dl})",
             f"busiest expert {share:.0%} of tokens (layer {sl})",
             f"load entropy {min(h['load_entropy']):.2f}-{max(h['load_entropy']):.2f} of {math.log(n_experts):.2f}",
             f"router entropy {min(h['router_entropy']):.2f}-{max(h['router_entropy']):.2f} nats"]
    if any(h.get("dropped", ())):
        parts.append(f"dropped {max(h['dropped'])} assignments (worst layer {h['dropped'].index(max(h['dropped']))})")
    for name, s in h.get("state", {}).items():
        parts.append(f"{name} {min(s['min']):.3g}..{max(s['max']):.3g} (at its min {max(s['at_min'])}, "
                     f"at its max {max(s['at_max'])} experts)")
    return "routing: " + " | ".join(parts)
