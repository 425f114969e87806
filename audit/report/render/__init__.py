"""The human report: ``report.html`` (self-contained, plots embedded) and ``report.md`` (plots in ``plots/``).

    audit report runs/<run>                         # regenerate both from the run directory (no model, no rescoring)
    audit report runs/<run> --probe "some text"     # also add the per-token view of a text you choose

Built from the files a run leaves (``report.json``, ``scores.jsonl``, ``token_view.json``, ``probe.json``), so a
report can be re-rendered at any time, by anyone with the run directory; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from audit.core.layout import LAYOUT
from audit.core.schema import AuditReport

PLOTS_DIR = "plots"


@dataclass(frozen=True)
class RenderedReport:
    html: Path
    markdown: Path
    plots: list[Path]


def render_report(run_dir: Path, report: AuditReport | None = None) -> RenderedReport:
    """Write ``report.html``, ``report.md`` and ``plots/*.png`` into ``run_dir`` (atomically, file by file)."""
    from audit.core.store import atomic_write_text
    from audit.metrics.disclosure import redact_report
    from audit.report import read_report
    from audit.report.render.document import build_document
    from audit.report.render.writers import to_html, to_markdown

    run_dir = Path(run_dir)
    if report is None:
        report = read_report(run_dir / LAYOUT.report)
    doc = build_document(redact_report(report), run_dir)  # a report from before the disclosure rule is held to it too
    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(exist_ok=True)
    written = []
    for image in doc.images():
        path = plots_dir / image.name
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(image.png)
        tmp.replace(path)
        written.append(path)
    for stale in plots_dir.glob("*.png"):  # a re-render with fewer views leaves no orphan plot behind
        if stale not in written:
            stale.unlink()
    atomic_write_text(run_dir / LAYOUT.html, to_html(doc))
    atomic_write_text(run_dir / LAYOUT.markdown, to_markdown(doc))
    for path in (run_dir / LAYOUT.html, run_dir / LAYOUT.markdown, *written):
        _shareable(path)
    return RenderedReport(run_dir / LAYOUT.html, run_dir / LAYOUT.markdown, written)


SHARED_MODE = 0o644
"""report.html, report.md and plots/ hold ids and numbers, never a secret: they are the files people share, so they
are readable like any document (the temporary file of an atomic write starts 0600). Secrets stay in the 0600 files
``canaries.jsonl`` and ``outputs.jsonl``."""


def _shareable(path: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    path.chmod(SHARED_MODE & ~umask)
