"""The pure core: schema, layout, the stage store, keys, seeds, gates, curves and lineage as data.

No torch, no transformers, no MLflow: every other layer imports it, and it imports nothing of theirs
(docs/architecture.md)."""
