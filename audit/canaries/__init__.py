"""Canary generation: seeded pools of secrets, split at random into inserted members and held-out references."""

from audit.canaries.generate import GENERATORS, generate_canaries
from audit.canaries.spec import CanarySpec, load_spec, shipped_specs

__all__ = ["GENERATORS", "CanarySpec", "generate_canaries", "load_spec", "shipped_specs"]
