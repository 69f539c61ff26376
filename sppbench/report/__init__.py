"""Layer 5, report: run records in, tables and figures out (``build``), figures (``plots``), and the
numbers reported by others shown beside ours (``reference``).
"""
from .build import (build_report)

__all__ = [
    "build_report",
]
