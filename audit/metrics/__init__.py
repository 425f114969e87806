"""Memorization metrics: pure functions on arrays (numpy/scipy only, never torch).

Each module cites the paper its metric comes from and states the formula.
"""

from audit.metrics.exposure import exposure_from_rank, rank_against_references

__all__ = ["exposure_from_rank", "rank_against_references"]
