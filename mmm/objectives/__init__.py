"""Objective heads: each a head plus its loss. Importing this package registers them."""
from mmm.objectives import mim, mlm, token_targets  # noqa: F401  (registers "mae", "simmim", "mlm", "token_targets")
