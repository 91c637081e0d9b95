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
  commandline  stopping cleanly, user mistakes as one line, exit codes
  files        atomic writes and write failures as one line
  workers      N local processes joined by gloo (tests, bench)
  knobs        a strategy's knobs checked and turned into flags; the
               registry's checks
  kernels      the experts as grouped matmuls: the same numbers, faster
  mesh         which rank holds which experts: the (dp, ep) grid
  health       routing health per layer and step, and the collapse alarm
  board        --tensorboard: the same figures as TensorBoard event files

Every public name of these modules is reachable as `plumbing.NAME` (WHERE
below), so that `plumbing.Proc`, `plumbing.load_model` and so on need no
submodule. A test that replaces a
function replaces it in the module that calls it (plumbing.rundir.write_atomic).
"""

import importlib

# Which module holds each name: `plumbing.Proc` imports plumbing.process on first use.
# Lazily, so that a lesson file importing one small module (plumbing.kernels) does not
# pull in the rest, which imports the lesson files back.
WHERE = {
    **dict.fromkeys([
        'finite_json', 'first_line', 'disk_is_full', 'write_atomic', 'cannot_write',
        'share_failure'], "files"),
    **dict.fromkeys([
        'Proc', 'ThisProcessError', 'visible_devices', 'local_gpu'], "process"),
    **dict.fromkeys([
        'STAGE', 'SWAP', 'MOVES', 'LATEST', 'RUN_FILES', 'new_run_id', 'RunDir',
        'default_run_folder', 'point_latest', 'open_run_dir'], "rundir"),
    **dict.fromkeys([
        'step_folder', 'shard_root', 'as_global', 'as_local', 'checkpoint_state',
        'is_finite_state', 'save_checkpoint', 'new_folder', 'remove_folders_but',
        'first_failure', 'write_shards', 'shard_files', 'file_sha256', 'hash_files',
        'verify_shards', 'checksum', 'write_checkpoint', 'verify_checkpoint', 'param_names',
        'CHECKPOINT_KEYS', 'open_checkpoint', 'read_checkpoint', 'read_metadata', 'check_fits',
        'optimizer_targets', 'read_shards', 'load_checkpoint', 'checkpoint_tensors',
        'load_model'], "checkpoints"),
    **dict.fromkeys([
        'Interrupted', 'StopFlag', 'interrupted_line', 'OneLineParser', 'preset_help',
        'check_memory', 'OUT_OF_MEMORY', 'lost_peer', 'lost_peer_line', 'prints_errors', 'cli',
        'leave'], "commandline"),
    **dict.fromkeys([
        'free_port', 'spawn'], "workers"),
    **dict.fromkeys([
        'AT_LEAST', 'ABOVE', 'AT_MOST', 'parse_args', 'given_knobs', 'model_config',
        'strategy_settings', 'TRAINING_FLAGS', 'trajectory', 'same_everywhere',
        'check_resumable', 'check_args', 'expert_parallel_size'], "flags"),
    **dict.fromkeys([
        'Session', 'evaluation_line', 'against_unigram', 'summarize'], "session"),
    **dict.fromkeys([
        'check_settings', 'check_knob', 'knob_range', 'all_knobs', 'knob_flag',
        'import_strategies', 'check_registration', 'name_of', 'check_strategy', 'check_config'], "knobs"),
    **dict.fromkeys([
        'DataError', 'human', 'MIN_CHUNK', 'MAX_CHUNK', 'chunk_text', 'file_as_documents',
        'visible', 'shown', 'memory_bytes', 'files_under', 'read_files', 'user_documents',
        'CACHE_FORMAT', 'default_cache_dir', 'write_cache', 'read_cache'], "userdata"),
    **dict.fromkeys([
        'grouped_swiglu', 'grouped_mm_fast_on_cuda', 'grouped_experts_bf16',
        'grouped_mm_on_cpu', 'ELEMENTS_PER_THREAD', 'grouped_is_faster_on_cpu',
        'grouped_experts_cpu', 'pad_blocks'], "kernels"),
    **dict.fromkeys([
        'MeshLayout', 'Mesh'], "mesh"),
    **dict.fromkeys([
        'DEAD_STEPS', 'ALARM_WINDOW', 'ALARM_DEAD_STEPS', 'ALARM_FRACTION', 'add_health_flags',
        'check_health_flags', 'default_alarm_share', 'state_summary', 'entropy', 'Health',
        'health_line'], "health"),
    **dict.fromkeys([
        'TENSORBOARD_MISSING', 'TRAIN_KEYS', 'check_tensorboard', 'board_dir', 'Board'], "board"),
}


def __getattr__(name):
    if name in WHERE.values():                       # a module itself: plumbing.rundir
        return importlib.import_module(f".{name}", __name__)
    if name not in WHERE:
        raise AttributeError(f"module 'plumbing' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{WHERE[name]}", __name__), name)
