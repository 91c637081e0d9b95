"""
python -m exercises.run [train.py flags]

train.py, with the strategies of the exercises registered as well, so that
`--balancer mult_bias` (exercise 1), `lossfree_centred` (2), `capacity_drop`
(3), `global_aux_nobuf` (4) and `causal_ec` (5) train like any other:

    python -m exercises.run --balancer mult_bias
    python -m exercises.run --balancer capacity_drop --capacity-factor 1.0 --preset tiny
    torchrun --nproc_per_node=2 -m exercises.run --balancer global_aux_nobuf --grad-accum 2

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
    for name in EXERCISES:
        exercise(name)      # importing an exercise file registers its strategy (inside cli: a bad
    try:                    # EXERCISES_FROM is then one line)
        return train.main()
    except NotImplementedError as e:     # a stub: a user's to-do, not a crash
        raise ValueError(f"{e} first (or train the reference solution: EXERCISES_FROM=solutions)") from None


if __name__ == "__main__":
    plumbing.cli(main)
