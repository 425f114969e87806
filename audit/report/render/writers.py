"""The document model of :mod:`audit.report.render.document` as one self-contained HTML file and as Markdown.

HTML: inline CSS, plots embedded as base64 PNG, no script and no external resource, so it opens anywhere (mail
attachment, air-gapped reviewer) and renders the same. Markdown: the same sections, plots linked from ``plots/``.
"""

from __future__ import annotations

import base64
import html
import re

from audit.report.render.document import Code, Details, Document, Image, Tokens, Verdict
from audit.report.render.token_view import TokenView
from audit.report.render.views import Table

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#212529;margin:0;background:#f8f9fa}
main{max-width:1040px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #dee2e6;padding-bottom:4px}
.sub{color:#6c757d;margin:0 0 16px} nav a{margin-right:12px;font-size:13px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:10px 0;font-size:12.5px} \
th,td{border:1px solid #dee2e6;padding:3px 8px;text-align:left;vertical-align:top;\
overflow-wrap:normal;word-break:normal;hyphens:none}
td.hash{word-break:break-all;min-width:12ch} td.num,td[class^=status-]{white-space:nowrap}
th{background:#f1f3f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#495057;font-size:12.5px;margin:4px 0}
.verdict{border-radius:6px;padding:12px 16px;margin:10px 0;border:1px solid}
.verdict.pass{background:#ebfbee;border-color:#8ce99a} .verdict.fail{background:#fff5f5;border-color:#ffa8a8}
.verdict.none{background:#f1f3f5;border-color:#ced4da} .verdict h3{margin:0 0 6px;font-size:17px}
.verdict ul{margin:4px 0 0 18px;padding:0} .verdict p.meaning{margin:6px 0 0}
img.plot{max-width:100%;display:block;margin:8px 0}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:2.1;white-space:pre-wrap}
.tok{padding:2px 1px;border-radius:3px} .tok.secret{outline:1px dashed #e67700}
pre{background:#f1f3f5;padding:8px;overflow:auto;font-size:12px} code{background:#f1f3f5;padding:0 3px;border-radius:3px}
details{margin:8px 0} summary{cursor:pointer;font-weight:600}
.status-PASS{color:#2b8a3e;font-weight:600} .status-FAIL{color:#c92a2a;font-weight:600} .status-SKIP{color:#868e96}
"""
_NUMBER = re.compile(r"^-?[\d.]+( \[.*\])?$|^\d+/\d+$")
_HASH = re.compile(r"^[0-9a-f]{24,}$")
_KEY = re.compile(r"^[\w.%]+(/[\w.%]+)+$")
"""A metric key (``exposure.mean/rep_16/tuned``): may wrap after a ``/``, never inside a segment."""


def _inline(text: str) -> str:
    """Escape, then `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = []
    for row in t.rows:
        cells = []
        for cell in row:
            cls = ' class="num"' if _NUMBER.match(cell) else ' class="hash"' if _HASH.match(cell) else ""
            if cell in ("PASS", "FAIL", "SKIP"):
                cls = f' class="status-{cell}"'
            text = "/<wbr>".join(html.escape(part) for part in cell.split("/")) if _KEY.match(cell) else html.escape(cell)
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f'<p class="note">{_inline(n)}</p>' for n in t.notes)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{notes}'


def _prob_color(p: float | None) -> str:
    """White (p ~ 0) to orange (p ~ 1)."""
    if p is None:
        return "#f1f3f5"
    lightness = 97 - 45 * max(0.0, min(1.0, p))
    return f"hsl(28,95%,{lightness:.0f}%)"


GAIN_COLORS = {"none": "#f1f3f5", "small": "#ffe8cc", "large": "#ffa94d", "very large": "#e8590c"}
"""A masked secret token's colour: its gain band (:func:`audit.metrics.disclosure.gain_band`), never a probability."""


def _tokens_html(view: TokenView) -> str:
    spans = []
    for t in view.tokens:
        if t.secret:
            text, cls, colour = "\u25a0", "tok secret", GAIN_COLORS.get(t.gain or "", "#f1f3f5")
            title = f"secret token (masked): gain under tuning {t.gain or '-'}"
        else:
            text, cls, colour = t.text or "", "tok", _prob_color(t.p_tuned)
            title = f"p base {t.p_base if t.p_base is not None else '-'}, p tuned {t.p_tuned if t.p_tuned is not None else '-'}"
        spans.append(f'<span class="{cls}" style="background:{colour}" title="{html.escape(title)}">{html.escape(text)}</span>')
    return (f"<h3>{html.escape(view.title)}</h3><p class=\"note\">{_inline(view.note)} Colour: probability under the "
            "tuned model (white 0, orange 1; hover a token for both); a masked secret token is coloured by its gain band "
            f"(grey none, light small, orange large, dark very large).</p><div class=\"tokens\">{''.join(spans)}</div>")


def _block_html(block: object) -> str:
    if isinstance(block, str):
        return f"<p>{_inline(block)}</p>"
    if isinstance(block, Table):
        return _table_html(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return f'<img class="plot" alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
    if isinstance(block, Tokens):
        return _tokens_html(block.view)
    if isinstance(block, Details):
        return (f"<details><summary>{html.escape(block.summary)}</summary>"
                f"{''.join(_block_html(b) for b in block.blocks)}</details>")
    if isinstance(block, Verdict):
        v = block.verdict
        items = "".join(f"<li>{_inline(f)}</li>" for f in v.findings)
        meaning = f'<p class="meaning">{_inline(v.meaning)}</p>' if v.meaning else ""
        return (f'<div class="verdict {v.status}" id="verdict-box"><h3>{html.escape(v.headline)}</h3>'
                f"{meaning}<ul>{items}</ul></div>")
    if isinstance(block, Code):
        return f"<pre>{html.escape(block.text)}</pre>"
    raise TypeError(f"unknown block {type(block).__name__}")


def to_html(doc: Document) -> str:
    nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in doc.sections)
    body = "".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{"".join(_block_html(b) for b in s.blocks)}</section>'
                   for s in doc.sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head>"
            f"<body><main><h1>{html.escape(doc.title)}</h1><p class=\"sub\">{html.escape(doc.subtitle)}</p>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")


# ------------------------------------------------------------------------------------------------ Markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table_md(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) or " " for h in t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + "".join(f"\n\n{n}" for n in t.notes)


def _tokens_md(view: TokenView) -> str:
    masked = any(t.secret for t in view.tokens)
    rows = [["\u25a0 (secret)" if t.secret else repr(t.text), "-" if t.p_base is None else f"{t.p_base:.4g}",
             "-" if t.p_tuned is None else f"{t.p_tuned:.4g}", *([(t.gain or "-") if t.secret else ""] if masked else [])]
            for t in view.tokens]
    header = ["token", "p base", "p tuned", *(["secret gain"] if masked else [])]
    return f"### {view.title}\n\n{view.note}\n\n" + _table_md(Table(header, rows))


def _block_md(block: object) -> str:
    if isinstance(block, str):
        return block
    if isinstance(block, Table):
        return _table_md(block)
    if isinstance(block, Image):
        return f"![{block.alt}](plots/{block.name})"
    if isinstance(block, Tokens):
        return _tokens_md(block.view)
    if isinstance(block, Details):
        return (f"<details><summary>{block.summary}</summary>\n\n" + "\n\n".join(_block_md(b) for b in block.blocks)
                + "\n\n</details>")
    if isinstance(block, Verdict):
        v = block.verdict
        return f"**{v.headline}**\n\n" + (f"{v.meaning}\n\n" if v.meaning else "") + "\n".join(f"- {f}" for f in v.findings)
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    raise TypeError(f"unknown block {type(block).__name__}")


def to_markdown(doc: Document) -> str:
    parts = [f"# {doc.title}", doc.subtitle]
    for s in doc.sections:
        parts.append(f"## {s.title}")
        parts.extend(_block_md(b) for b in s.blocks)
    return "\n\n".join(parts) + "\n"
