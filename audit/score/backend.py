"""The scoring protocol: everything a measurement asks of a model, whatever engine answers it.

In the spirit of lm-evaluation-harness's ``loglikelihood`` / ``generate_until``, a backend answers four requests:

* :meth:`ScoringBackend.token_logprobs`: per-token ``ln p(x_t | x_<t)`` of given token sequences, optionally with
  the full-vocabulary mean and variance of ``ln p`` that Min-K%++ needs (MIA signals, information, token views,
  the whole-work scan);
* :meth:`ScoringBackend.candidate_bits`: ``-log2 p(candidate | prefix)`` of many candidates after one shared prefix
  (the sampled rank against the reference secrets, calibration);
* :meth:`ScoringBackend.prefix_walk`: log-probabilities of chosen next pieces after a shared prefix, one level of a
  trie at a time (what the exact walk's levels ask, :mod:`audit.score.exposure_search`);
* :meth:`ScoringBackend.generate`: greedy or sampled continuations of a fixed length (discoverable and sampled
  extraction), and :meth:`ScoringBackend.sample_until_end`: free text until end-of-text (the generated-outputs stage).

``name`` and ``precision`` say who scored (``report.json``'s ``scored_by``). The callers (canary scoring, the exact
walk, calibration, the whole-work scan, curves) use nothing else, so a second engine (vLLM, a GGUF reader) is a new
module registered in :data:`BACKENDS`, not a branch through them. Today's engine is :mod:`audit.score.hf_backend`;
:mod:`audit.score.loop_backend` is a deliberately naive second one (one sequence at a time, no cache, no batching)
that the tests run the whole audit through.

This module imports no torch: the protocol is data in, numbers out.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TokenScores:
    """Teacher-forced scores of tokens 1..n-1 of one sequence (token 0 has no context and is not scored).

    ``logprobs[j]`` is ``ln p(token_ids[j + 1] | token_ids[: j + 1])``; ``vocab_mean``/``vocab_var`` are the mean and
    variance of ``ln p(v)`` over the vocabulary at that step (None when not requested); ``top1[j]`` is whether
    ``token_ids[j + 1]`` is the model's most likely token at that step.
    """

    token_ids: list[int]
    logprobs: np.ndarray
    vocab_mean: np.ndarray | None = None
    vocab_var: np.ndarray | None = None
    top1: np.ndarray | None = None

    def span(self, start: int, stop: int | None = None) -> TokenScores:
        """Scores of tokens ``token_ids[start:stop]`` (``start >= 1``), keeping ``token_ids`` whole."""
        if start < 1:
            raise ValueError("token 0 has no context; spans start at 1")
        a, b = start - 1, (len(self.token_ids) if stop is None else stop) - 1
        return TokenScores(self.token_ids, self.logprobs[a:b],
                           None if self.vocab_mean is None else self.vocab_mean[a:b],
                           None if self.vocab_var is None else self.vocab_var[a:b],
                           None if self.top1 is None else self.top1[a:b])

    @property
    def bits(self) -> float:
        return -float(np.sum(self.logprobs)) / LN2


class PrefixWalk(Protocol):
    """Log-probabilities of chosen pieces after one shared prefix, asked level by level (a trie walk).

    A backend may keep state between calls (the HF engine keeps each path's keys/values, so a one-token piece costs
    one new position); a simple one recomputes every row from scratch. Either way the numbers are the same function
    of the tokens: ``ln p(piece | prefix + path)``.
    """

    def path_nll(self, tokens: Sequence[int]) -> float:
        """``-ln p(tokens | prefix)`` in nats, teacher-forced (the exact walk's pruning threshold)."""
        ...

    def extension_logprobs(self, paths: Sequence[Sequence[int]], pieces: Sequence[Sequence[int]], *,
                           extended_later: bool) -> np.ndarray:
        """``[len(paths), len(pieces)]``: ``ln p(piece | prefix + path)`` for every path and piece (float64).

        ``extended_later``: whether a later call will ask about paths one piece longer than these (a backend that
        caches keeps these paths' state only then)."""
        ...


@runtime_checkable
class ScoringBackend(Protocol):
    """A model as the audit measures it; see the module docstring."""

    name: str
    """The engine (``hf``, ``loop``): a key of :data:`BACKENDS`."""
    precision: str
    """The dtype its logits are computed in (``fp32``, ``bf16``, ``fp16``)."""

    def token_logprobs(self, sequences: Sequence[Sequence[int]], *, vocab_stats: bool = False) -> list[TokenScores]:
        """One :class:`TokenScores` per sequence, in input order (``top1`` always, the vocabulary mean and variance
        with ``vocab_stats``)."""
        ...

    def candidate_bits(self, prefix_ids: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
        """``-log2 p(candidate | prefix)`` for each candidate token list (they may differ in length and repeat)."""
        ...

    def prefix_walk(self, prefix_ids: Sequence[int]) -> PrefixWalk:
        """A :class:`PrefixWalk` after ``prefix_ids``."""
        ...

    def generate(self, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int, samples: int | None = None,
                 temperature: float = 1.0, seed: int = 0) -> list[list[list[int]]]:
        """Exactly ``max_new_tokens`` new token ids per continuation (no stop at end-of-text), per prefix: one greedy
        continuation when ``samples`` is None, else ``samples`` drawn by ancestral sampling at ``temperature`` (no
        top-k, no top-p) from a private random stream seeded with ``seed``."""
        ...

    def sample_until_end(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, top_k: int,
                         top_p: float, seed: int, batch_size: int,
                         on_progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """One sampled text per prompt (repeat a prompt for more): new token ids, at most ``max_new_tokens``, cut before
        the first end-of-text, from a private random stream seeded with ``seed`` (``top_k`` 0 and ``top_p`` 1: off).
        ``batch_size``: prompts decoded together, where the engine batches; ``on_progress(tokens, texts)``: told as
        decoding moves (the generated-outputs stage's progress bar)."""
        ...


BACKENDS: dict[str, str] = {
    "hf": "audit.score.hf_backend:open_hf",
    "loop": "audit.score.loop_backend:open_loop",
}
"""``scoring.backend`` -> ``module:function`` opening it: ``function(model, tokenizer, *, precision, batch_size)``
(``precision`` None: the model's own dtype) is a context manager yielding a :class:`ScoringBackend` (imported on use:
no engine loads before it is asked for)."""


def check_backend(name: str) -> str:
    """``name`` if it is a registered backend, else an :class:`~audit.core.errors.AuditError` that suggests the closest."""
    if name in BACKENDS:
        return name
    from audit.core.errors import AuditError

    close = difflib.get_close_matches(name, list(BACKENDS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise AuditError(f"unknown scoring backend {name!r}", fix=f"{hint}scoring.backend is one of {', '.join(sorted(BACKENDS))}")


@contextlib.contextmanager
def open_backend(name: str, model: Any, tokenizer: Any, *, precision: str | None, batch_size: int) -> Iterator[ScoringBackend]:
    """The backend ``name`` scoring ``model`` in ``precision`` for the block (None: in the dtype the model is in)."""
    module, _, function = BACKENDS[check_backend(name)].partition(":")
    with getattr(importlib.import_module(module), function)(model, tokenizer, precision=precision,
                                                            batch_size=batch_size) as backend:
        yield backend
