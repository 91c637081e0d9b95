"""
plumbing -- what a training run needs that is not the lesson.

train.py reads like the papers: presets, build, train_step, the
measurements, the loop. Everything a real run also needs so that it never
loses work lives here, one module per concern, in the order a run meets it:

  flags        train.py's command line: every flag, its range and its check
  process      who this process is (rank, world size, device, its place in
               the (dp, ep) mesh), from torchrun's environment or alone
  userdata     the user's own text folder (--data) and the corpus cache
  rundir       the output folder: a lock, the log, summary.json, a run id in
               all three, and a new run that replaces an old one only at
               its first checkpoint
  checkpoints  torch.distributed.checkpoint's per-rank shards, resharded to
               any mesh on resume, checksummed, kill-safe
  session      the run around train.py's loop: resume, log lines, the
               progress bar, checkpoints, Ctrl-C, the summary
  cli          stopping cleanly, user mistakes as one line, exit codes
  files        atomic writes and write failures as one line
  spawn        N local processes joined by gloo (tests, bench)

The names other files use are gathered here, so that `plumbing.Proc`,
`plumbing.load_model` and so on need no submodule. A test that replaces a
function replaces it in the module that calls it (plumbing.rundir.write_atomic).
"""

from .files import (  # noqa: F401
    finite_json, first_line, disk_is_full, write_atomic, cannot_write, share_failure)
from .process import (  # noqa: F401
    Proc, ThisProcessError, visible_devices, local_gpu)
from .rundir import (  # noqa: F401
    STAGE, SWAP, MOVES, RUN_FILES, new_run_id, RunDir, open_run_dir)
from .checkpoints import (  # noqa: F401
    step_folder, shard_root, as_global, as_local, checkpoint_state, is_finite_state,
    save_checkpoint, new_folder, remove_folders_but, first_failure, write_shards, shard_files,
    file_sha256, hash_files, verify_shards, checksum, write_checkpoint, verify_checkpoint,
    param_names, CHECKPOINT_KEYS, open_checkpoint, read_checkpoint, read_metadata, check_fits,
    optimizer_targets, read_shards, load_checkpoint, checkpoint_tensors, load_model)
from .cli import (  # noqa: F401
    Interrupted, StopFlag, interrupted_line, OneLineParser, preset_help, check_memory,
    OUT_OF_MEMORY, lost_peer, lost_peer_line, prints_errors, cli, leave)
from .spawn import (  # noqa: F401
    free_port, spawn)
from .flags import (  # noqa: F401
    AT_LEAST, ABOVE, AT_MOST, parse_args, given_knobs, model_config, strategy_settings, TRAJECTORY,
    trajectory, same_everywhere, check_resumable, check_args, expert_parallel_size)
from .session import (  # noqa: F401
    Session, evaluation_line, against_unigram, summarize)
