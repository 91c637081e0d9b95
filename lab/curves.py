"""
lab/curves.py -- a run's log.jsonl drawn, for whoever does not run
TensorBoard: one PNG, a few panels, every run given in its own colour and
labelled by its folder.

    python -m lab.curves runs/lossfree --out lossfree            # -> lossfree.png
    python -m lab.curves runs/lossfree runs/aux runs/none --out three

The panels, against the optimizer step:

  MaxVio_batch      the run's (bold) and each layer's (thin, dashed)
  busiest share     the busiest expert's share of the step's tokens, worst
                    layer ("health" in each log line, plumbing/health.py)
  dead experts      experts with no token for --dead-steps steps, all layers
  train loss        the LM loss of each step
  balance loss      what the strategy added (0 for lossfree and none)
  strategy state    every value of each floating-point state the strategy
                    logs, e.g. lossfree's bias, one thin line per expert and
                    layer (the sign rule's staircase is visible step by step)

It reads only log.jsonl, so it draws a run that is still going, or one made
by an older version of train.py (a figure it lacks leaves its panel empty).
"""

import argparse
from pathlib import Path

import plumbing
from lab.compare import load_log, pyplot, save


def read_runs(run_dirs):
    """{label: log records} for each folder; a folder without a log.jsonl
    stops everything with one line, before anything is drawn."""
    runs = {}
    names = [Path(d).name or str(d) for d in run_dirs]
    for folder, name in zip(map(Path, run_dirs), names):
        if not (folder / "log.jsonl").is_file():
            what = "no such folder" if not folder.is_dir() else "no log.jsonl in it"
            raise ValueError(f"{folder}: {what} (give the --out folder of a train.py run)")
        # Two runs in folders of the same name (a/seed0, b/seed0): the path
        # tells them apart, the name alone would not.
        label = name if names.count(name) == 1 else str(folder)
        runs[label] = [r for r in load_log(folder) if "step" in r]
    return runs


def series(records, get):
    """(steps, values) of the records where get(record) has a value."""
    steps, values = [], []
    for r in records:
        try:
            v = get(r)
        except (KeyError, TypeError, IndexError, ValueError):
            continue
        if v is not None:
            steps.append(r["step"])
            values.append(v)
    return steps, values


def state_series(records):
    """{(state name, layer, expert): (steps, values)} for every floating-point
    state logged under "state" as [layers][experts] (lossfree's bias)."""
    out = {}
    for r in records:
        for name, value in (r.get("state") or {}).items():
            if not (isinstance(value, list) and value and isinstance(value[0], list)):
                continue                              # a scalar counter (steps_done), not per expert
            for layer, row in enumerate(value):
                for expert, v in enumerate(row):
                    if isinstance(v, float):
                        steps, values = out.setdefault((name, layer, expert), ([], []))
                        steps.append(r["step"])
                        values.append(v)
    return out


def draw(runs, out):
    """The panels for {label: records}, saved as `out` (a .png path)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    (vio, share, dead), (loss, balance, state) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    state_names = set()
    for i, (label, records) in enumerate(runs.items()):
        c = colours[i % len(colours)]
        vio.plot(*series(records, lambda r: r["maxvio_batch"]), color=c, lw=2, label=label)
        layers = max((len(r.get("maxvio_batch_by_layer") or ()) for r in records), default=0)
        for layer in range(layers):
            vio.plot(*series(records, lambda r: r["maxvio_batch_by_layer"][layer]), color=c, lw=0.8, ls="--",
                     alpha=0.6)
        share.plot(*series(records, lambda r: max(r["health"]["busiest_share"])), color=c, label=label)
        dead.plot(*series(records, lambda r: sum(r["health"]["dead"])), color=c, label=label)
        loss.plot(*series(records, lambda r: r["loss"]), color=c, label=label)
        balance.plot(*series(records, lambda r: r["balance_loss"]), color=c, label=label)
        for n, ((name, _, _), (steps, values)) in enumerate(state_series(records).items()):
            state_names.add(name)
            state.plot(steps, values, color=c, lw=0.7, alpha=0.6, label=label if n == 0 else None)
    vio.set(title="MaxVio_batch (bold: the run; dashed: each layer)", xlabel="step", ylabel="MaxVio_batch")
    share.set(title="busiest expert's share of the tokens (worst layer)", xlabel="step", ylabel="share")
    dead.set(title="dead experts, all layers (no token for --dead-steps)", xlabel="step", ylabel="experts")
    loss.set(title="train loss", xlabel="step", ylabel="LM loss (nats/byte)")
    balance.set(title="balance loss (the strategy's, summed over layers)", xlabel="step", ylabel="loss")
    if state_names:
        state.set(title=f"strategy state: {', '.join(sorted(state_names))} (each expert, each layer)",
                  xlabel="step", ylabel="value")
    else:
        state.set(title="strategy state", xlabel="step")
        state.text(0.5, 0.5, "no per-expert state logged\n(none, aux, ...)", ha="center", va="center",
                   transform=state.transAxes, color="grey")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return Path(out.parent) / save(fig, out.parent, out.name)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw train.py runs' log.jsonl (MaxVio, health, loss, strategy "
                                            "state) into one PNG, without TensorBoard (docs/health.md).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a train.py --out folder (one or more)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="where to write: PREFIX.png")
    args = p.parse_args(argv)
    out = Path(args.out)
    out = out if out.suffix == ".png" else out.with_name(out.name + ".png")
    runs = read_runs(args.runs)
    if not out.parent.is_dir():
        raise ValueError(f"--out {args.out}: the folder {out.parent} does not exist")
    print(draw(runs, out))
    return 0


if __name__ == "__main__":
    plumbing.cli(main)      # a folder without log.jsonl: one line on stderr, exit code 2
