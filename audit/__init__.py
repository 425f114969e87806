"""canary-audit: measure what fine-tuning stores in the weights.

Stages: canaries -> inject -> train -> score -> report, sequenced by :mod:`audit.pipeline`; the pure core
(:mod:`audit.schema`, :mod:`audit.canaries`, :mod:`audit.inject`, :mod:`audit.metrics`) never imports torch.
"""

__version__ = "0.1.0"
