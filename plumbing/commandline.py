"""
plumbing/commandline.py -- stopping cleanly (SIGTERM or Ctrl-C: finish the step,
save, exit, every rank at the same step) and the command line: user mistakes
as one line and exit code 2, --help's defaults, the memory check, and
processes that used torch.distributed leaving without the teardown.
"""

import argparse
import os
import signal
import sys

import torch
import torch.distributed as dist

from .files import first_line
from .process import ThisProcessError


class Interrupted(KeyboardInterrupt):
    """Ctrl-C a second time: the run leaves at once, without a checkpoint.
    A KeyboardInterrupt still, so that nothing on the way swallows it
    (write_atomic removes its temporary file, RunDir.close a new run that
    never reached its first checkpoint) and lab/compare.py stops its plan; cli
    reports it as one line."""


class StopFlag:
    """SIGTERM (a scheduler, torchrun being stopped) or Ctrl-C sets a flag;
    the loop finishes the step, saves a checkpoint and exits, every rank at
    the same step (Proc.agree). A second Ctrl-C leaves at once, wherever the
    process is (an evaluation, a save), as one line. `out`, if given, is
    named in that line."""

    def __init__(self, out=None):
        self.raised, self.out = False, out
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, signum, frame):
        if self.raised and signum == signal.SIGINT:
            raise Interrupted(interrupted_line(self.out, again=True))
        self.raised = True

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def interrupted_line(out=None, again=False):
    """What a run stopped by Ctrl-C without saving says. Every file is
    replaced atomically and a checkpoint's index only ever names a whole
    folder, so the last checkpoint there was is still there."""
    where = f" in {out}" if out else ""
    return (f"interrupted{' again' if again else ''}: stopped at once, without a checkpoint; the last checkpoint"
            f"{where} (if any) is kept: continue with the same flags plus --resume")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (not the whole usage) and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def preset_help(presets, key):
    """A preset-controlled flag's defaults, for --help: "tiny 2; default 4"."""
    return "; ".join(f"{name} {p[key]}" for name, p in presets.items())


def check_memory(cfg, local_seqs, world_size, device=None):
    """Refuse, with the flag to lower, a run that cannot fit: building it
    would otherwise thrash or be killed minutes later. A rough count in
    bytes: fp32 weights, gradients and two AdamW moments for this rank's
    share, and ~40 activations of width d_model (plus the logits) per token
    and layer kept for the backward pass."""
    E_local = cfg.n_experts // world_size
    params = cfg.n_layers * (4 * cfg.d_model ** 2 + (E_local + cfg.shared_experts) * 3 * cfg.d_model * cfg.d_expert) \
        + 2 * cfg.vocab_size * cfg.d_model
    tokens = local_seqs * cfg.seq_len
    need = 16 * params + 4 * tokens * (cfg.n_layers * (40 * cfg.d_model + 6 * cfg.top_k * cfg.d_expert)
                                       + 3 * cfg.vocab_size)
    if device is not None and device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, "the GPU"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine"
    if need > 0.8 * have:
        biggest = "--n-experts or --d-expert" if 16 * params > need / 2 else \
            "--batch-size (or raise --grad-accum) or --seq-len"
        raise ValueError(f"this run needs about {need / 2**30:.0f} GiB of memory, {where} has "
                         f"{have / 2**30:.0f} GiB: lower {biggest}")


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


def lost_peer(e):
    """Is this the error of a collective whose peer is gone (killed, crashed,
    its machine lost)? gloo and NCCL raise a plain RuntimeError for it."""
    text = str(e)
    return dist.is_initialized() and (isinstance(e, dist.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Socket Timeout")))


def lost_peer_line(e):
    """The survivor's one line: who was lost, and how to go on."""
    rank, world = dist.get_rank(), dist.get_world_size()
    who = f"rank {1 - rank}" if world == 2 else "another rank"
    return (f"rank {rank} of {world} lost contact with {who}, which stopped or was killed ({first_line(e)[:120]}); "
            f"the last checkpoint is kept: run the same command again with --resume (under torchrun, "
            f"--max-restarts N with --resume auto does that by itself)")


def prints_errors():
    """Does this process print the run's error line? Each machine's first
    process (LOCAL_RANK 0) does; so does any process whose environment is
    not a valid rank's, since that mistake is its own."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        return True
    return local == 0 or not 0 <= rank < world


def cli(entry):
    """Run entry() as a program. User mistakes (ValueError) become one line on
    stderr and exit code 2; a run that diverged (FloatingPointError) one line
    and exit 1; running out of memory one line naming what to lower; a peer
    process that died one line from each survivor, exit 1; Ctrl-C that
    stopped the run without a checkpoint (a second one, or one before the
    loop listens) one line, exit 130 (128 + SIGINT, as a shell reports it)."""
    code = 0
    try:
        code = entry()
        if dist.is_initialized():
            dist.barrier()          # tear down together, once every rank is done
    except KeyboardInterrupt as e:
        # Python's own KeyboardInterrupt carries no message: a Ctrl-C outside
        # StopFlag's watch (loading the data, the final evaluation).
        if prints_errors():
            print(f"error: {e if isinstance(e, Interrupted) else interrupted_line()}", file=sys.stderr, flush=True)
        code = 130
    except (ValueError, FloatingPointError, MemoryError, RuntimeError) as e:
        out_of_memory = any(s in str(e).lower() for s in OUT_OF_MEMORY)
        if isinstance(e, RuntimeError) and not out_of_memory and lost_peer(e):
            print(f"error: {lost_peer_line(e)}", file=sys.stderr, flush=True)
            code = 1
        else:
            if isinstance(e, RuntimeError) and not out_of_memory:
                raise
            if isinstance(e, (MemoryError, RuntimeError)):
                e = ValueError("out of memory: lower --batch-size (or raise --grad-accum), --n-experts, "
                               "--d-model or --d-expert")
            # Every rank sees the same flags and fails the same way: one line
            # per machine is enough (its first process prints it; on several
            # nodes each node's user sees it in their own log). A mistake in
            # one process's own environment only that process can report.
            if prints_errors() or isinstance(e, ThisProcessError):
                print(f"error: {e}", file=sys.stderr, flush=True)
            code = 2 if isinstance(e, ValueError) else 1
    finally:
        distributed = dist.is_initialized()
        if distributed:
            try:
                dist.destroy_process_group()
            except RuntimeError:            # a dead peer's group cannot always be torn down
                pass
    if distributed:
        leave(code)
    sys.exit(code)


def leave(code):
    """End a process that used torch.distributed, skipping the interpreter's
    teardown. Now and then (a few runs in a hundred here) a gloo process
    aborts in a C++ destructor after all Python code has run ("terminate
    called without an active exception"), which would turn a finished run
    into a failure. Everything this project writes is closed or flushed by
    then, so there is nothing left for the teardown to do."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
