"""
plumbing/knobs.py -- a strategy's knobs (balancers.Knob) checked, turned into
flags, and the registry's own checks: not the lesson, but what lets a
strategy declare its settings on its class and nothing else.
"""

import importlib
import importlib.util
import math
import os
import sys


def check_settings(cls, given, local_seqs=None):
    """balancers.settings(), with every value held to its knob's range (a ValueError naming
    the flag). `local_seqs`: sequences per process and micro-step, when known."""
    values = balancers.settings(cls, given)
    for name, value in values.items():
        check_knob(name, cls.knobs[name], value, local_seqs)
    return values


def check_knob(name, knob, value, local_seqs=None):
    if knob.choices:
        if value not in knob.choices:
            raise ValueError(f"{balancers.flag(name)} {value!r} is not one of {', '.join(knob.choices)}")
        return
    if type(knob.default) is bool:
        if type(value) is not bool:
            raise ValueError(f"{balancers.flag(name)} is on or off, not {value!r}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or \
            (type(knob.default) is int and value != int(value)):
        raise ValueError(f"{balancers.flag(name)} must be a finite {type(knob.default).__name__} (got {value!r})")
    too_low = knob.low is not None and (value <= knob.low if knob.open_low else value < knob.low)
    too_high = knob.high is not None and (value >= knob.high if knob.open_high else value > knob.high)
    if too_low or too_high:
        raise ValueError(f"{balancers.flag(name)} must be in {knob_range(knob)} (got {value})")
    if knob.divides_batch and local_seqs is not None:
        balancers.groups_of(local_seqs, value, name)


def knob_range(knob):
    """'[0, 1]', '(0, inf)', 'sign | proportional', 'on/off': for messages and --help."""
    if knob.choices:
        return " | ".join(knob.choices)
    if type(knob.default) is bool:
        return "on/off"
    low = "-inf" if knob.low is None else f"{knob.low:g}"
    high = "inf" if knob.high is None else f"{knob.high:g}"
    left = "(" if knob.open_low or knob.low is None else "["
    right = ")" if knob.open_high or knob.high is None else "]"
    return f"{left}{low}, {high}{right}"


def all_knobs():
    """{knob name: {strategy name: Knob}} over the registry: one flag each."""
    import balancers                    # also called while balancers.py is being imported
    out = {}
    for strategy, cls in balancers.BALANCERS.items():
        for name, knob in cls.knobs.items():
            out.setdefault(name, {})[strategy] = knob
    return out


def knob_flag(name, by_strategy):
    """argparse's keywords for one knob's flag: its type, and help that shows
    each strategy's default and the range. The flag's own default is None,
    "the strategy's own value"."""
    knob = next(iter(by_strategy.values()))
    defaults = {s: k.default for s, k in by_strategy.items()}
    if len({repr(v) for v in defaults.values()}) == 1:
        shown = f"{knob.default}, read by {', '.join(defaults)}"
    else:
        shown = "; ".join(f"{s} {v}" for s, v in defaults.items())
    ranges = {knob_range(k) for k in by_strategy.values()}
    help = f"{knob.help} (default: {shown}; range: {' or '.join(sorted(ranges))})".replace("%", "%%")
    kind = type(knob.default)
    if kind is bool:
        return dict(action="store_const", const=True, help=help)
    return dict(type=kind, choices=knob.choices or None, help=help,
                metavar=None if knob.choices else "N" if kind is int else "X")


def import_strategies(paths):
    """Import each user file (a path ending in .py) or module by name, so that
    its register(...) lines run. The module is remembered by its path, so a
    checkpoint can name what to --import to read it again."""
    for path in paths:
        if path.endswith(".py") or os.sep in path:
            if not os.path.isfile(path):
                raise ValueError(f"--import {path}: no such file")
            module_name = os.path.splitext(os.path.basename(path))[0]
            if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) and \
                    os.path.samefile(sys.modules[module_name].__file__, path):
                continue
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(path)
            except ModuleNotFoundError as e:
                raise ValueError(f"--import {path}: {e}; give the file's path (mine.py) or run from its "
                                 f"folder") from None


def check_registration(name, cls):
    """A name names one strategy: a second class under a taken name is refused,
    since silently keeping either one would train a strategy nobody asked for
    (registering the same class again, a module imported twice, is harmless).
    A knob name shared with another strategy must have the same type, since
    both are set by the one flag."""
    # Called while balancers.py itself is being imported (its own strategies
    # register then): the module as far as it has run.
    import balancers
    taken = balancers.BALANCERS.get(name)
    if taken is not None and _full_name(taken) != _full_name(cls):
        raise ValueError(f"balancer name {name!r} is taken by {_full_name(taken)}: "
                         f"register {_full_name(cls)} under another name")
    if not isinstance(getattr(cls, "knobs", None), dict) or \
            not all(isinstance(k, balancers.Knob) for k in cls.knobs.values()):
        raise ValueError(f"{_full_name(cls)}.knobs must be a dict of name -> balancers.Knob")
    for knob_name, knob in cls.knobs.items():
        for other, theirs in all_knobs().get(knob_name, {}).items():
            if other != name and type(theirs.default) is not type(knob.default):
                raise ValueError(f"knob {knob_name!r} of {_full_name(cls)} is a {type(knob.default).__name__}, "
                                 f"but {other}'s is a {type(theirs.default).__name__}: one flag sets both; "
                                 f"rename it")


def _full_name(cls):
    """module.Class: the same for a class defined again by re-importing its file."""
    return f"{cls.__module__}.{cls.__qualname__}"


def name_of(cls):
    return next((name for name, c in balancers.BALANCERS.items() if c is cls), cls.__name__)


def check_strategy(name, n_experts, top_k, knobs, local_seqs=None):
    """The strategy's class, once its name and settings are known to be good."""
    if name not in balancers.BALANCERS:
        raise ValueError(f"--balancer {name}: no such strategy; registered are "
                         f"{', '.join(balancers.BALANCERS)}. One of your "
                         f"own: register('{name}', YourClass) in a file, then --import FILE "
                         f"(docs/adding-a-strategy.md)")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}: lower --top-k")
    check_settings(balancers.BALANCERS[name], knobs, local_seqs)
    return balancers.BALANCERS[name]


def check_config(cfg, ep_size=1, local_seqs=None):
    """Raise ValueError naming the setting and the fix, before anything is built.
    `ep_size`: the processes the experts are shared out over (the world size
    unless --ep-size says otherwise). `local_seqs`: sequences per process and
    micro-step, when known."""
    for name in ("n_layers", "d_model", "n_heads", "n_experts", "top_k", "d_expert", "seq_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.shared_experts < 0:
        raise ValueError(f"shared_experts={cfg.shared_experts} must be >= 0")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}: "
                         f"pick an --n-heads that divides --d-model")
    if cfg.n_experts % ep_size:
        raise ValueError(f"n_experts={cfg.n_experts} is not divisible by the {ep_size} expert-parallel processes: "
                         f"each rank must own the same number of experts; change --n-experts, --ep-size "
                         f"or --nproc_per_node")
    check_strategy(cfg.balancer, cfg.n_experts, cfg.top_k, cfg.balance, local_seqs)


# Last, not first: balancers.py imports the names above from here, so they
# must exist by the time importing balancers runs it (whichever is imported first).
import balancers  # noqa: E402
