"""
strategies/ -- load balancing since 2024, each method one class in one file
that ends with its registration line (docs/beyond-lossfree.md):

  quantile.py       `quantile`       Quantile Balancing (Su; Megatron-LM)
  momentum_bias.py  `momentum_bias`  SMEBU, soft-clamped momentum bias (Arcee Trinity)
  threshold.py      `threshold`      Expert Threshold routing (Sun et al. 2026)

balancers.py imports this package on its last line, so importing balancers
registers all three.
"""

from strategies import momentum_bias, quantile, threshold  # noqa: F401
