"""
plumbing/board.py -- --tensorboard: the log's figures as TensorBoard event
files, written by rank 0 beside log.jsonl (which stays the source of truth).

Tags (docs/health.md lists them with what each means):
  train/loss, train/balance_loss, train/grad_norm, train/lr, train/maxvio_batch,
  train/tokens_per_s, train/maxvio_batch/layerL
  eval/val_loss, eval/val_ppl, eval/maxvio_global, eval/specialization,
  eval/causal_leak, ..., eval/val_loss_by_domain/DOMAIN, eval/maxvio_global/layerL,
  eval/maxvio_computation_batch/seqsS
  health/FIGURE/layerL     tokens_min, tokens_max, tokens_std, busiest_share,
                           dead, load_entropy, router_entropy, dropped
  health/STATE_STAT/layerL the strategy's state summary (bias_min, bias_at_max, ...)
  histograms: load/layerL (tokens per expert), state/NAME/layerL (e.g. the bias)

The tensorboard package is optional: without it --tensorboard is refused in
one line before anything starts.
"""

from pathlib import Path

TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package, which is not installed: pip install tensorboard"

# The training step's own figures; every other number in a record is an evaluation's.
TRAIN_KEYS = ("loss", "balance_loss", "grad_norm", "lr", "maxvio_batch", "tokens_per_s")


def check_tensorboard():
    """Raise the one-line ValueError if the package cannot be imported.
    tensorboard itself first: torch.utils.tensorboard may be imported already
    and would hide that the package behind it is gone."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError(TENSORBOARD_MISSING) from None


def board_dir(args, out):
    """--tensorboard DIR, or OUT/tensorboard for a bare --tensorboard."""
    return Path(out) / "tensorboard" if args.tensorboard is True else Path(args.tensorboard)


class Board:
    """One SummaryWriter for the run. purge_step: on a resume (or a new run
    in a folder that held one) TensorBoard drops the events of steps from
    here on that an earlier writer left, so a redone step is drawn once."""

    def __init__(self, folder, first_step):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.folder = Path(folder)
        self.writer = SummaryWriter(str(self.folder), purge_step=first_step, flush_secs=30)

    def write(self, step, rec, load=None, state=None):
        """One logged record: its scalars, the health figures, and histograms
        of the step's tokens per expert and of the strategy's state."""
        add = self.writer.add_scalar
        for key, value in rec.items():
            if isinstance(value, bool) or key == "step":
                continue
            group = "train" if key.removesuffix("_by_layer") in TRAIN_KEYS else "eval"
            if isinstance(value, (int, float)):
                add(f"{group}/{key}", value, step)
            elif key.endswith("_by_layer") and isinstance(value, list):
                for layer, v in enumerate(value):
                    add(f"{group}/{key[:-len('_by_layer')]}/layer{layer}", v, step)
            elif key.endswith("_by_domain") and isinstance(value, dict):
                for domain, v in value.items():
                    add(f"{group}/{key}/{domain}", v, step)
            elif key == "maxvio_computation_batch":
                for size, v in zip(value["sizes"], value["maxvio"]):
                    add(f"eval/{key}/seqs{size}", v, step)
        health = rec.get("health", {})
        for figure, values in health.items():
            if figure in ("state", "load", "alarms"):
                continue
            for layer, v in enumerate(values):
                add(f"health/{figure}/layer{layer}", v, step)
        for name, stats in health.get("state", {}).items():
            for stat, values in stats.items():
                for layer, v in enumerate(values):
                    add(f"health/{name}_{stat}/layer{layer}", v, step)
        if load is not None:
            for layer, row in enumerate(load.detach().cpu().double()):
                self.writer.add_histogram(f"load/layer{layer}", row, step)
        for name, t in (state or {}).items():
            if t.is_floating_point() and t.dim() >= 2:
                for layer, row in enumerate(t.detach().cpu().float()):
                    self.writer.add_histogram(f"state/{name}/layer{layer}", row.flatten(), step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()
