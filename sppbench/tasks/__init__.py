"""Layer 3, tasks: what a model is pruned and scored on. Datasets and images (``data``), evaluation
(``evaluate``), the one vision Task type and its registry (``vision``), the embedded offline assets
(``assets``, ``embedded``, ``embedded_swin``, ``embedded_clip``, ``llm_data``), CLIP retrieval
(``captions``, ``clip``), zero-shot LLM tasks (``zeroshot``) and the paper profiles (``profiles``).
"""
