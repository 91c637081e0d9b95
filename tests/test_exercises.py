"""
The classroom exercises (exercises/README.md), checked from the main suite.

`python -m pytest exercises` runs the checkers against the student's files;
EXERCISES_FROM picks another copy (exercises/checking.py). Here they run in a
subprocess, exactly as a student or teacher runs them, against:

  the untouched stubs      every check "not started" (skipped), exit code 0
  the reference solutions  every check passes
  wrong solutions          every exercise's checkers catch each plausible
                           mistake below, with a message naming the property
  a find-the-bug stub      exercises 7 and 8 with DIAGNOSIS written and the
                           shipped bug left in: "wrong", naming the property
  a student half way       two finished strategies moved into balancers.py
                           under the names a student picks: no clash

It also checks that the registry (balancers.register) refuses a second
class under a taken name, and that EXERCISES_HINTS=0 hides the hints.

The wrong solutions are the reference solutions with one text substitution
each (WRONG), made in a temporary folder: a teacher reads each mistake as a
one-line diff, and a substitution that no longer matches the solution fails
loudly instead of silently testing nothing.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import balancers

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "exercises" / "solutions"
EXERCISE_FILES = ["ex1_multiplicative", "ex2_centred_bias", "ex3_capacity", "ex4_global_no_buffer",
                  "ex5_causal_expert_choice", "ex6_first_specialist", "ex7_aux_loss_bug", "ex8_lossfree_bug"]
# The find-the-bug exercises: their stubs run, bug and all, and read "not
# started" only until DIAGNOSIS is written (exercises/checking.diagnosed).
FIND_THE_BUG = ["ex7_aux_loss_bug", "ex8_lossfree_bug"]


def run_checkers(tmp_path, source, tag, root=ROOT, select=None, **env_vars):
    """`python -m pytest exercises` with EXERCISES_FROM=source (and any other
    environment variables given), in the project at `root`. Returns the exit
    code, the output, the summary counts and {test: (outcome, message)} read
    from a JUnit XML report."""
    report = tmp_path / f"{tag}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "EXERCISES_"))}
    env.update(EXERCISES_FROM=str(source), OMP_NUM_THREADS="1", **env_vars)
    command = [sys.executable, "-m", "pytest", "exercises", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    if select:                                          # a -k expression: some exercises only
        command += ["-k", select]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    last = output.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    results = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = kind, (node.get("message") or "") + "\n" + (node.text or "")
        results[name] = (outcome, message)
    return proc.returncode, output, counts, results


def test_untouched_stubs_are_all_not_started(tmp_path):
    """The project as a student receives it: every check is skipped as "not
    started", with the hint, and pytest exits 0."""
    code, output, counts, results = run_checkers(tmp_path, "stubs", "stubs")
    assert code == 0, output[-3000:]
    assert counts == {"skipped": len(results)} and len(results) >= 8 * 5, output[-3000:]
    for name, (outcome, message) in results.items():
        assert outcome == "skipped" and "not started: exercise" in message, f"{name}: {outcome} {message}"
    assert output.count(": not started") == 8 and output.count("    hint: ") == 8, output[-3000:]


def test_reference_solutions_pass_every_check(tmp_path):
    code, output, counts, results = run_checkers(tmp_path, "solutions", "solutions")
    assert code == 0, output[-3000:]
    assert counts == {"passed": len(results)} and len(results) >= 8 * 5, output[-3000:]
    assert output.count(": done") == 8, output[-3000:]


def test_hints_are_hidden_with_exercises_hints_0(tmp_path):
    """For graded work: EXERCISES_HINTS=0 keeps the verdicts and drops every
    hint (the stubs print one hint per exercise otherwise, see above)."""
    code, output, _, _ = run_checkers(tmp_path, "stubs", "nohints", EXERCISES_HINTS="0")
    assert code == 0 and output.count(": not started") == 8, output[-3000:]
    assert "hint: " not in output, output[-3000:]


# ----------------------------------------------------------------------------
# The registry: a name names one strategy, and the exercises' names (ex1_...)
# leave every other name to the student.

def test_registry_refuses_a_second_class_under_a_taken_name(monkeypatch):
    monkeypatch.setattr(balancers, "BALANCERS", dict(balancers.BALANCERS))

    class LossFree(balancers.LossFree):           # a student's class, named like the one it copies
        pass

    with pytest.raises(ValueError) as refused:
        balancers.register("lossfree", LossFree)
    message = str(refused.value)
    assert "\n" not in message and "balancers.LossFree" in message and f"{__name__}." in message, message
    assert balancers.BALANCERS["lossfree"] is balancers.LossFree, "the refused class must not replace the first"


def test_registering_a_class_again_is_harmless(monkeypatch):
    """The same class twice, or the same file executed again (a new class
    object with the same module and name): no error, and the name keeps
    naming that strategy."""
    monkeypatch.setattr(balancers, "BALANCERS", dict(balancers.BALANCERS))
    toy = balancers.BALANCERS["toy_ema"]
    assert balancers.register("toy_ema", toy) is toy
    spec = importlib.util.spec_from_file_location("toy_strategy", ROOT / "tests" / "toy_strategy.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))       # registers its EmaPenalty again
    again = balancers.BALANCERS["toy_ema"]
    assert again is not toy and again.__qualname__ == toy.__qualname__ == "EmaPenalty"


def project_copy(folder):
    """The project's code, tests and exercises, copied for a test to edit."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    folder.mkdir()
    for path in ROOT.iterdir():
        if path.suffix in (".py", ".ini"):
            shutil.copy2(path, folder / path.name)
    for name in ("exercises", "tests", "plumbing", "lab", "strategies"):
        shutil.copytree(ROOT / name, folder / name, ignore=ignore)
    return folder


def move_into_balancers(project, solution, cls, name):
    """exercises/README's advice, followed: the finished class copied from the
    exercise file into balancers.py, above the registry, and its line added
    to BALANCERS."""
    text = (SOLUTIONS / f"{solution}.py").read_text()
    code = text[text.index(f"\nclass {cls}("):text.index("\nregister(")]
    path = project / "balancers.py"
    source = path.read_text()
    assert source.count("\nBALANCERS = {\n") == 1, "balancers.py must keep its registry as `BALANCERS = {`"
    source = source.replace("\nBALANCERS = {\n", f"{code}\n\nBALANCERS = {{\n    \"{name}\": {cls},\n")
    path.write_text(source)


def test_students_strategies_in_balancers_py_under_the_exercises_plain_names_break_nothing(tmp_path):
    """A student half way through: exercises 1 and 2 finished, and their
    classes moved into balancers.py under the names a student picks,
    `mult_bias` and `lossfree_centred`. The exercise files keep registering
    their own ex1_/ex2_ names, so nothing clashes and every checker finds its
    own class: 1 and 2 "done", the six others "not started", exit code 0."""
    project = project_copy(tmp_path / "project")
    move_into_balancers(project, "ex1_multiplicative", "MultiplicativeBias", "mult_bias")
    move_into_balancers(project, "ex2_centred_bias", "CentredLossFree", "lossfree_centred")
    handin = project / "exercises"
    for name in ("ex1_multiplicative", "ex2_centred_bias"):
        shutil.copy2(SOLUTIONS / f"{name}.py", handin / f"{name}.py")
    code, output, _, _ = run_checkers(tmp_path, "stubs", "halfway", root=project)
    assert code == 0, output[-3000:]
    assert output.count(": done") == 2 and output.count(": not started") == 6, output[-3000:]


def test_a_find_the_bug_stub_with_its_diagnosis_written_but_the_bug_left_fails_naming_the_property(tmp_path):
    """Exercises 7 and 8 as shipped, with DIAGNOSIS written and nothing
    fixed: no longer "not started", and "wrong", with the shipped bug's
    symptom in the failing check's message."""
    folder = tmp_path / "diagnosed"
    shutil.copytree(ROOT / "exercises", folder, ignore=shutil.ignore_patterns("__pycache__", "solutions"))
    for name in FIND_THE_BUG:
        path = folder / f"{name}.py"
        text = path.read_text()
        assert text.count("\nDIAGNOSIS = None") == 1, f"{name}: the stub must start with DIAGNOSIS = None"
        path.write_text(text.replace("\nDIAGNOSIS = None", "\nDIAGNOSIS = 'a guess, nothing fixed yet'"))
    code, output, _, results = run_checkers(tmp_path, folder, "diagnosed", select="ex7 or ex8")
    assert code == 1 and output.count(": wrong -- ") == 2, output[-3000:]
    for check, words in (("test_ex7_aux_loss_bug::test_uniform_router_costs_exactly_alpha[2]",
                          "a uniform router must cost exactly alpha"),
                         ("test_ex8_lossfree_bug::test_bias_gets_no_gradient", "the bias got a gradient")):
        outcome, message = results[check]
        assert outcome == "failure" and words in message, f"{check}: {outcome} {message}"


# ----------------------------------------------------------------------------
# Plausible wrong solutions: (file, text in the solution, replacement, the
# check that must fail, words its message must contain, the mistake).

WRONG = [
    ("ex1_multiplicative", "self.mult *= 1 + self.cfg.bias_rate", "self.mult *= 1 - self.cfg.bias_rate",
     "test_step_moves_multiplier_against_the_load_by_about_u", "overloaded expert's multiplier must go down",
     "the update's sign is flipped"),
    ("ex1_multiplicative", "weight = scores.gather(-1, expert_idx)",
     "weight = (scores * self.mult).gather(-1, expert_idx)",
     "test_multiplier_gets_no_gradient", "the multiplier got a gradient",
     "the multiplier also scales the gate weight"),
    ("ex1_multiplicative", "self.mult *= 1 + self.cfg.bias_rate * torch.sign(error)",
     "self.mult += self.cfg.bias_rate * torch.sign(error)",
     "test_multiplier_stays_positive_when_an_expert_stays_busy", "it must stay positive",
     "an additive update on the multiplier, which goes through zero"),

    ("ex2_centred_bias", "self.bias += update - update.mean()", "self.bias += update",
     "test_bias_stays_zero_mean", "must stay zero-mean", "the update is not centred"),
    ("ex2_centred_bias", "error = load.mean() - load", "error = load - load.mean()",
     "test_bias_falls_for_a_busy_expert_and_rises_for_an_idle_one", "overloaded expert's bias must fall",
     "the error's sign is flipped"),
    ("ex2_centred_bias", "self.bias += update - update.mean()", "self.bias.copy_(update - update.mean())",
     "test_same_decisions_as_plain_lossfree", "minus one shared constant",
     "the bias is overwritten by the update instead of accumulating it"),

    ("ex3_capacity", "C = math.ceil(self.cfg.capacity_factor * k * T / E)",
     "C = math.ceil(self.cfg.capacity_factor * T / E)",
     "test_nothing_is_dropped_from_a_balanced_router_at_capacity_factor_1", "c * k * T / E assignments",
     "the capacity counts tokens instead of assignments (k per token)"),
    ("ex3_capacity", "place = onehot.flatten(1, 2).cumsum(1).view(B, T, k, E)",
     "place = onehot.transpose(1, 2).flatten(1, 2).cumsum(1).view(B, k, T, E).transpose(1, 2)",
     "test_model_is_exactly_causal_while_dropping", "the queue must run in token order",
     "GShard's queue: every first choice before any second choice, so later tokens take earlier slots"),
    ("ex3_capacity", "keep = place <= C", "keep = place < C",
     "test_first_come_first_served_in_token_order", "dropped assignments while only",
     "an expert drops its C-th assignment (off by one)"),

    ("ex4_global_no_buffer", "all_reduce(counts, self.world_size)", "all_reduce(counts.clone(), self.world_size)",
     "test_f_counts_every_rank", "must count the selections of every rank",
     "the all-reduced copy is thrown away: f stays this rank's"),
    ("ex4_global_no_buffer", "f = counts.float() / counts.sum().clamp(min=1)",
     "f = counts.float() / routing.probs[..., 0].numel()",
     "test_uniform_router_costs_exactly_alpha", "must cost exactly alpha",
     "f divided by the tokens instead of the k assignments per token"),
    ("ex4_global_no_buffer", "            all_reduce(counts, self.world_size)\n",
     "            all_reduce(counts, self.world_size)\n"
     "            self.seen = counts = counts + getattr(self, 'seen', 0)\n",
     "test_a_micro_step_forgets_the_earlier_ones", "must not depend on micro-step 1",
     "a running count across micro-steps: the buffer this exercise leaves out"),

    ("ex5_causal_expert_choice", "(flat.detach() > self.threshold)",
     "(flat.detach() > self.cutoffs(scores.detach()).mean(0))",
     "test_model_is_exactly_causal", "the routing is not causal",
     "the threshold is the current batch's cut-off: expert choice again"),
    ("ex5_causal_expert_choice", "        if self.training:\n            # Remember",
     "        if True:\n            # Remember",
     "test_evaluation_does_not_move_thresholds", "collect in training mode only",
     "validation batches are collected too"),
    ("ex5_causal_expert_choice", ".values[:, C]", ".values[:, C - 1]",
     "test_threshold_is_expert_choice_cut_off_of_the_last_batch", "exactly expert choice's C",
     "the cut-off is the C-th score instead of the (C+1)-th: one token short"),
    ("ex5_causal_expert_choice", "            self.cut_groups += cut.shape[0]\n",
     "            self.cut_groups += cut.shape[0]\n            self.step(None)\n",
     "test_threshold_changes_only_in_step", "only from batches already trained on",
     "the thresholds are updated inside route(), before the batch is routed"),
    ("ex5_causal_expert_choice",
     "            self.cut_sum += cut.sum(0)\n            self.cut_groups += cut.shape[0]\n",
     "            self.cut_sum = cut.sum(0)\n            self.cut_groups = torch.tensor(cut.shape[0])\n",
     "test_micro_steps_give_the_thresholds_of_the_whole_batch", "every routing group of the step",
     "only the last micro-step's cut-offs are kept"),
    ("ex5_causal_expert_choice",
     "        all_reduce(self.cut_sum, self.world_size)\n        all_reduce(self.cut_groups, self.world_size)\n",
     "",
     "test_thresholds_average_the_routing_groups_of_every_rank", "of every rank's routing groups",
     "no all-reduce in step(): each rank keeps the cut-offs of its own half of the batch"),

    ("ex6_first_specialist", "total = freq.sum(1, keepdim=True)", "total = freq.sum(-1, keepdim=True)",
     "test_an_expert_only_one_domain_uses_is_its_own_even_if_that_domain_spreads_out",
     "share across domains, not across experts", "shares taken over experts instead of domains"),
    ("ex6_first_specialist", "return freq / total.clamp(min=torch.finfo(freq.dtype).tiny)", "return freq / total",
     "test_an_unused_expert_belongs_to_nobody_and_gives_no_nan", "not NaN", "0 / 0 for an unused expert"),
    ("ex6_first_specialist", "            else:\n                keeps[name] = False\n",
     "            else:\n                pass\n",
     "test_first_owned_is_the_step_from_which_the_domain_keeps_an_expert", "owns no expert at the last evaluation",
     "the first time a domain ever owns an expert, even if it loses it again"),
    ("ex6_first_specialist", "return (ownership(freq) > threshold) & (freq >= min_use * fair)",
     "return ownership(freq) > threshold",
     "test_a_barely_used_expert_is_no_specialist", "apply min_use", "a dying expert counts as a specialist"),

    ("ex7_aux_loss_bug", "f = counts.float() / counts.sum().clamp(min=1)", "f = counts.float() / (B * T)",
     "test_uniform_router_costs_exactly_alpha", "must cost exactly alpha whatever k is",
     "the shipped bug put back: f divided by the tokens, not the k T assignments"),
    ("ex7_aux_loss_bug", ".reshape(B * T, E).mean(0)", ".reshape(B * T, E).mean(0).detach()",
     "test_loss_pushes_the_busiest_expert_down", "must push the busiest expert",
     "P detached as well as f: the loss has the right value and no gradient"),

    ("ex8_lossfree_bug", "weight = scores.gather(-1, expert_idx)",
     "weight = (scores + self.bias).gather(-1, expert_idx)",
     "test_bias_gets_no_gradient", "the bias got a gradient",
     "half the fix: the bias a buffer, but still added to the gate weight"),
    ("ex8_lossfree_bug", 'self.register_buffer("bias", torch.zeros(n_experts))',
     "self.bias = torch.nn.Parameter(torch.zeros(n_experts))",
     "test_bias_is_state_not_a_parameter", "not a parameter",
     "the other half: the weight fixed, but the bias still a parameter that GPT initialises and AdamW trains"),
]


def rounds():
    """Each round gives every exercise at most one of its mistakes, so one
    checker run tests a mistake of every exercise at once."""
    per_file = {}
    for wrong in WRONG:
        per_file.setdefault(wrong[0], []).append(wrong)
    return [[mistakes[r] for mistakes in per_file.values() if r < len(mistakes)]
            for r in range(max(map(len, per_file.values())))]


def test_every_exercise_has_wrong_solutions():
    assert {w[0] for w in WRONG} == set(EXERCISE_FILES)


@pytest.mark.parametrize("mistakes", rounds(), ids=lambda ms: "round" + str(rounds().index(ms)))
def test_wrong_solutions_fail_naming_the_property(tmp_path, mistakes):
    folder = tmp_path / "wrong"
    shutil.copytree(SOLUTIONS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file, old, new, *_ in mistakes:
        path = folder / f"{file}.py"
        text = path.read_text()
        assert text.count(old) == 1, f"{file}: the text to replace must occur once in the solution: {old!r}"
        path.write_text(text.replace(old, new))
    code, output, counts, results = run_checkers(tmp_path, folder, "wrong")
    assert code == 1, output[-3000:]
    for file, old, new, check, words, mistake in mistakes:
        module = "test_" + file
        failed = {name: message for name, (outcome, message) in results.items()
                  if outcome == "failure" and name.split("::")[0] == module
                  and name.split("::")[1].split("[")[0] == check}
        assert failed, f"{file} with the mistake '{mistake}': {check} should fail\n{output[-3000:]}"
        assert any(words in message for message in failed.values()), \
            f"{file} with the mistake '{mistake}': {check} failed without saying '{words}':\n" \
            + "\n".join(failed.values())


def test_measurement_of_exercise_6_prints_an_answer(tmp_path):
    """The command of exercise 6, on the reference solution, shortened."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "exercises.solutions.ex6_first_specialist", "--steps", "4",
                           "--every", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^Answer: ", proc.stdout, re.M), proc.stdout


def test_exercise_strategies_train_through_train_py(tmp_path):
    """`python -m exercises.run` is train.py with the exercises' strategies
    registered: a reference solution trains and reports like any strategy."""
    env = dict(os.environ, OMP_NUM_THREADS="1", EXERCISES_FROM="solutions")
    proc = subprocess.run([sys.executable, "-m", "exercises.run", "--balancer", "ex5_causal_ec", "--preset", "tiny",
                           "--steps", "3", "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").exists()
    assert "causal leak 0.00e+00" in proc.stdout + proc.stderr


def test_an_unwritten_exercise_stops_its_run_with_one_line(tmp_path):
    """Training a stub is a to-do, not a crash: one line naming what to
    write, exit code 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "EXERCISES_FROM"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "exercises.run", "--balancer", "ex1_mult_bias", "--preset", "tiny",
                           "--steps", "3", "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "exercise 1: write MultiplicativeBias.route()" in errors[0]
