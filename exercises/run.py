"""
python -m exercises.run [train.py flags]

train.py, with the strategies of the exercises registered as well, so that
`--balancer ex1_mult_bias` (exercise 1), `ex2_lossfree_centred` (2),
`ex3_capacity_drop` (3), `ex4_global_aux_nobuf` (4), `ex5_causal_ec` (5),
`ex7_aux` (7) and `ex8_lossfree` (8) train like any other (the exN_ prefix
keeps them apart from the names of strategies in balancers.py). Exercises 7
and 8 train as shipped, bug included: that is how their symptom is seen.

    python -m exercises.run --balancer ex1_mult_bias
    python -m exercises.run --balancer ex3_capacity_drop --capacity-factor 1.0 --preset tiny
    torchrun --nproc_per_node=2 -m exercises.run --balancer ex4_global_aux_nobuf --grad-accum 2

Your own files by default; EXERCISES_FROM=solutions trains the reference
solutions (exercises/checking.py). An exercise not written yet stops the
run with one line, its NotImplementedError's message, the first time it is
used.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))    # checking.py, next to this file

import plumbing  # noqa: E402
import train  # noqa: E402
from checking import EXERCISES, exercise  # noqa: E402


def main():
    try:
        for name in EXERCISES:
            exercise(name)      # importing an exercise file registers its strategy
        return train.main()
    except NotImplementedError as e:     # a stub: a user's to-do, not a crash
        raise ValueError(f"{e} first (or train the reference solution: EXERCISES_FROM=solutions)") from None


if __name__ == "__main__":
    plumbing.cli(main)
