"""canary-audit: measure what fine-tuning stores in the weights.

Stages: canaries -> inject -> train -> score -> report, sequenced by :mod:`audit.pipeline`; the pure core
(:mod:`audit.core.schema`, :mod:`audit.data.canaries`, :mod:`audit.data.inject`, :mod:`audit.metrics`) never imports torch.

    from audit import inject_canaries, CanaryAuditCallback   # the Python API for your own Trainer
                                                             # (audit.integrations.api, audit.integrations.callback)
"""

__version__ = "0.1.0"

__all__ = ["CanaryAuditCallback", "inject_canaries"]

_LAZY = {"inject_canaries": "audit.integrations.api", "InjectedDataset": "audit.integrations.api",
         "CanaryAuditCallback": "audit.integrations.callback"}
"""Public names imported on first use, so ``import audit`` (and every torch-free module under it) stays light."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'audit' has no attribute {name!r}")
