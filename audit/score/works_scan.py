"""The whole-work window scan: every ``prefix + suffix`` window of each work, scored teacher-forced, batched.

What the scan needs from a model is one thing, a :data:`TokenScorer`: for given token sequences, the per-token
log-probability of each next token and whether it is the argmax. :func:`backend_scorer` asks any scoring backend
(:mod:`audit.score.backend`) for it, without the vocabulary statistics (today's HF engine reduces the vocabulary on the
device: only the chosen token's log-probability and the argmax flag come back, never the logits of a whole work).
Another engine (vLLM, a GGUF reader) is a new backend, not a change here.

Windows all have the same length, so a batch carries no padding. Each window is scored alone (no context before its
start), as Cooper et al. 2025 define p_z; :mod:`audit.metrics.whole_works` turns the per-token numbers into ``ln p_z``,
the greedy flag and the code length each window owns. One row per work, model and window goes to
``works_scan.jsonl`` (:class:`audit.core.schema.WorkWindow`), from which every per-work number can be recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from audit.core.schema import WorkWindow
from audit.metrics.whole_works import code_bits_per_window, suffix_greedy, suffix_logp_z, window_starts
from audit.score.backend import ScoringBackend

TokenScorer = Callable[[list[list[int]]], list[tuple[np.ndarray, np.ndarray]]]
"""Token sequences -> per sequence ``(logprobs, top1)``: ``logprobs[j] = ln p(seq[j + 1] | seq[: j + 1])`` and
``top1[j]`` whether ``seq[j + 1]`` is that step's argmax (``len(seq) - 1`` entries each)."""
WINDOWS_PER_CALL = 512
"""Windows handed to the scorer at once (it batches them by its own token budget): bounds the host memory of one call."""


def backend_scorer(backend: ScoringBackend) -> TokenScorer:
    """The :data:`TokenScorer` of a scoring backend: its per-token log-probabilities and argmax flags."""

    def score(sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(s.logprobs, s.top1) for s in backend.token_logprobs(sequences, vocab_stats=False)]

    return score


def engine_scorer(model, *, pad_token_id: int = 0, token_budget: int | None = None) -> TokenScorer:
    """The :data:`TokenScorer` of a transformers model as it is, through today's engine (:func:`backend_scorer`)."""
    from audit.score.hf_backend import HFBackend

    return backend_scorer(HFBackend(model, pad_token_id=pad_token_id, token_budget=token_budget))


@dataclass(frozen=True)
class ScanSettings:
    prefix: int
    suffix: int
    stride: int

    @property
    def width(self) -> int:
        return self.prefix + self.suffix


def scan_works(works: Sequence[tuple[str, Sequence[int]]], *, score: TokenScorer, model: str, settings: ScanSettings,
               windows_per_call: int = WINDOWS_PER_CALL, progress: Callable[[int, int], None] | None = None) -> list[WorkWindow]:
    """Rows of every window of every ``(work_id, token_ids)`` under ``score``, in work order then window order.

    Windows of all works are pooled into calls of ``windows_per_call`` (short works share a batch); per work only the
    chosen-token log-probabilities of its windows are kept until its rows are made."""
    width = settings.width
    plan = [(work_id, np.asarray(ids, dtype=np.int64),
             window_starts(len(ids), prefix=settings.prefix, suffix=settings.suffix, stride=settings.stride))
            for work_id, ids in works]
    flat = [(w, int(s)) for w, (_, _, starts) in enumerate(plan) for s in starts]
    logprobs = [np.empty((len(starts), width - 1)) for _, _, starts in plan]
    top1 = [np.empty((len(starts), width - 1), dtype=bool) for _, _, starts in plan]
    filled = [0] * len(plan)
    for a in range(0, len(flat), max(1, windows_per_call)):
        part = flat[a : a + windows_per_call]
        results = score([plan[w][1][s : s + width].tolist() for w, s in part])
        for (w, _), (lp, t1) in zip(part, results, strict=True):
            logprobs[w][filled[w]] = lp
            top1[w][filled[w]] = t1
            filled[w] += 1
        if progress is not None:
            progress(a + len(part), len(flat))
    rows: list[WorkWindow] = []
    for (work_id, ids, starts), lp, t1 in zip(plan, logprobs, top1, strict=True):
        logp = suffix_logp_z(lp, prefix=settings.prefix)
        greedy = suffix_greedy(t1, prefix=settings.prefix)
        bits, tokens = code_bits_per_window(starts, lp, len(ids))
        rows += [WorkWindow(work_id=work_id, model=model, start=int(s), logp_z=float(lz), p_z=math.exp(float(lz)),
                            greedy=bool(g), code_bits=float(b), code_tokens=int(k))
                 for s, lz, g, b, k in zip(starts, logp, greedy, bits, tokens, strict=True)]
    return rows
