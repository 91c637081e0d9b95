"""
plumbing/session.py -- the run around train.py's loop: resume from the
checkpoint (refusing one made under other flags), the log and the progress
bar, checkpoints, Ctrl-C, and the summary and last lines at the end.
"""

import contextlib
import time
from dataclasses import asdict

from tqdm import tqdm

import balancers

from . import checkpoints
from .board import Board, board_dir
from .commandline import StopFlag
from .flags import check_resumable, trajectory
from .health import Health, health_line
from .rundir import new_run_id

class Session:
    """What a run does around the lesson's loop: resume from the checkpoint
    (refusing one made under other flags), the log and the progress bar,
    checkpoints, Ctrl-C, and the summary at the end.

    After construction `step` is the first step to train and `finished` says
    whether a resumed run had nothing left to do."""

    def __init__(self, args, proc, run, corpus, model, opt, unigram):
        self.args, self.proc, self.run, self.corpus, self.model, self.opt = args, proc, run, corpus, model, opt
        self.unigram = unigram          # the unigram baseline's val loss (train.unigram_loss)
        self.cfg = model.cfg
        self.step, self.wall, self.finished = 0, 0.0, False
        self.meta = {"config": asdict(self.cfg), "args": vars(args), "run_id": new_run_id(),
                     "trajectory": trajectory(args, corpus)}
        self.health, self.board = Health.for_run(args, self.cfg), None
        if run.resume and self.resume():
            self.finished = True
            return
        self.history = run.open_log(self.step, self.meta["run_id"])
        proc.log(f"{args.balancer} | {proc.world_size} process(es) on {proc.device} | {self.cfg.n_layers} layers, "
                 f"{self.cfg.n_experts} experts top-{self.cfg.top_k}, {model.active_params() / 1e6:.2f}M active "
                 f"params | unigram baseline val loss {unigram:.3f}"
                 + (f" | resuming at step {self.step}" if self.step else ""))
        self.stop = StopFlag(run.out)
        self.bar = tqdm(total=args.steps, initial=self.step, desc=args.balancer, dynamic_ncols=True,
                        disable=not proc.main)
        self.t_start = time.time()
        if args.tensorboard is not None and proc.main:
            self.board = Board(board_dir(args, run.out), self.step + 1)

    def resume(self):
        """Load the checkpoint into the model and optimizer; True if the run
        had finished already (its summary written), so nothing is to be done."""
        args, run, proc = self.args, self.run, self.proc
        ckpt = checkpoints.read_checkpoint(run.ckpt)
        check_resumable(ckpt, self.cfg, self.meta["trajectory"], run.ckpt)
        if ckpt["step"] > args.steps:
            raise ValueError(f"--resume: {run.ckpt} is at step {ckpt['step']}, past --steps {args.steps}: "
                             f"give --steps {ckpt['step']} or more")
        if args.stop_at != -1 and args.stop_at <= ckpt["step"]:
            raise ValueError(f"--stop-at {args.stop_at}: {run.ckpt} is at step {ckpt['step']} already; "
                             f"give a later step")
        self.meta["run_id"] = ckpt["run_id"]
        # Finished means this run's summary was written too: a run that died
        # between its final checkpoint and summary.json (a full disk) gets it
        # now, from that checkpoint, without training. Rank 0 alone reads
        # summary.json, so it decides for all.
        done = proc.main and ckpt["step"] == args.steps and run.summary_run_id() == ckpt["run_id"]
        if proc.any_rank(done):
            proc.log(f"{args.out} finished all {ckpt['step']} steps already (see {run.summary}); nothing "
                     f"changed. To train further, raise --steps")
            return True
        checkpoints.load_checkpoint(ckpt, self.model, self.opt, proc)
        self.health.load_state_dict(ckpt.get("health"))
        self.step, self.wall = ckpt["step"], ckpt.get("wall_time_s", 0.0)
        return False

    @contextlib.contextmanager
    def timed(self, step):
        """Time one training step; a NaN gradient stops the run in one line
        that says what was kept."""
        self.t0 = time.time()
        try:
            yield
        except FloatingPointError as e:
            run = self.run
            kept = f"{run.ckpt} keeps the last good state" if run.target("ckpt.pt").exists() else \
                "no checkpoint was written" + (f"; the run that was in {self.args.out} is untouched" if run.stage else "")
            raise FloatingPointError(f"{e}; {kept}. Try a lower --lr") from None

    def record(self, step, rec):
        """After optimizer step `step`: the log line, the bar, a checkpoint when
        due. Returns True when the run must stop here (Ctrl-C or --stop-at)."""
        args, proc = self.args, self.proc
        self.step = step
        rec["tokens_per_s"] = args.batch_size * args.seq_len / (time.time() - self.t0)
        state = self.model.strategy_state()
        if state:
            rec["state"] = {k: v.tolist() for k, v in state.items()}   # e.g. lossfree's bias trajectories
        evaluated = "val_loss" in rec
        load = rec.pop("load")
        rec["health"], alarms = self.health.update(step, load, rec.pop("router_entropy"), state, full=evaluated,
                                                   dropped=rec.pop("dropped", None))
        for line in alarms if proc.main else ():
            self.bar.write(line)
        rec.pop("expert_freq", None)                                   # in summary.json, not in every line
        final = step == args.steps
        if evaluated and proc.main and not final:                     # the final figures get their own lines
            self.bar.write(evaluation_line(step, rec))
        # A step that raised an alarm is always logged: the alarm is in its line.
        if final or step % args.log_every == 0 or evaluated or alarms:
            rec = {"step": step, **rec}
            self.history.append(rec)
            self.run.append(rec)
            if self.board:
                self.board.write(step, rec, load, state)
        self.bar.update(1)
        self.bar.set_postfix_str(f"train loss {rec['loss']:.3f} | MaxVio_batch {rec['maxvio_batch']:.2f}")
        self.run.raise_if_failed()
        self.halt = proc.any_rank(self.stop.raised)
        stopping = self.halt or step == args.stop_at
        if final or stopping or step % args.ckpt_every == 0 or evaluated:
            self.save()
        return stopping

    def save(self):
        checkpoints.save_checkpoint(self.run.target("ckpt.pt"), self.model, self.opt, self.step,
                                 dict(self.meta, wall_time_s=self.wall_time(), health=self.health.state_dict()),
                                 self.proc)
        if self.board:
            self.board.flush()
        self.run.commit()                              # a new run replaces an old one at its first checkpoint

    def wall_time(self):
        return self.wall + time.time() - self.t_start

    def close(self):
        if hasattr(self, "bar"):
            self.bar.close()
            self.stop.restore()
        if self.board:
            self.board.close()
            self.board = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # The bar closed and the signal handlers back before any error's one
        # line is printed.
        self.close()

    def stopped(self):
        self.close()
        self.proc.log(f"stopped at step {self.step}; {self.run.ckpt} saved. Continue with the same flags plus --resume")
        return 1 if self.halt else 0

    def finish(self, ev):
        """summary.json and the run's last lines."""
        args, proc = self.args, self.proc
        self.close()
        summary = {"run": self.meta["run_id"],
                   **summarize(args, self.cfg, self.model, self.corpus, self.unigram, self.history, ev, proc, self.wall_time()),
                   **self.health.summary()}
        self.run.write_summary(summary)
        proc.log(f"val loss {summary['val_loss']:.4f} (unigram {summary['unigram_loss']:.4f}) | "
                 f"ppl {summary['val_ppl']:.3f} | MaxVio_global {summary['maxvio_global']:.3f} | "
                 f"specialisation {summary['specialization']:.3f} | causal leak {summary['causal_leak']:.2e}")
        if self.history and "health" in self.history[-1]:
            proc.log(health_line(self.history[-1]["health"], self.cfg.n_experts))
        proc.log(against_unigram(summary["val_loss"], summary["unigram_loss"], args.steps))
        proc.log(f"results in {args.out}/: summary.json, log.jsonl, the checkpoint ckpt.pt + ckpt/ "
                 f"(raise --steps and add --resume to go on)")
        return 0


def evaluation_line(step, ev):
    """What an evaluation during training prints above the progress bar: the
    figures, then a line on the routing's health (plumbing/health.py)."""
    line = (f"step {step}: val loss {ev['val_loss']:.4f} | MaxVio_global {ev['maxvio_global']:.3f} | "
            f"specialisation {ev['specialization']:.3f}")
    if "load" in ev.get("health", {}):
        line += "\n" + health_line(ev["health"], len(ev["health"]["load"][0]))
    return line


def against_unigram(val_loss, unigram, steps):
    """The final verdict in words: has the model learned more than byte
    frequencies? A model that has not is not broken when it is tiny or
    short-trained: it first learns the unigram, then context."""
    if val_loss < unigram:
        return (f"the model beats the unigram baseline by {unigram - val_loss:.3f} nats per byte: "
                f"it uses context, not just byte frequencies")
    return (f"the model is still {val_loss - unigram:.3f} nats per byte worse than the unigram baseline "
            f"(guessing from byte frequencies alone): expected for a tiny model or a short run "
            f"({steps} steps); train longer or use the default preset")


def summarize(args, cfg, model, corpus, unigram, history, ev, proc, wall_time):
    """summary.json: the run's final figures in one flat record."""
    tail = history[-max(1, len(history) // 10):]
    mean = lambda key, rows: sum(r[key] for r in rows) / max(1, len(rows))
    return {"balancer": args.balancer, "steps": args.steps, "world_size": proc.world_size, "seed": args.seed,
            "config": asdict(cfg), "strategy": dict(cfg.balance),
            "args": vars(args), "domains": corpus.domains, "domain_block": args.domain_block,
            "unigram_loss": unigram, **ev,
            "maxvio_batch": mean("maxvio_batch", history),            # averaged over training
            "maxvio_batch_final": mean("maxvio_batch", tail),         # the last 10% of logged steps
            "tokens_per_second": mean("tokens_per_s", history), "wall_time_s": wall_time,
            "state": {k: v.tolist() for k, v in model.strategy_state().items()}}
