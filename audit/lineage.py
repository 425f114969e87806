"""The derivative chain: pretrained weights -> fine-tuning data -> tuned weights (-> outputs, further tunes).

Each link is a :class:`~audit.schema.LineageNode` carrying a fingerprint and its parents, so a report can say
exactly which weights were derived from which data. Node ids are ``<kind>:<first 12 hex of fingerprint>``.
"""

from __future__ import annotations

from typing import Any

from audit.schema import LineageNode


def node(kind: str, label: str, fingerprint: str, parents: list[LineageNode] | None = None, **details: Any) -> LineageNode:
    return LineageNode(
        id=f"{kind}:{fingerprint[:12]}",
        kind=kind,  # type: ignore[arg-type]
        label=label,
        fingerprint=fingerprint,
        parents=[p.id for p in parents or []],
        details=details,
    )


def render_chain(nodes: list[LineageNode]) -> str:
    """A one-line-per-node text drawing of the graph, parents first."""
    by_id = {n.id: n for n in nodes}
    lines = []
    for n in nodes:
        parents = ", ".join(by_id[p].label if p in by_id else p for p in n.parents)
        arrow = f"  <- {parents}" if parents else ""
        lines.append(f"[{n.kind}] {n.label} ({n.fingerprint[:12]}){arrow}")
    return "\n".join(lines)
