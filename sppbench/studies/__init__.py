"""Layer 4, studies: one module per notebook's study, each writing run records (``records``).

``quickstart`` (00), ``vision_table`` (10), ``clip_table`` (20), ``llm_table`` (30), ``path_study`` (40),
``seed_stability`` (50), ``kappa_lambda`` (60), ``cost_latency`` (70); shared helpers in ``common``, paired
statistics in ``stats``, the equal tuning budget in ``tuning``, printed benchmarks in ``bench`` and
notebook-parameter checks in ``notebook``. The names of the studies 40-70 and ``common`` are re-exported here.
"""
from .common import (search_defaults, check_types, path_health, write_record, jaccard, kendall_tau, path_length,
    check_model_steps, check_fractions, flat_keep, flat_ranking, pairwise)
from .path_study import (ADAM_FORM, FORMS, PathStudyConfig, run_path_study, entry_rows, entry_matrix, ORDER_ARMS,
    order_variants, order_ablation)
from .seed_stability import (SeedStudyConfig, run_seed_study, seed_study_from_table)
from .kappa_lambda import (KappaLambdaConfig, run_kappa_lambda)
from .cost_latency import (CostLatencyConfig, latency_rows, family_cost_of, latency_models, run_cost_latency)

__all__ = [
    "search_defaults", "check_types", "path_health", "write_record", "jaccard", "kendall_tau", "path_length",
    "check_model_steps", "check_fractions", "flat_keep", "flat_ranking", "pairwise", "ADAM_FORM", "FORMS",
    "PathStudyConfig", "run_path_study", "entry_rows", "entry_matrix", "ORDER_ARMS", "order_variants",
    "order_ablation", "SeedStudyConfig", "run_seed_study", "seed_study_from_table", "KappaLambdaConfig",
    "run_kappa_lambda", "CostLatencyConfig", "latency_rows", "family_cost_of", "latency_models",
    "run_cost_latency",
]
