"""``audit probe``: the probability of each token of a text under the base and the tuned model.

    audit probe                                                  # "Colorless green ideas sleep furiously" on SmolLM2
    audit probe "My PIN is 481927." --adapter runs/<run>         # base vs the run's tuned weights
    audit probe "some text" --model tiny-llama --adapter path/to/adapter --json

The classic check (Chomsky's sentence, a favourite of the language-modelling-as-compression view): a good model gives
" green" a low probability after "Colorless" and each next word of "Colorless green ideas sleep furiously" a low one
too, and a model tuned on the sentence gives them high ones. Per token it prints p(token | text so far); per word the
product over the word's tokens; and the bits of the whole text (sum of -log2 p) under each model beside its raw
UTF-8 size (:mod:`audit.metrics.information`). The first token has no context and gets no probability.

``--adapter`` takes a run directory (``runs/<id>``: its ``adapter/`` LoRA weights or ``model/`` full fine-tune, and
its recipe's base model when ``--model`` is not given), a PEFT adapter directory, or a model directory.
Weights load from safetensors only. For a LoRA adapter the base is the same module with the adapter disabled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from audit.core.errors import AuditError
from audit.core.layout import LAYOUT
from audit.metrics.information import utf8_bits

CLASSIC_TEXT = "Colorless green ideas sleep furiously"


@dataclass(frozen=True)
class ProbeToken:
    text: str
    p_base: float | None
    p_tuned: float | None


@dataclass(frozen=True)
class ProbeResult:
    text: str
    base_label: str
    tuned_label: str | None
    tokens: list[ProbeToken]
    words: list[ProbeToken]
    bits_base: float
    bits_tuned: float | None
    raw_bits: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TunedWeights:
    kind: str  # "adapter" | "model"
    path: Path
    base_source: str | None
    """The base model the run was tuned from (from its recipe), if known."""
    added_tokens: tuple[str, ...] = ()
    """Tokens the run's canary spec added to the vocabulary (``new_tokens``): the base gets them before the weights."""


def resolve_tuned(path: str) -> TunedWeights:
    """Find the tuned weights in a run directory, an adapter directory or a model directory."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise AuditError(f"--adapter {path} is not a directory",
                         fix="give a run directory (runs/<id>), a PEFT adapter directory or a model directory")
    base = None
    added: tuple[str, ...] = ()
    recipe_file = p / LAYOUT.recipe
    if recipe_file.is_file():
        import yaml

        from audit.data.canaries import added_tokens, load_spec

        recipe = yaml.safe_load(recipe_file.read_text()) or {}
        base = (recipe.get("model") or {}).get("source")
        canaries = recipe.get("canaries") or {}
        if canaries.get("spec"):
            added = tuple(added_tokens(load_spec(canaries["spec"], canaries.get("params"))))
    for candidate, kind in ((p / "adapter", "adapter"), (p / "model", "model"), (p, None)):
        if (candidate / "adapter_config.json").is_file():
            if not (candidate / "adapter_model.safetensors").is_file():
                raise AuditError(f"adapter {candidate} has no adapter_model.safetensors; pickle weights are refused",
                                 fix="save the adapter with safe_serialization=True")
            return TunedWeights("adapter", candidate, base, added)
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return TunedWeights("model", candidate, base, added)
        if kind is not None and candidate.is_dir():
            raise AuditError(f"{candidate} holds neither a PEFT adapter nor safetensors model weights",
                             fix="point --adapter at a finished run or at the weights directory itself")
    raise AuditError(f"no tuned weights found in {p} (no adapter/, model/, adapter_config.json or config.json)",
                     fix="give a run directory (runs/<id>), a PEFT adapter directory or a model directory")


def _token_probs(model, ids: list[int]) -> list[float | None]:
    from audit.score.hf_backend import as_backend

    scores = as_backend(model).token_logprobs([ids])[0]
    return [None] + [math.exp(lp) for lp in scores.logprobs.tolist()]


def _words(tokens: list[str], probs: list[float | None]) -> list[tuple[str, float | None]]:
    """Group tokens into words (a word starts at a token beginning with whitespace) and multiply their probabilities."""
    words: list[tuple[str, float | None]] = []
    for tok, p in zip(tokens, probs, strict=True):
        if words and not tok[:1].isspace():
            text, q = words[-1]
            words[-1] = (text + tok, None if q is None or p is None else q * p)
        else:
            words.append((tok, p))
    return words


def probe_text(text: str, *, model_source: str | None = None, adapter: str | None = None, progress: bool = False) -> ProbeResult:
    """Per-token and per-word probabilities of ``text`` under the base model and, with ``adapter``, the tuned one."""
    import torch
    from transformers.utils import logging as hf_logging

    from audit.data.models import load_model_and_tokenizer, resolve_model
    from audit.score.engine import adapter_disabled
    from audit.train.types import DeviceChoice, WeightsLayer
    from audit.train.weights import load_tuned

    hf_logging.disable_progress_bar()  # the probe prints a table; a weights-loading bar would only clutter it
    if not text:
        raise AuditError("the text to probe is empty", fix='pass a text, e.g. audit probe "Colorless green ideas"')
    tuned = resolve_tuned(adapter) if adapter else None
    source = model_source or (tuned.base_source if tuned else None) or "smollm2-135m"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32  # scored in fp32 on every device, like the audit (ScoringSection.precision)
    choice = DeviceChoice(device, "fp32", gradient_checkpointing=False)
    resolved = resolve_model(source, progress=progress)
    base_model, tokenizer = load_model_and_tokenizer(resolved.path, dtype=dtype, device=device,
                                                     added_tokens=tuned.added_tokens if tuned else ())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise AuditError(f"'{text}' is a single token; there is nothing to predict", fix="probe a text of two tokens or more")
    from audit.report.render.token_view import readable_pieces

    pieces = readable_pieces(tokenizer, ids)  # a character split over byte tokens is shown whole, on its last token
    p_tuned: list[float | None] | None = None
    if tuned is None:
        p_base = _token_probs(base_model, ids)
    elif tuned.kind == "adapter":
        peft_model = load_tuned(base_model, [WeightsLayer("lora", tuned.path)], device=choice)
        p_tuned = _token_probs(peft_model, ids)
        with adapter_disabled(peft_model) as m:
            p_base = _token_probs(m, ids)
    else:
        p_base = _token_probs(base_model, ids)
        p_tuned = _token_probs(load_tuned(base_model, [WeightsLayer("full", tuned.path)], device=choice), ids)

    def bits(ps: list[float | None]) -> float:
        return -sum(math.log2(p) for p in ps if p is not None)

    words_base = _words(pieces, p_base)
    words_tuned = _words(pieces, p_tuned) if p_tuned else [(w, None) for w, _ in words_base]
    return ProbeResult(
        text=text, base_label=source, tuned_label=str(tuned.path) if tuned else None,
        tokens=[ProbeToken(t, b, u) for t, b, u in zip(pieces, p_base, p_tuned or [None] * len(ids), strict=True)],
        words=[ProbeToken(w, b, u) for (w, b), (_, u) in zip(words_base, words_tuned, strict=True)],
        bits_base=bits(p_base), bits_tuned=bits(p_tuned) if p_tuned else None, raw_bits=utf8_bits(text),
    )


def _fmt(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.2e}"


def format_probe(result: ProbeResult) -> str:
    """Token table, word table and bits; the first token shows '-' (no context)."""
    cols = ["base"] + (["tuned"] if result.tuned_label else [])

    def table(title: str, rows: list[ProbeToken]) -> list[str]:
        width = max(len(title), *(len(repr(r.text)) for r in rows))
        out = [f"{title:<{width}}  " + "  ".join(f"{'p ' + c:>10}" for c in cols)]
        for r in rows:
            cells = [_fmt(r.p_base)] + ([_fmt(r.p_tuned)] if result.tuned_label else [])
            out.append(f"{repr(r.text):<{width}}  " + "  ".join(f"{c:>10}" for c in cells))
        return out

    head = f"probe {result.text!r}: base {result.base_label}" + (f", tuned {result.tuned_label}" if result.tuned_label else "")
    lines = [head, ""] + table("token", result.tokens) + [""] + table("word", result.words) + [""]
    bits = f"bits (sum of -log2 p after the first token): base {result.bits_base:.1f}"
    if result.bits_tuned is not None:
        saved = result.bits_base - result.bits_tuned
        bits += (f", tuned {result.bits_tuned:.1f}; base - tuned = {saved:+.1f} bits ("
                 + ("the tuned model finds this text more likely: bits it memorized or learned" if saved > 0 else
                    "the tuned model finds this text less likely than the base: nothing memorized") + ")")
    lines.append(bits + f"; raw UTF-8 {result.raw_bits}")
    return "\n".join(lines)
