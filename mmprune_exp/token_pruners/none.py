"""``token_pruner=none``: every visual token is kept (the stock forward, measured for the token report)."""

from mmprune_exp.token_pruners.base import TokenPruner, TokenPrunerConfig, register_token_pruner

register_token_pruner("none", schema=TokenPrunerConfig)(TokenPruner)
