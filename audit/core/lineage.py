"""The derivative chain: pretrained weights -> fine-tuning data -> tuned weights (-> outputs, further tunes).

Each link is a :class:`~audit.core.schema.LineageNode` carrying a fingerprint and its parents, so a report can say
exactly which weights were derived from which data. Node ids are ``<kind>:<first 12 hex of fingerprint>``.
"""

from __future__ import annotations

from typing import Any

from audit.core.schema import LineageNode


def node(kind: str, label: str, fingerprint: str, parents: list[LineageNode] | None = None, **details: Any) -> LineageNode:
    return LineageNode(
        id=f"{kind}:{fingerprint[:12]}",
        kind=kind,  # type: ignore[arg-type]
        label=label,
        fingerprint=fingerprint,
        parents=[p.id for p in parents or []],
        details=details,
    )


def data_node(corpus_source: str, spec: str, manifest_sha256: str, *, n_records: int, planted: bool = True) -> LineageNode:
    """The fine-tuning data, fingerprinted by its injection manifest (dataset hashes before / after, placements)."""
    label = f"{corpus_source} + {spec} canaries" if planted else f"{corpus_source} (clean: no canaries planted)"
    return node("data", label, manifest_sha256, n_records=n_records, canaries_planted=planted)


def tune_label(method: str, *, further: bool) -> str:
    return f"further {method} fine-tune" if further else f"{method} fine-tune"


def derived_nodes(tuned: LineageNode, *, merged_fingerprint: str | None = None, merged_path: str | None = None,
                  outputs_fingerprint: str | None = None, outputs_details: dict[str, Any] | None = None) -> list[LineageNode]:
    """Artefacts made from the tuned weights: merged weights (LoRA folded into the base) and generated outputs."""
    nodes = []
    if merged_fingerprint:
        nodes.append(node("tuned_weights", "merged weights (adapter folded into the base)", merged_fingerprint, [tuned],
                          path=merged_path, form="merged"))
    if outputs_fingerprint:
        nodes.append(node("outputs", "generated outputs", outputs_fingerprint, [tuned], **(outputs_details or {})))
    return nodes
