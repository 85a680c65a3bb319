"""Objective heads: each a head plus its loss. Importing this package registers them."""
from mmm.objectives import feature_regression, mim, mlm, token_targets  # noqa: F401  (registers "masked_features", "mae", "simmim", "mlm", "token_targets")
from mmm.objectives import contrastive, itm, mrm  # noqa: F401  (registers "itc", "itm", "mrfr", "mrc", "mrc_kl")
from mmm.objectives import electra  # noqa: F401  (registers "electra")
from mmm.objectives import d2v  # noqa: F401  (registers "d2v")
from mmm.objectives import position_prediction  # noqa: F401  (registers "mp3")
from mmm.objectives import clm, rts  # noqa: F401  (registers "clm", "rts")
from mmm.objectives import visual_tokens  # noqa: F401  (registers "mvm")
from mmm.objectives import distill  # noqa: F401  (registers "distill")
