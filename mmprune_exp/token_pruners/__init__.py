"""Token pruners: registered rules that drop or merge visual tokens during inference (one module each)."""

from mmprune_exp.token_pruners import fastv, glimpse, none, prunevid, visionzip, yopo  # noqa: F401  (register the token pruners)
from mmprune_exp.token_pruners.base import (
    TOKEN_PRUNERS,
    TokenPruner,
    TokenPrunerConfig,
    TokenSession,
    build_token_pruner,
    register_token_pruner,
    summarize,
)

__all__ = [
    "TOKEN_PRUNERS",
    "TokenPruner",
    "TokenPrunerConfig",
    "TokenSession",
    "build_token_pruner",
    "register_token_pruner",
    "summarize",
]
