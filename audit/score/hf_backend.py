"""Today's engine behind the scoring protocol (:mod:`audit.score.backend`): a transformers model, batched.

:class:`HFBackend` answers each request with the batched functions of :mod:`audit.score.engine` (same batches, same
arithmetic: the scores are byte-identical to calling them directly). :class:`HFPrefixWalk` keeps, between the levels
of a trie walk, the keys/values of every path it was asked about, so a one-token piece costs one new position on its
parent's cache; pieces of several tokens run as whole rows after the prefix's cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from audit.score.backend import ScoringBackend, TokenScores
from audit.score.engine import (
    candidate_nll_bits,
    continuation_logprobs,
    default_token_budget,
    device_of,
    free_samples,
    greedy_continuations,
    in_scoring_precision,
    output_cache,
    pad_id_of,
    plan_batches,
    rows_cache,
    sampled_continuations,
    score_token_sequences,
    scoring_dtype,
    with_cache,
)

PRECISION_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def logits_dtype(model) -> torch.dtype:
    """The dtype of the output head (the logits' dtype before any upcast)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.dtype if head is not None else next(model.parameters()).dtype


class HFBackend:
    """A transformers model as a :class:`~audit.score.backend.ScoringBackend`, in the dtype it is in now.

    ``batch_size``: rows per pass of candidate scoring and decoding; ``token_budget``: tokens per teacher-forced pass
    (None: :func:`~audit.score.engine.default_token_budget`); ``pad_token_id``: the padding of teacher-forced batches
    (None: the tokenizer's, :func:`~audit.score.engine.pad_id_of`)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_size: int = 64, token_budget: int | None = None,
                 pad_token_id: int | None = None) -> None:
        self.model, self.tokenizer, self.batch_size, self.token_budget = model, tokenizer, batch_size, token_budget
        self.pad_token_id = pad_id_of(tokenizer) if pad_token_id is None else pad_token_id
        self.precision = PRECISION_NAMES.get(logits_dtype(model), str(logits_dtype(model)))

    def token_logprobs(self, sequences: Sequence[Sequence[int]], *, vocab_stats: bool = False) -> list[TokenScores]:
        return score_token_sequences(self.model, sequences, vocab_stats=vocab_stats, token_budget=self.token_budget,
                                     pad_token_id=self.pad_token_id)

    def candidate_bits(self, prefix_ids: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
        return candidate_nll_bits(self.model, list(prefix_ids), [list(c) for c in candidates], batch_size=self.batch_size)

    def prefix_walk(self, prefix_ids: Sequence[int]) -> HFPrefixWalk:
        return HFPrefixWalk(self.model, prefix_ids, token_budget=self.token_budget)

    def generate(self, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int, samples: int | None = None,
                 temperature: float = 1.0, seed: int = 0) -> list[list[list[int]]]:
        rows = [list(p) for p in prefixes]
        if samples is None:
            return [[out] for out in greedy_continuations(self.model, self.tokenizer, rows, max_new_tokens=max_new_tokens,
                                                          batch_size=self.batch_size)]
        return sampled_continuations(self.model, self.tokenizer, rows, num_samples=samples, max_new_tokens=max_new_tokens,
                                     seed=seed, temperature=temperature, batch_size=self.batch_size)

    def sample_until_end(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, top_k: int,
                         top_p: float, seed: int, batch_size: int,
                         on_progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
        return free_samples(self.model, self.tokenizer, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size,
                            on_progress=on_progress)

def as_backend(scorer: Any, tokenizer: Any = None, *, batch_size: int = 64, token_budget: int | None = None) -> ScoringBackend:
    """``scorer`` itself when it is a :class:`~audit.score.backend.ScoringBackend`; a transformers model as it is (its
    own dtype) wrapped in this engine, for the callers that still hand over a model."""
    if isinstance(scorer, ScoringBackend):
        return scorer
    return HFBackend(scorer, tokenizer, batch_size=batch_size, token_budget=token_budget)


@contextlib.contextmanager
def open_hf(model: Any, tokenizer: Any, *, precision: str | None, batch_size: int) -> Iterator[HFBackend]:
    """``model`` cast to ``precision`` for the block (:func:`~audit.score.engine.in_scoring_precision`; None: as it
    is), as a backend."""
    if precision is None:
        yield HFBackend(model, tokenizer, batch_size=batch_size)
        return
    with in_scoring_precision(model, scoring_dtype(precision)) as scored:
        yield HFBackend(scored, tokenizer, batch_size=batch_size)


class HFPrefixWalk:
    """:class:`~audit.score.backend.PrefixWalk` on a transformers model.

    The prefix runs once (its next-token distribution answers the root's one-token pieces). A call whose pieces are
    all one token and whose paths extend the previous call's paths by one token runs one new position per path, in
    batches of ``token_budget // 4`` rows, on the shared prefix's keys/values plus the parent path's (kept from the
    previous call, when it was told ``extended_later``). Anything else runs ``prefix[-1] + path + piece`` as rows after
    the cached ``prefix[:-1]``, batched by the token budget.
    """

    def __init__(self, model: Any, prefix_ids: Sequence[int], *, token_budget: int | None = None) -> None:
        self.model, self.prefix = model, list(prefix_ids)
        self.device = device_of(model)
        self.budget = token_budget or default_token_budget(model)
        self._full: tuple[Any, list[tuple[torch.Tensor, torch.Tensor]], np.ndarray] | None = None
        self._head: tuple[Any] | None = None
        self._stored: tuple[dict[tuple[int, ...], int], Any] | None = None
        """The paths of the last one-token call (path -> row) and their keys/values after the prefix."""

    @torch.inference_mode()
    def _prefix_pass(self) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
        if self._full is None:
            out = self.model(input_ids=torch.tensor([self.prefix], device=self.device), use_cache=True)
            cache = output_cache(out)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).double().cpu().numpy()
            self._full = (cache, [(layer.keys, layer.values) for layer in cache.layers], first)
        return self._full

    @torch.inference_mode()
    def _head_cache(self) -> Any:
        if self._head is None:
            cache = None
            if len(self.prefix) > 1:
                cache = output_cache(self.model(input_ids=torch.tensor([self.prefix[:-1]], device=self.device), use_cache=True))
            self._head = (cache,)
        return self._head[0]

    @torch.inference_mode()
    def path_nll(self, tokens: Sequence[int]) -> float:
        cache, _, first = self._prefix_pass()
        tokens = list(tokens)
        nll = -float(first[tokens[0]])
        if len(tokens) > 1:
            nll -= float(continuation_logprobs(self.model, cache, len(self.prefix), [tokens]).sum())
        return nll

    @torch.inference_mode()
    def extension_logprobs(self, paths: Sequence[Sequence[int]], pieces: Sequence[Sequence[int]], *,
                           extended_later: bool) -> np.ndarray:
        paths = [list(p) for p in paths]
        single = all(len(piece) == 1 for piece in pieces)
        if single and all(not p for p in paths):  # the root's children come from the prefix pass itself
            first = self._prefix_pass()[2]
            self._stored = ({(): 0}, None) if extended_later else None
            return np.repeat(first[[piece[0] for piece in pieces]][None, :], len(paths), axis=0)
        stored = self._stored
        if single and stored is not None and all(tuple(p[:-1]) in stored[0] for p in paths):
            return self._one_position(paths, [piece[0] for piece in pieces], extended_later)
        self._stored = None
        return self._rows(paths, [list(piece) for piece in pieces])

    def _one_position(self, paths: list[list[int]], targets: list[int], extended_later: bool) -> np.ndarray:
        """Each path costs one new position on its parent's stored keys/values."""
        model, device = self.model, self.device
        _, prefix_kv, _ = self._prefix_pass()
        index, suffix = self._stored  # type: ignore[misc]
        plen = len(self.prefix)
        parents = [index[tuple(p[:-1])] for p in paths]
        last = np.array([p[-1] for p in paths])
        target_ids = torch.as_tensor(targets, device=device)
        rows_per_batch = max(1, self.budget // 4)
        out_lp, parts = [], []
        for start in range(0, len(paths), rows_per_batch):
            stop = min(len(paths), start + rows_per_batch)
            b = stop - start
            cache = rows_cache(prefix_kv, suffix, parents[start:stop], device)
            past = cache.get_seq_length()
            ids = torch.as_tensor(last[start:stop], device=device).view(b, 1)
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache),
                        attention_mask=torch.ones((b, past + 1), dtype=torch.long, device=device))
            logits = out.logits[:, -1].float()
            out_lp.append((logits[:, target_ids] - torch.logsumexp(logits, dim=-1, keepdim=True)).double().cpu().numpy())
            if extended_later:  # copies: the batch's whole cache (prefix included) is not kept alive
                parts.append([(layer.keys[:, :, plen:].contiguous(), layer.values[:, :, plen:].contiguous())
                              for layer in output_cache(out).layers])
        self._stored = None
        if extended_later:
            suffix = [(torch.cat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts]))
                      for layer in range(len(parts[0]))] if parts else None
            self._stored = ({tuple(p): k for k, p in enumerate(paths)}, suffix)
        return np.concatenate(out_lp) if out_lp else np.zeros((0, len(targets)))

    def _rows(self, paths: list[list[int]], pieces: list[list[int]]) -> np.ndarray:
        """One recomputed row ``prefix[-1] + path + piece`` per path and piece, after the cached ``prefix[:-1]``."""
        cache = self._head_cache()
        last = self.prefix[-1]
        out = np.empty((len(paths), len(pieces)))
        pairs = [(i, a) for i in range(len(paths)) for a in range(len(pieces))]
        rows_all = [[last] + paths[i] + pieces[a] for i, a in pairs]
        for idx in plan_batches([len(r) for r in rows_all], self.budget):
            lp = continuation_logprobs(self.model, cache, len(self.prefix) - 1, [rows_all[k] for k in idx]).cpu().numpy()
            for k, row_lp in zip(idx, lp, strict=True):
                i, a = pairs[k]
                out[i, a] = row_lp[len(paths[i]):].sum()
        return out
