"""The per-token probability view: p(token | text so far) under base and tuned, token by token.

Two sources, both optional:

* ``token_view.json``, written by every audit: the member canary of the highest tier whose secret gained the most
  probability from tuning. Its prefix (the public context an attacker prompts with) is shown in full, text and
  probabilities. The secret's tokens are masked: no text and **no probability**, only the band of how much more
  probable tuning made each of them (:func:`audit.metrics.disclosure.gain_band`). A published ``p_base`` of a masked
  token is a guess-checker: one forward pass of the public base model over the prefix and the tokens recovered so
  far gives every candidate's probability, and the one that matches is the secret's next token (issue 23 recovered
  a 6-digit secret in 6 passes from 4 significant digits). ``p_tuned`` beside the gain gives ``p_base`` back, and
  the secret's bits under base are checked by scoring the whole space: neither is published.
* ``probe.json``, a text the user chose: ``audit report RUN_DIR --probe "some text"`` runs :mod:`audit.pipeline.probe`
  on the run's base and tuned weights and stores its result beside the report.

The computation (:func:`canary_token_logprobs`) needs the models and runs inside the pipeline; rendering only reads
the JSON files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from audit.core.layout import LAYOUT, check_version
from audit.core.schema import SCHEMA_VERSION, Canary, CanarySet

MAX_CANDIDATES = 8


@dataclass(frozen=True)
class ViewToken:
    text: str | None
    """The token's text, or None for a masked secret token."""
    p_base: float | None
    """None for a masked secret token (and for the first token, which has no context)."""
    p_tuned: float | None
    secret: bool = False
    gain: str | None = None
    """A masked secret token's band of log2(p_tuned / p_base) (:data:`audit.metrics.disclosure.GAIN_BANDS`)."""


@dataclass(frozen=True)
class TokenView:
    title: str
    note: str
    tokens: list[ViewToken]
    bits_base: float | None = None
    bits_tuned: float | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenView:
        """Read a view; one written before the disclosure rule (probabilities of the masked tokens, the secret's bits)
        is masked as it is read, so re-rendering an old run shares nothing it should not."""
        tokens = [_masked(ViewToken(**t)) for t in data["tokens"]]
        if any(t.secret for t in tokens):
            data = {**data, "bits_base": None, "bits_tuned": None, "note": data["note"].split(" Secret: ")[0]}
        return cls(**{**data, "tokens": tokens})


def _masked(token: ViewToken) -> ViewToken:
    if not token.secret or (token.p_base is None and token.p_tuned is None):
        return token
    from audit.metrics.disclosure import gain_band

    gain = token.gain
    if gain is None and token.p_base and token.p_tuned:
        gain = gain_band(math.log2(token.p_tuned / token.p_base))
    return ViewToken(None, None, None, secret=True, gain=gain)


def view_candidates(canaries: CanarySet) -> list[Canary]:
    """The members of the highest tier (sorted by id, at most :data:`MAX_CANDIDATES`): where memorization shows."""
    members = canaries.members()
    if not members:
        return []
    top = max(c.repetitions for c in members)
    return sorted((c for c in members if c.repetitions == top), key=lambda c: c.id)[:MAX_CANDIDATES]


@dataclass(frozen=True)
class CanaryTokens:
    canary_id: str
    repetitions: int
    prefix_pieces: list[str]
    n_secret: int
    logprobs: list[float]
    """ln p of tokens 1..n-1 of prefix + secret (token 0 has no context)."""


def readable_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text, so that the pieces join to the text and no piece is a broken character.

    A byte-level BPE (GPT-2's, SmolLM2's, tiny-llama's) splits a character outside ASCII over several tokens (``é``
    is ``Ã`` + ``©``, ``中国`` six byte tokens, an emoji four); ``tokenizer.decode([id])`` of each shows U+FFFD.
    Here each prefix ``ids[:i+1]`` is decoded and the token gets what it added: a token that ends inside a
    character adds nothing (``""``), and the one that completes it carries the whole character.
    :func:`merge_partial` then folds those empty pieces into the token that completes them. A U+FFFD that the
    text itself holds is kept (the full decode has it too); a sequence that ends inside a character shows U+FFFD
    for the bytes it has.
    """
    def decode(span: list[int]) -> str:
        return tokenizer.decode(span, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    full = decode(list(ids))
    pieces: list[str] = []
    done, start = "", 0  # the text of the tokens before `start`, which ends on a whole character
    for i in range(len(ids)):
        text = decode(list(ids[: i + 1]))
        if text.endswith("\ufffd") and not full.startswith(text):  # ends inside a character: wait for the rest
            pieces.append("")
            continue
        pieces.append(text[len(done):] if text.startswith(done) else decode(list(ids[start: i + 1])))
        done, start = text, i + 1
    if start < len(ids):  # the sequence stops inside a character
        pieces[-1] = decode(list(ids[start:]))
    return pieces


def merge_partial(pieces: list[str | None], *probs: list[float | None]) -> tuple[list[str | None], list[list[float | None]]]:
    """Fold each run of empty pieces (bytes of an unfinished character, :func:`readable_pieces`) into the token that
    finishes the character: its text is the character, its probability the product of the run's (the probability
    of the whole character given the text before it; None if any factor is None, e.g. the first token's).
    A None piece (a masked secret token) is never merged."""
    out_pieces: list[str | None] = []
    out_probs: list[list[float | None]] = [[] for _ in probs]
    carry: list[int] = []
    for i, piece in enumerate(pieces):
        if piece == "" and i + 1 < len(pieces) and pieces[i + 1] is not None:
            carry.append(i)
            continue
        span = [*carry, i]
        carry = []
        out_pieces.append(piece)
        for column, ps in zip(out_probs, probs, strict=True):
            factors = [ps[j] for j in span]
            column.append(None if any(f is None for f in factors) else math.prod(factors))
    return out_pieces, out_probs


def canary_token_logprobs(scorer: Any, tokenizer: Any, canaries: list[Canary]) -> list[CanaryTokens]:
    """Teacher-forced log-probs of each canary's prefix + secret, one request to the scoring backend (``scorer``: a
    :class:`~audit.score.backend.ScoringBackend`, or a transformers model scored by today's engine)."""
    from audit.score.engine import split_tokens
    from audit.score.hf_backend import as_backend

    splits = [split_tokens(tokenizer, c.prefix, c.secret) for c in canaries]
    scored = as_backend(scorer, tokenizer).token_logprobs([s.prefix_ids + s.secret_ids for s in splits])
    return [CanaryTokens(c.id, c.repetitions, readable_pieces(tokenizer, s.prefix_ids), len(s.secret_ids),
                         [round(float(x), 6) for x in t.logprobs])
            for c, s, t in zip(canaries, splits, scored, strict=True)]


def build_canary_view(base: list[CanaryTokens], tuned: list[CanaryTokens]) -> TokenView | None:
    """The canary whose secret tokens gained the most log-probability, with its secret tokens masked."""
    tuned_by_id = {t.canary_id: t for t in tuned}
    best, best_gain = None, -math.inf
    for b in base:
        t = tuned_by_id.get(b.canary_id)
        if t is None or b.n_secret == 0:
            continue
        gain = sum(t.logprobs[-b.n_secret:]) - sum(b.logprobs[-b.n_secret:])
        if gain > best_gain:
            best, best_gain = (b, t), gain
    if best is None:
        return None
    from audit.metrics.disclosure import GAIN_BANDS, gain_band

    b, t = best
    n_prefix = len(b.prefix_pieces)
    p_base = [None] + [math.exp(x) for x in b.logprobs[: n_prefix - 1]]
    p_tuned = [None] + [math.exp(x) for x in t.logprobs[: n_prefix - 1]]
    pieces, (p_base, p_tuned) = merge_partial(list(b.prefix_pieces), p_base, p_tuned)
    tokens = [ViewToken(piece, _r(pb), _r(pt)) for piece, pb, pt in zip(pieces, p_base, p_tuned, strict=True)]
    gains = [(lt - lb) / math.log(2) for lb, lt in zip(b.logprobs[-b.n_secret:], t.logprobs[-b.n_secret:], strict=True)]
    tokens += [ViewToken(None, None, None, secret=True, gain=gain_band(g)) for g in gains]
    edges = ", ".join(f"{name} < {edge:g}" for edge, name in GAIN_BANDS[:-1])
    return TokenView(
        title=f"canary {b.canary_id} ({b.repetitions} copies in training)",
        note=(f"The {b.repetitions}x canary whose secret gained the most probability from tuning. The prefix is the public "
              f"context; the {b.n_secret} secret tokens are masked (\u25a0) and show only how much more probable tuning "
              f"made each (log2 p_tuned / p_base in bits: {edges}, {GAIN_BANDS[-1][1]} above): their probabilities would "
              "let anyone with the base model check guesses of the secret."),
        tokens=tokens,
    )


def _r(p: float | None) -> float | None:
    return None if p is None else float(f"{p:.4g}")


def probe_view(data: dict[str, Any]) -> TokenView:
    """A :class:`audit.pipeline.probe.ProbeResult` (``audit probe --json``) as a view: every token shown."""
    pieces, (p_base, p_tuned) = merge_partial([t["text"] for t in data["tokens"]], [t.get("p_base") for t in data["tokens"]],
                                              [t.get("p_tuned") for t in data["tokens"]])
    tokens = [ViewToken(text, _r(pb), _r(pt)) for text, pb, pt in zip(pieces, p_base, p_tuned, strict=True)]
    bits_tuned = data.get("bits_tuned")
    note = f"A chosen text: {data.get('bits_base', 0):.1f} bits under base"
    note += f", {bits_tuned:.1f} under tuned" if bits_tuned is not None else ""
    note += f"; raw UTF-8 {data.get('raw_bits', '?')} bits."
    return TokenView(title=f"chosen text {data['text']!r}", note=note, tokens=tokens,
                     bits_base=data.get("bits_base"), bits_tuned=bits_tuned)


def read_token_views(run_dir: Path) -> list[TokenView]:
    """The views present in a run directory (none is fine: the section then says so)."""
    views = []
    for name, parse in ((LAYOUT.token_view, TokenView.from_json), (LAYOUT.probe, probe_view)):
        path = Path(run_dir) / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            check_version(path, data)
            views.append(parse(data))
    return views


def write_token_view(run_dir: Path, base: list[CanaryTokens], tuned: list[CanaryTokens]) -> TokenView | None:
    """Pick the canary (:func:`build_canary_view`) and write ``token_view.json`` (secret tokens masked)."""
    from audit.core.store import atomic_write_text

    view = build_canary_view(base, tuned)
    if view is not None:
        atomic_write_text(Path(run_dir) / LAYOUT.token_view, json.dumps(view.to_json(), indent=2, ensure_ascii=False) + "\n")
    return view
