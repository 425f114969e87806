"""The report's figures as PNG bytes (matplotlib, Agg backend: no display, same bytes for the same data).

Each function takes the plain data of :mod:`audit.report.render.views` and returns a PNG; nothing here reads files.
"""

from __future__ import annotations

import io
import math
from typing import Any

from audit.core.gates import NULL_MEAN_EXPOSURE_BITS
from audit.report.render.token_view import TokenView
from audit.report.render.views import RocCurve, TierRow, roc_groups

MODEL_COLORS = {"base": "#8c8c8c", "tuned": "#d9480f"}
KIND_COLORS = {"base_weights": "#dbe4ff", "data": "#fff3bf", "tuned_weights": "#ffe3e3", "outputs": "#d3f9d8",
               "release": "#e5dbff"}
DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "svg.hashsalt": "canary-audit", "figure.dpi": DPI})
    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def exposure_by_tier(rows: list[TierRow], points: dict[tuple[int, str], list[float]], *, exposure_max: float,
                     models: list[str]) -> bytes:
    """Mean exposure per tier, base vs tuned bars, each canary as a dot, the 95% null band shaded per tier."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    width = 0.8 / max(len(models), 1)
    for i, row in enumerate(rows):
        ax.add_patch(plt.Rectangle((i - 0.45, row.band[0]), 0.9, row.band[1] - row.band[0], color="#74c0fc", alpha=0.25,
                                   lw=0, label="null band (95%)" if i == 0 else None))
        for j, model in enumerate(models):
            x = i - 0.4 + width * (j + 0.5)
            if model in row.exposure:
                ax.bar(x, row.exposure[model], width * 0.9, color=MODEL_COLORS.get(model, "#495057"),
                       label=model if i == 0 else None, zorder=2)
            dots = points.get((row.repetitions, model), [])
            if dots:
                offsets = [x + width * 0.3 * ((k / max(len(dots) - 1, 1)) - 0.5) for k in range(len(dots))]
                ax.scatter(offsets, dots, s=9, color="black", zorder=3, alpha=0.7, linewidths=0)
    ax.axhline(NULL_MEAN_EXPOSURE_BITS, color="#1c7ed6", ls="--", lw=1, label=f"null mean {NULL_MEAN_EXPOSURE_BITS:.2f} bits")
    ax.axhline(exposure_max, color="#495057", ls=":", lw=1, label=f"max {exposure_max:.1f} bits")
    ax.set_xticks(range(len(rows)), [f"{r.label}\n(n={r.n})" for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, exposure_max * 1.08 + 0.1)
    ax.set_ylabel("exposure (bits vs sampled references)")
    ax.set_title("Exposure by repetition tier")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _png(fig)


def roc(curves: list[RocCurve]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for group in roc_groups(curves):  # identical curves: one line, every attack named on it
        c = group[0]
        names = " = ".join(g.attack for g in group)
        label = f"{names} (AUC {c.auc:.2f}{', identical curves' if len(group) > 1 else ''})"
        ax.plot(c.fpr, c.tpr, lw=1.4, label=label)  # ties between the groups: diagonal
    ax.plot([0, 1], [0, 1], color="#adb5bd", ls="--", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-positive rate (references)")
    ax.set_ylabel("true-positive rate (members)")
    n = f"{curves[0].n_members} members, {curves[0].n_controls} references" if curves else ""
    ax.set_title(f"Membership inference, tuned model\n{n}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    return _png(fig)


def information(labels: list[str], bits: dict[str, list[float | None]], *, space_bits: float, title: str) -> bytes:
    """Grouped bars: bits of the secret (or work excerpt) under each model, per group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    models = list(bits)
    width = 0.8 / max(len(models), 1)
    for j, model in enumerate(models):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(labels))]
        ax.bar(xs, [b or 0.0 for b in bits[model]], width * 0.9, color=MODEL_COLORS.get(model, "#495057"), label=model)
    if space_bits > 0:
        ax.axhline(space_bits, color="#495057", ls=":", lw=1, label=f"secret space {space_bits:.1f} bits")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("bits")
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def release_by_format(formats: list[str], tiers: list[str], exposure: dict[str, list[float | None]],
                      bits: dict[str, list[float | None]], *, exposure_max: float) -> bytes:
    """Two panels of grouped bars, one group per format (tuned, then each release), one bar per tier: exposure
    (sampled scale) and bits of the secret given its prefix (what the weights store: fewer bits, more stored)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2))
    colors = plt.get_cmap("viridis")
    width = 0.8 / max(len(tiers), 1)
    for ax, values, ylabel in ((axes[0], exposure, "exposure (bits)"), (axes[1], bits, "bits of the secret")):
        for j, tier in enumerate(tiers):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(formats))]
            ax.bar(xs, [v or 0.0 for v in values[tier]], width * 0.9, color=colors(j / max(len(tiers) - 1, 1)), label=tier)
        ax.set_xticks(range(len(formats)), formats, fontsize=8)
        ax.set_ylabel(ylabel)
    axes[0].axhline(exposure_max, color="#495057", ls=":", lw=1)
    axes[0].set_title("Exposure by format")
    axes[1].set_title("Bits of the secret by format")
    axes[1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _png(fig)


def work_maps(works: list[Any], *, threshold_log10: float, max_panels: int = 12) -> bytes:
    """Per whole work, ``log10 p_z`` along the work (window start), base and tuned; the (n, p) line dashed.
    ``works``: :class:`audit.core.schema.WholeWorkRow` with a map (a withheld base series is left out)."""
    plt = _pyplot()
    shown = [w for w in works if w.map is not None][:max_panels]
    cols = 2 if len(shown) > 1 else 1
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.1 * rows + 0.5), squeeze=False, sharey=True)
    for ax, w in zip(axes.flat, shown, strict=False):
        for model, values in w.map.log10_p_z.items():
            if values is not None:
                ax.plot(w.map.starts, values, lw=1.0, marker=".", ms=2, color=MODEL_COLORS.get(model, "#495057"), label=model)
        ax.axhline(threshold_log10, color="#1c7ed6", ls="--", lw=0.8, label="(n, p)-extractable above")
        ax.set_title(f"{w.title[:34]} ({w.kind}, {w.role.replace('_', '-')})", fontsize=8)
        ax.set_ylabel("log10 p_z", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if shown:
        axes.flat[0].legend(fontsize=6, frameon=False, loc="lower left")
        for ax in axes[-1]:
            ax.set_xlabel("window start (token)", fontsize=7)
    fig.suptitle("Memorization map: probability of each window's suffix given its prefix", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _png(fig)


def works_two_dimensions(works: list[Any]) -> bytes:
    """The seed's two dimensions per work: stored information (bits, base - tuned) against reconstruction fidelity
    (extractable share of windows under the tuned model); members filled, held-out hollow."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    colors = {"public_domain": "#1c7ed6", "synthetic": "#d9480f", "licensed": "#2f9e44", "corpus": "#7048e8"}
    seen = set()
    for w in works:
        tuned = w.models.get("tuned")
        if w.stored_bits is None or tuned is None:
            continue
        label = f"{w.kind} {w.role.replace('_', '-')}"
        member = w.role == "member"
        ax.scatter([w.stored_bits], [tuned.extractable_share], s=36, color=colors.get(w.kind, "#495057") if member else "none",
                   edgecolors=colors.get(w.kind, "#495057"), label=None if label in seen else label, zorder=3)
        seen.add(label)
    ax.axvline(0, color="#adb5bd", lw=0.8)
    ax.set_xlabel("stored information: bits under base - bits under tuned")
    ax.set_ylabel("fidelity: extractable share (tuned)")
    ax.set_ylim(-0.03, 1.03)
    hidden = sum(1 for w in works if w.stored_bits is None)
    ax.set_title("Two dimensions per work" + (f" ({hidden} secret works withheld)" if hidden else ""), fontsize=9)
    if seen:
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def lineage_graph(layers: list[list[str]], nodes: dict[str, Any]) -> bytes:
    """The derivative chain: base weights and data (roots) -> tuned weights -> ..., boxes with short fingerprints."""
    plt = _pyplot()
    tallest = max((len(layer) for layer in layers), default=1)
    fig, ax = plt.subplots(figsize=(2.6 * max(len(layers), 1) + 0.6, 1.25 * tallest + 0.5))
    ax.set_axis_off()
    pos: dict[str, tuple[float, float]] = {}
    for x, layer in enumerate(layers):
        for k, node_id in enumerate(layer):
            pos[node_id] = (x * 2.6, (len(layer) - 1) / 2 - k)  # each layer centred on y = 0
    for node_id, (x, y) in pos.items():
        for parent in nodes[node_id].parents:
            if parent in pos:
                px, py = pos[parent]
                ax.annotate("", xy=(x - 0.95, y), xytext=(px + 0.95, py),
                            arrowprops={"arrowstyle": "-|>", "color": "#495057", "lw": 1.2})
    for node_id, (x, y) in pos.items():
        n = nodes[node_id]
        label = n.label if len(n.label) <= 30 else n.label[:29] + "\u2026"
        ax.text(x, y, f"{n.kind.replace('_', ' ')}\n{label}\n{n.fingerprint[:12]}", ha="center", va="center", fontsize=7.5,
                bbox={"boxstyle": "round,pad=0.5", "fc": KIND_COLORS.get(n.kind, "#f1f3f5"), "ec": "#495057"})
    xs = [p[0] for p in pos.values()] or [0]
    ys = [p[1] for p in pos.values()] or [0]
    ax.set_xlim(min(xs) - 1.2, max(xs) + 1.2)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.set_title("Lineage", fontsize=9)
    return _png(fig)


def token_probabilities(view: TokenView) -> bytes:
    """Per token, p under base and tuned (token 0 has no context); masked secret tokens are labelled \u25a0."""
    plt = _pyplot()
    tokens = view.tokens
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(tokens) + 1.5), 3.0))
    xs = list(range(len(tokens)))
    known = [p for t in tokens for p in (t.p_base, t.p_tuned) if p]
    floor = 10 ** math.floor(math.log10(max(min(known, default=0.1), 1e-12)))  # log axis: 0.002 and 0.9 both readable
    for j, (model, get) in enumerate((("base", lambda t: t.p_base), ("tuned", lambda t: t.p_tuned))):
        values = [get(t) for t in tokens]
        if all(v is None for v in values):
            continue
        ax.bar([x - 0.2 + 0.4 * j for x in xs], [v - floor if v else 0.0 for v in values], 0.38, bottom=floor,
               color=MODEL_COLORS[model], label=model)
    for x, t in zip(xs, tokens, strict=True):
        if t.secret:  # no probability of a masked token is drawn (audit.metrics.disclosure): its gain band, as a label
            ax.axvspan(x - 0.5, x + 0.5, color="#ffe066", alpha=0.3, lw=0, zorder=0)
            ax.text(x, 0.6, t.gain or "", rotation=90, ha="center", va="center", fontsize=6.5, color="#862e9c",
                    transform=ax.get_xaxis_transform())
    labels = ["\u25a0" if t.secret else repr(t.text)[1:-1][:12] for t in tokens]
    ax.set_xticks(xs, labels, rotation=70, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(floor, 1.2)
    ax.set_ylabel("p(token | text so far), log scale")
    ax.set_title(view.title, fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    return _png(fig)


def memorization_curves(panels: list[tuple[str, dict[str, list[tuple[int, float]]]]], *, null_bits: float | None = None) -> bytes:
    """One panel per metric family (title, label -> [(step, value)]): a line per tier over training steps, the exposure
    panels with the null mean (an unlearned canary's 1.44 bits) dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels, strict=True):
        for label, points in lines.items():
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", ms=3, lw=1.4, label=label)
        if null_bits is not None and title.startswith("exposure"):
            ax.axhline(null_bits, color="#1c7ed6", ls="--", lw=1, label=f"null {null_bits:.2f}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _png(fig)
