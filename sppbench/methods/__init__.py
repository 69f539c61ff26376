"""Layer 3, methods: every way of choosing what to prune, on the same masks.

``structured``: the ranking and per-budget methods of the vision / CLIP tables (SPP, Lasso, DessiLBI,
magnitude, random) and the Torch-Pruning peers (``peers``) behind ``ranking`` / ``prune``;
``llm``: the layer-wise LLM pruners (magnitude, Wanda, RIA, SPP-RIA, SparseGPT via ``sparsegpt``);
``registry``: one ``Method`` entry per method of both, which the method lists, the CLI and the tests read.
The names of ``structured`` are re-exported here (``sppbench.methods.ranking``).
"""
from .structured import (RANKING_METHODS, PER_BUDGET_METHODS, PEER_METHODS, TUNING_KNOBS, METHODS,
    DETERMINISTIC_METHODS, DEFAULTS, ADAM_FORMS, SPP_FORMS, adam_setting, adam_constants, ADAM_FORM,
    spp_search_constants, RELEASED_OFFICIAL, official_constants, Pruned, check_budget, peer_reason, check_method, lasso_search, dessilbi_search,
    magnitude_path, random_path, lasso_to_budget, lasso_family, ranking, prune, spread)

__all__ = [
    "RANKING_METHODS", "PER_BUDGET_METHODS", "PEER_METHODS", "TUNING_KNOBS", "METHODS", "DETERMINISTIC_METHODS",
    "DEFAULTS", "ADAM_FORMS", "SPP_FORMS", "adam_setting", "adam_constants", "ADAM_FORM", "spp_search_constants",
    "RELEASED_OFFICIAL", "official_constants", "Pruned", "check_budget", "peer_reason", "check_method", "lasso_search", "dessilbi_search", "magnitude_path",
    "random_path", "lasso_to_budget", "lasso_family", "ranking", "prune", "spread",
]
