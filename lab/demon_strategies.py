"""
lab/demon_strategies.py -- the strategy demons of lab/demons.py as --balancer
choices, for a run that shows what a shipped bug does to training:

    python train.py --import lab/demon_strategies.py --balancer demon_f_not_divided_by_k
    python train.py --import lab/demon_strategies.py --balancer demon_silent_zero

A file of its own so that importing lab.demons (the tests, the gallery)
never adds the demons to the registry: only --import does.
"""

from lab.demons import register_demons

register_demons()
