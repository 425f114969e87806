"""Canary generation: seeded pools of secrets, split at random into inserted members and held-out references.

    from audit.data.canaries import load_spec, generate_canaries
    canaries = generate_canaries(load_spec("words"), seed=0)
"""

from audit.data.canaries.base import GenerationContext, random_secrets
from audit.data.canaries.generate import (
           GENERATORS,
           added_tokens,
           describe,
           generate_canaries,
           reference_secrets,
           spec_needs_model,
)
from audit.data.canaries.spec import CanarySpec, load_spec, shipped_specs

__all__ = ["GENERATORS", "CanarySpec", "added_tokens", "GenerationContext", "describe", "generate_canaries", "load_spec",
           "random_secrets", "reference_secrets", "shipped_specs", "spec_needs_model"]
