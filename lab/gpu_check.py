"""
lab/gpu_check.py -- the project's GPU path, checked in one command, run from
the repository root:

    python -m lab.gpu_check                       # on a CUDA machine: at most 8 minutes
    python -m lab.gpu_check --device cpu --quick  # the same steps at toy sizes, in seconds

Six steps, each in a fresh process with its own time budget. A step that runs
past its budget is stopped, recorded as "overran", and the next one starts; a
step that fails is recorded with its error and the next one starts too. So one
run of the command always ends with a report, whatever broke.

  cuda_tests     pytest tests/test_cuda.py (the bf16 grouped experts, causality
                 and bf16-vs-fp32 training on the device), output captured
  matmul_peak    the throughput of a large square matmul, bf16 on a GPU (fp32
                 on a CPU): the peak that MFU is measured against
  moe_vs_dense   lab.bench.bench_layers: the MoE layer's forward+backward over a
                 dense SwiGLU of the same active width, for every strategy
  moe_vs_peers   lab.bench.bench_peers: other MoE layers (a textbook mask loop,
                 and Hugging Face's Qwen3-MoE block when transformers is
                 installed) over the project's, on the same weights, under
                 bf16 autocast (on the CPU too)
  train_default  train.py with the default preset, the whole run
  train_gpu      train.py --preset gpu, shortened: tokens/s, MFU and peak
                 memory after warm-up, and the full run's wall time extrapolated

It writes OUT/gpu.json (default results/) and regenerates the table part of
docs/gpu.md, which says what every figure means. With --quick the sizes are
toys, so the figures mean nothing: OUT defaults to runs/gpu_check_quick/, the
table goes to OUT/gpu.md, and results/ and docs/ are never written.
"""

import json
import math
import multiprocessing as mp
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import plumbing
import train
from lab import bench
from moe import GPT

ROOT = Path(__file__).resolve().parent.parent      # the repository root: docs/, results/, tests/
DOCS = ROOT / "docs" / "gpu.md"
TABLE_BEGIN = "<!-- the table below is written by lab/gpu_check.py: do not edit it by hand -->"
TABLE_END = "<!-- end of the lab/gpu_check.py table -->"
STARTED = time.time()        # the total budget counts from here (importing torch, before, takes seconds)


# ----------------------------------------------------------------------------
# 1. What to run, at full size and at toy size.

@dataclass
class Plan:
    budgets: dict            # step name -> seconds it may take, start of its process included
    total_budget: float      # seconds for the whole command
    matmul_size: int
    layer_preset: str        # the preset whose MoE layer and batch lab/bench.py measures
    warmup: int              # untimed repeats of a layer first
    repeats: int             # timed repeats of a layer (the large peer size gets an eighth)
    train_runs: dict         # step name -> (train.py flags, warm-up steps left out of the timing)
    threads: int = 0         # CPU threads of every step (0: torch's default)


FULL = Plan(
    # Sized for one H100/H200: each budget is several times what the step
    # should take there, and they add up to the total, 8 minutes.
    budgets=dict(cuda_tests=120, matmul_peak=30, moe_vs_dense=45, moe_vs_peers=75, train_default=120,
                 train_gpu=90),
    total_budget=480, matmul_size=8192, layer_preset="default", warmup=3, repeats=40,
    train_runs=dict(train_default=(["--preset", "default"], 20),
                    # 100 of the preset's 2000 steps, evaluated once at the end:
                    # 80 timed steps are plenty for a steady rate.
                    train_gpu=(["--preset", "gpu", "--steps", "100", "--eval-every", "0"], 20)))

# The gpu preset keeps its schedule but not its sizes: one of its steps alone
# would take a minute on a CPU.
TOY_MODEL = ["--n-layers", "2", "--d-model", "64", "--n-heads", "4", "--n-experts", "8", "--top-k", "2",
             "--d-expert", "64", "--shared-experts", "1", "--seq-len", "64", "--batch-size", "8"]
QUICK = Plan(
    budgets=dict(cuda_tests=60, matmul_peak=60, moe_vs_dense=60, moe_vs_peers=60, train_default=60,
                 train_gpu=60),
    total_budget=300, matmul_size=256, layer_preset="tiny", warmup=0, repeats=2,
    train_runs=dict(train_default=(["--preset", "tiny", "--steps", "10"], 3),
                    train_gpu=(["--preset", "gpu", *TOY_MODEL, "--steps", "5", "--eval-every", "0",
                                "--val-seqs", "8"], 2)),
    # One thread: on a shared CPU, two threads per process wait on each
    # other's cores and a toy step takes ten times as long.
    threads=1)


# ----------------------------------------------------------------------------
# 2. The steps. Each returns a dict of JSON-ready figures; all but the first
# run in a process of their own (section 3), and get `device` as a string.

def cuda_tests(plan, device, logs, budget):
    """pytest tests/test_cuda.py in a subprocess. On a CPU every test skips,
    which still proves the command and the file's collection. The whole
    output goes to the log; the JSON keeps the counts, and the tail if
    something failed (a tolerance miss prints by how much)."""
    log = Path(logs) / "cuda_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(plan.threads)} if plan.threads else {}))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as e:     # subprocess.run has killed pytest by now
        output = e.stdout or b""         # bytes, whatever text=True asked for
        log.write_text(output.decode(errors="replace") if isinstance(output, bytes) else output)
        raise TimeoutError(f"pytest still running after its {budget:.0f} s budget; see {log}") from None
    output = proc.stdout + proc.stderr
    log.write_text(output)
    lines = output.strip().splitlines()
    counts = {word: int(n) for n, word in
              re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", lines[-1] if lines else "")}
    result = {"command": "python " + shlex.join(cmd[1:]), "returncode": proc.returncode, "counts": counts,
              "summary": lines[-1] if lines else ""}
    if proc.returncode != 0:
        result["tail"] = lines[-60:]
        raise StepFailed(f"pytest exit code {proc.returncode}: {result['summary']}", result)
    return result


def matmul_peak(plan, device, logs):
    """Median and best throughput of bench.matmul_peak's square matmul."""
    dev = torch.device(device)
    mm, flops = bench.matmul_peak(plan.matmul_size, dev)
    times = bench.interleaved({"mm": mm}, max(3, plan.warmup), max(5, plan.repeats // 2), dev)["mm"]
    return {"size": plan.matmul_size, "dtype": "bf16" if dev.type == "cuda" else "fp32",
            "repeats": len(times), "flops_median": flops / statistics.median(times),
            "flops_best": flops / min(times)}


def moe_vs_dense(plan, device, logs):
    return {"preset": plan.layer_preset,
            "strategies": bench.bench_layers(plan.layer_preset, bench.STRATEGIES, plan.warmup, plan.repeats,
                                             torch.device(device))}


def moe_vs_peers(plan, device, logs):
    """As `python -m lab.bench --peers`: the large size is slow for the peers' loops, so
    it gets an eighth of the rounds, at least 3. Under bf16 autocast on a
    CPU too: the dry run then meets what bf16 does to the comparison (a
    peer whose router ran in bf16 picked other experts than the project's
    fp32 router) before a GPU does."""
    sizes = bench.peer_sizes(plan.layer_preset)
    repeats = {name: plan.repeats if name == plan.layer_preset else max(3, plan.repeats // 8) for name in sizes}
    results, skipped = bench.bench_peers(sizes, plan.warmup, repeats, torch.device(device), bf16=True)
    if skipped:
        print(skipped)
    return {"sizes": results, "skipped": skipped}


class Shapes:
    """What bench.flops_per_token reads of a model, its config and its count
    of active parameters (arithmetic on the config), without building the
    model: initialising the gpu preset's 217M weights takes seconds."""

    def __init__(self, cfg):
        self.cfg = cfg

    active_params = GPT.active_params


def train_argv(plan, device, logs, name):
    """train.py's flags for run `name`, logging every step, and its folder."""
    flags, _ = plan.train_runs[name]
    out = Path(logs) / name
    return [*flags, "--device", device, "--out", str(out), "--overwrite", "--log-every", "1"], out


def logged_steps(path):
    """The records of a train.py log; a run killed in the middle of writing
    one leaves a torn last line, which is dropped."""
    records = []
    for line in path.read_bytes().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def step_rate(plan, device, logs, name):
    """Tokens/s and FLOP/s of a run, from the steps its log.jsonl holds so
    far (also those of a run stopped for its budget). A logged step's time
    is train.train_step's alone; the first `warmup` steps (kernel selection,
    allocator growth) are left out."""
    argv, out = train_argv(plan, device, logs, name)
    args, warmup = train.parse_args(argv), plan.train_runs[name][1]
    tokens = args.batch_size * args.seq_len
    step_s = [tokens / r["tokens_per_s"] for r in logged_steps(out / "log.jsonl")]
    timed = step_s[warmup:]
    if not timed:
        raise ValueError(f"{name}: {len(step_s)} steps logged leave none to time after {warmup} warm-up steps")
    per_token = bench.flops_per_token(Shapes(plumbing.model_config(args)))
    rate = tokens * len(timed) / sum(timed)
    ms = sorted(1e3 * t for t in timed)
    return {"command": "python train.py " + shlex.join(argv), "preset": args.preset, "steps": len(step_s),
            "preset_steps": train.PRESETS[args.preset]["steps"], "warmup_steps_untimed": warmup,
            "timed_steps": len(timed), "tokens_per_step": tokens, "step_ms_median": statistics.median(ms),
            "step_ms_p10": ms[len(ms) // 10], "step_ms_p90": ms[(9 * len(ms)) // 10], "tokens_per_s": rate,
            "flops_per_token": per_token, "achieved_flops": rate * per_token,
            "steps_s": sum(step_s), "mean_timed_step_s": statistics.mean(timed)}


def train_run(plan, device, logs, name):
    """One train.py run, then its rate (step_rate), peak memory and final
    figures. The full preset's wall time: the run's own if it was the whole
    schedule, else extrapolated: the measured run, plus its missing steps at
    the mean timed step, plus one evaluation-and-checkpoint per further
    evaluation of the full schedule, at the cost of the one the short run
    made at its end (its wall time outside the steps)."""
    argv, out = train_argv(plan, device, logs, name)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    code = train.main(argv)
    if code != 0:
        raise RuntimeError(f"train.py {shlex.join(argv)} exited with code {code}")
    summary = json.loads((out / "summary.json").read_text())
    run = step_rate(plan, device, logs, name)
    schedule = train.PRESETS[run["preset"]]
    full_steps, every = schedule["steps"], schedule["eval_every"]
    evaluations = (full_steps // every + (full_steps % every > 0)) if every else 1
    once = summary["wall_time_s"] - run["steps_s"]
    complete = run["steps"] >= full_steps
    full_wall = summary["wall_time_s"] if complete else summary["wall_time_s"] + (evaluations - 1) * once \
        + (full_steps - run["steps"]) * run["mean_timed_step_s"]
    return {**run, "peak_memory_mb": bench.peak_memory_mb(torch.device(device)),
            "peak_memory_kind": "allocated on the GPU" if device == "cuda" else "resident set of the process",
            "wall_time_s": summary["wall_time_s"], "eval_and_checkpoint_s": once,
            "full_preset_wall_s": full_wall, "extrapolated": not complete,
            "val_loss": summary["val_loss"], "maxvio_global": summary["maxvio_global"]}


def train_default(plan, device, logs):
    return train_run(plan, device, logs, "train_default")


def train_gpu(plan, device, logs):
    return train_run(plan, device, logs, "train_gpu")


STEPS = [cuda_tests, matmul_peak, moe_vs_dense, moe_vs_peers, train_default, train_gpu]


class StepFailed(Exception):
    """A step that measured something and then failed: its figures are kept."""

    def __init__(self, message, figures):
        super().__init__(message)
        self.figures = figures


# ----------------------------------------------------------------------------
# 3. Running a step in a process of its own, within its budget.
#
# A fresh process per step gives each one its own CUDA context and its own
# peak memory, and a step that hangs (a kernel that never returns, a hung
# collective) can be killed without losing the others. The processes fork
# from a server that imported torch once ("forkserver"): a step starts in a
# fraction of a second instead of importing torch again, and the server never
# touches CUDA, so every fork may. The server imports what this module
# imports, not this module: under `python -m lab.gpu_check` each step's
# process runs it afresh as its __main__ (to find the step by name), and a
# copy already imported would make runpy warn in every step.

def context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "plumbing", "train", "lab.bench", "moe"])
    return ctx


def _child(fn, args, threads, log_path, result_path):
    """The step's process: stdout and stderr (Python's and C++'s) to the log,
    the figures or the error to result_path, written whole or not at all."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)   # in case they were not fds 1 and 2
    if threads:
        torch.set_num_threads(threads)
    try:
        record = {"figures": fn(*args)}
    except BaseException as e:
        traceback.print_exc()
        record = {"error": one_line(e), "figures": getattr(e, "figures", None)}
    tmp = result_path + ".tmp"
    Path(tmp).write_text(plumbing.finite_json(record))
    os.replace(tmp, result_path)


def one_line(e):
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def run_isolated(ctx, fn, args, budget, log_path, threads=0):
    """fn(*args) in a fresh process; returns (status, figures, error)."""
    log_path = Path(log_path)
    result_path = log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    p = ctx.Process(target=_child, args=(fn, args, threads, str(log_path), str(result_path)), daemon=True)
    p.start()
    p.join(budget)
    hung = p.is_alive()
    if hung:
        p.kill()              # this step's own process, by handle
        p.join(10)
    if not result_path.exists():
        if hung:
            return "overran", None, f"stopped after its {budget:.0f} s budget (see {log_path})"
        return "failed", None, f"its process died with exit code {p.exitcode} (see {log_path})"
    # A process that wrote its figures and then hung on the way out (a CUDA
    # or thread teardown) finished its step: keep the figures.
    record = json.loads(result_path.read_text())
    if "error" in record:
        return "failed", record["figures"], f"{record['error']} (see {log_path})"
    return "ok", record["figures"], None


def run_step(ctx, step, plan, device, logs, deadline):
    """One step within min(its budget, the time left): a dict of its status,
    seconds, budget and figures."""
    name = step.__name__
    budget = min(plan.budgets[name], deadline - time.time())
    if budget < 1:
        return {"status": "skipped", "seconds": 0.0, "budget_s": max(0.0, budget),
                "error": "no time left in the total budget"}
    t0 = time.time()
    if step is cuda_tests:        # pytest is a process of its own already
        try:
            status, figures, error = "ok", cuda_tests(plan, device, logs, budget), None
        except TimeoutError as e:
            status, figures, error = "overran", None, str(e)
        except StepFailed as e:
            status, figures, error = "failed", e.figures, str(e)
    else:
        status, figures, error = run_isolated(ctx, step, (plan, device, str(logs)), budget,
                                              Path(logs) / f"{name}.log", plan.threads)
    if status != "ok" and figures is None and name in plan.train_runs:
        # The log is written step by step: the rate is there even if the
        # run did not finish (no peak memory, no final figures).
        try:
            figures = {**step_rate(plan, device, logs, name), "partial": True}
        except ValueError:
            pass
    record = {"status": status, "seconds": time.time() - t0, "budget_s": budget}
    if error:
        record["error"] = error
    if figures is not None:
        record["figures"] = figures
    return record


# ----------------------------------------------------------------------------
# 4. The report: gpu.json's derived figures and the markdown table.

def device_info(device):
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "cpu": bench.machine_info(torch.device("cpu"), 0)["cpu"],
            "cores": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=props.total_memory / 2**30, gpus=torch.cuda.device_count())
    else:
        info["name"] = info["cpu"]
    return info


def figures(steps):
    """The table's figures, from the steps that got that far: MFU is each
    run's model FLOPs per second over the measured matmul peak."""
    get = lambda name: steps[name].get("figures") if steps[name]["status"] == "ok" else None
    peak = get("matmul_peak")
    out = {"matmul_peak_tflops": peak["flops_median"] / 1e12 if peak else None}
    layers = get("moe_vs_dense")
    out["moe_over_dense"] = {s: x["moe_over_dense"] for s, x in layers["strategies"].items()} if layers else None
    peers = get("moe_vs_peers")
    out["peer_over_project"] = {size: {name: p["peer_over_project"] for name, p in x["against"].items()}
                                for size, x in peers["sizes"].items()} if peers else None
    out["peers_skipped"] = peers["skipped"] if peers else None
    for name in ("train_default", "train_gpu"):
        run = steps[name].get("figures")     # a run stopped for its budget keeps its rate
        out[name] = None if run is None else {
            "tokens_per_s": run["tokens_per_s"], "step_ms_median": run["step_ms_median"],
            "mfu": run["achieved_flops"] / peak["flops_median"] if peak else None,
            **{key: run.get(key) for key in ("peak_memory_mb", "full_preset_wall_s", "extrapolated", "val_loss")}}
    return out


def fmt(x, spec, unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def minutes(seconds):
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def table(report):
    """The markdown of docs/gpu.md's table part."""
    d, f, steps = report["device"], report["figures"], report["steps"]
    where = f"{d['name']}, compute capability {d['capability']}, {d['memory_gib']:.0f} GiB" \
        if d["device"] == "cuda" else f"{d['name']} ({d['cores']} cores), no GPU"
    tests = steps["cuda_tests"]
    tests_text = tests.get("figures", {}).get("summary") or tests.get("error", tests["status"])
    peak = steps["matmul_peak"].get("figures")
    lines = [f"Measured {report['date']} with `{report['command']}`" + (" (toy sizes: these figures mean "
                                                                          "nothing)" if report["quick"] else ""),
             "", "| | |", "|---|---|",
             f"| device | {where} |",
             f"| torch, CUDA | {d['torch']}, {d['cuda'] or 'none'} |",
             f"| CUDA tests | {tests_text} |",
             f"| matmul peak | {fmt(f['matmul_peak_tflops'], '.1f', ' TFLOP/s')}"
             + (f" ({peak['dtype']}, {peak['size']}^2, median of {peak['repeats']})" if peak else "") + " |"]
    if f["moe_over_dense"]:
        lines.append(f"| MoE/dense layer time, {steps['moe_vs_dense']['figures']['preset']} preset | "
                     + ", ".join(f"{s} {v:.2f}" for s, v in f["moe_over_dense"].items()) + " |")
    else:
        lines.append(f"| MoE/dense layer time | {steps['moe_vs_dense'].get('error', 'n/a')} |")
    if f["peer_over_project"]:
        for size, peers in f["peer_over_project"].items():
            lines.append(f"| peer/project layer time, {size} size | "
                         + ", ".join(f"{name} {v:.2f}" for name, v in peers.items()) + " |")
        if f["peers_skipped"]:
            lines.append(f"| Hugging Face peers | {f['peers_skipped']} |")
    else:
        lines.append(f"| peer/project layer time | {steps['moe_vs_peers'].get('error', 'n/a')} |")
    lines += ["", "| run | steps (timed) | tokens/s | step ms | MFU | peak memory | val loss | full preset wall time |",
              "|---|---|---|---|---|---|---|---|"]
    for name in ("train_default", "train_gpu"):
        run, fig = steps[name].get("figures"), f[name]
        if fig is None:
            lines.append(f"| {name} | {steps[name]['status']}: {steps[name].get('error', '')} | | | | | | |")
            continue
        wall = minutes(fig["full_preset_wall_s"]) + (" (extrapolated)" if fig["extrapolated"] else "")
        stopped = "" if steps[name]["status"] == "ok" else f", then {steps[name]['status']}"
        lines.append(f"| {run['preset']} preset | {run['steps']} of {run['preset_steps']} ({run['timed_steps']})"
                     f"{stopped} | {fig['tokens_per_s']:,.0f} | {fig['step_ms_median']:.1f} | {fmt(fig['mfu'], '.3f')} "
                     f"| {fmt(fig['peak_memory_mb'], ',.0f', ' MiB')} | {fmt(fig['val_loss'], '.3f')} | {wall} |")
    bad = [f"{name} {s['status']}" for name, s in steps.items() if s["status"] != "ok"]
    lines += ["", f"Total wall time {minutes(report['wall_time_s'])} of a {minutes(report['budget_s'])} budget; "
              + (f"not ok: {', '.join(bad)}." if bad else "every step ok.")]
    return "\n".join(lines) + "\n"


def write_docs_table(text, path=DOCS):
    """Replace the part of docs/gpu.md between the markers (the prose around
    it is written by hand)."""
    doc = path.read_text() if path.exists() else ""
    if TABLE_BEGIN not in doc or TABLE_END not in doc:
        raise ValueError(f"{path} has no table markers to write between; gpu.json is written")
    head, rest = doc.split(TABLE_BEGIN, 1)
    path.write_text(head + TABLE_BEGIN + "\n" + text + TABLE_END + rest.split(TABLE_END, 1)[1])


# ----------------------------------------------------------------------------
# 5. The command line.

def parse_args(argv=None):
    p = plumbing.OneLineParser(
        description="Check the GPU path in one command: the CUDA tests, the bf16 matmul peak, the MoE layer "
                    "against dense and its peers, a default-preset run and a shortened gpu-preset run. Writes "
                    "OUT/gpu.json and the table of docs/gpu.md.")
    p.prog = "python -m lab.gpu_check"   # what --help and errors call it: it runs as a module
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA if this PyTorch sees a GPU (default: auto)")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes, a few seconds a step: proves the command, measures nothing")
    p.add_argument("--out", metavar="DIR", help="gpu.json goes here (default: results; with --quick "
                                                "runs/gpu_check_quick, which also gets the table as gpu.md)")
    p.add_argument("--logs", metavar="DIR", help="each step's output and the training runs go here "
                                                 "(default: runs/gpu_check, with --quick OUT/logs)")
    p.add_argument("--budget", type=float, metavar="S",
                   help="seconds for the whole command; each step also has its own (default: 480, 300 with --quick)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device == "auto" and not torch.cuda.is_available() and not args.quick:
        raise ValueError("this PyTorch build sees no CUDA GPU and the full check is sized for one; "
                         "for the CPU dry run use --device cpu --quick")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch build sees no CUDA GPU; for the CPU dry run use "
                         "--device cpu --quick")
    if args.device == "cpu" and not args.quick:
        raise ValueError("the full check is sized for a GPU (its gpu-preset run alone would take hours on a CPU); "
                         "for the CPU dry run add --quick")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise ValueError(f"--budget must be a positive number of seconds (got {args.budget})")
    args.out = Path(args.out or ("runs/gpu_check_quick" if args.quick else "results"))
    args.logs = Path(args.logs or (args.out / "logs" if args.quick else "runs/gpu_check"))
    if args.quick and (args.out / "gpu.json").resolve() == (ROOT / "results" / "gpu.json").resolve():
        raise ValueError(f"--out {args.out}: the toy figures of --quick would replace results/gpu.json; "
                         f"pick another folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    total = args.budget or plan.total_budget
    deadline = STARTED + total
    for folder in (args.out, args.logs):
        folder.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(["python -m lab.gpu_check", *map(shlex.quote, args.argv)]), "quick": args.quick,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device_info(args.device),
              "budget_s": total, "logs": str(args.logs), "steps": {}}
    print(f"gpu_check on {report['device']['name']} ({args.device}), torch {torch.__version__}, "
          f"budget {total:.0f} s; step logs in {args.logs}/", flush=True)
    ctx = context()
    for step in STEPS:
        record = run_step(ctx, step, plan, args.device, args.logs, deadline)
        report["steps"][step.__name__] = record
        # one line on what happened: the error, pytest's summary, or why the Hugging Face peers were skipped
        shown = record.get("figures") or {}
        note = record.get("error") or shown.get("summary") or shown.get("skipped") or ""
        print(f"  {step.__name__:14s} {record['status']:8s} {record['seconds']:6.1f} s of {record['budget_s']:.0f}"
              f"  {note}", flush=True)
    report["figures"] = figures(report["steps"])
    report["wall_time_s"] = time.time() - STARTED
    (args.out / "gpu.json").write_text(plumbing.finite_json(report, indent=1) + "\n")
    text = table(report)
    if args.quick:
        (args.out / "gpu.md").write_text(text)
        wrote = f"{args.out / 'gpu.json'} and {args.out / 'gpu.md'}"
    else:
        write_docs_table(text)
        wrote = f"{args.out / 'gpu.json'} and the table of {DOCS.relative_to(ROOT)}"
    print("\n" + text)
    print(f"total wall time {report['wall_time_s']:.1f} s; wrote {wrote}")
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    plumbing.cli(main)
