"""Layer 1, core: masks and keep-sets, analytic costs, the SLBI dynamics, the solution path and its
read-outs, the search and fine-tuning loops, automatic constants, compression and the pruned-model
format, measured costs, data-parallel helpers, and the family-adapter interface (``core.family``).
Imports only ``sppbench.errors`` / ``sppbench.fileio`` and itself (docs/architecture.md).
"""
