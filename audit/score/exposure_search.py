"""Exact exposure rank over an enumerable secret space, by branch-and-bound over the candidate trie.

A secret is a sequence of symbols (a 6-digit PIN: 6 symbols from 0-9, |R| = 10^6). Its loss is a sum of
non-negative per-token terms, so the partial loss of a symbol prefix can only grow as symbols are appended. Walking
the trie of the space level by level from the canary's prefix, any branch whose partial loss already exceeds the
canary's full loss holds no secret that could rank ahead of it and is pruned. What is left at the last level is
exactly the set of secrets at least as likely as the canary, so

    rank = 1 + |{ r != canary : Px(r) <= Px(canary) }|        (the paper's convention, ties against the canary)

is exact, and the work grows with the canary's rank (and the near-misses along the way), not with |R|. Carlini et
al. 2019 (§4.2) use the same monotonicity for their shortest-path search; here each level's frontier is one batch
of forward passes after the prefix's shared key/value cache.

Requirements, checked before walking (:func:`symbol_tokens`):

* the tokenization is compositional: ``tok(prefix + render(r)) == prefix_ids + T_1(r_1) + ... + T_L(r_L)`` for a
  fixed token piece ``T_i(a)`` per position and symbol. Verified on the canary, every symbol at every position, and
  a seeded sample of random secrets; digit-splitting tokenizers (SmolLM2, Llama 3, the tiny test model) pass.
* a node budget: when the frontier would exceed it (an unlearned canary has rank ~|R|/2, so nothing prunes), the walk
  stops with ``status="budget_exceeded"`` and the caller falls back to the sampled rank with its binomial interval.

Numerics: the canary's loss is taken from the walk itself (the same batched arithmetic as every other leaf), and
pruning keeps a slack of ``slack_nats`` above the canary's teacher-forced loss, so batch-dependent rounding cannot
drop a secret that ties with it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from audit.rng import SeededStream
from audit.schema import SecretSpace
from audit.score.engine import (
    LN2,
    continuation_logprobs,
    default_token_budget,
    device_of,
    expand_cache,
    plan_batches,
    split_tokens,
    split_tokens_many,
)


class NotCompositionalError(ValueError):
    """The tokenizer does not split secrets of this space into fixed per-symbol pieces."""


@dataclass(frozen=True)
class SymbolTokens:
    """``tok(prefix + render(r)) == prefix_ids + pieces[0][r_0] + pieces[1][r_1] + ...`` for every secret r."""

    prefix_ids: list[int]
    pieces: list[list[list[int]]]
    """``pieces[i][a]``: the tokens of symbol ``a`` (an alphabet index) at position ``i``."""
    space_size: int
    checked_samples: int

    def tokens(self, symbols: list[int]) -> list[int]:
        return [t for i, a in enumerate(symbols) for t in self.pieces[i][a]]


def parse_secret(space: SecretSpace, secret: str) -> list[int]:
    """Alphabet indices of ``secret``'s symbols (the inverse of ``space.render``)."""
    index = {a: k for k, a in enumerate(space.alphabet)}
    if space.separator:
        parts = secret.split(space.separator)
    elif all(len(a) == 1 for a in space.alphabet):
        parts = list(secret)
    else:  # multi-character symbols without a separator: greedy longest match, checked below
        parts, rest = [], secret
        by_length = sorted(space.alphabet, key=len, reverse=True)
        while rest:
            sym = next((a for a in by_length if rest.startswith(a)), None)
            if sym is None:
                break
            parts.append(sym)
            rest = rest[len(sym):]
    if len(parts) != space.length or any(p not in index for p in parts) or space.render(parts) != secret:
        raise ValueError(f"the secret does not parse as {space.length} symbols of the space's alphabet")
    return [index[p] for p in parts]


def symbol_tokens(tokenizer, prefix: str, space: SecretSpace, secret: str, *, check_samples: int = 256,
                  seed: int = 0) -> SymbolTokens:
    """Per-position token pieces of every symbol, derived in the canary's context and verified (module docstring).

    Raises :class:`NotCompositionalError` when any check fails; the caller then uses the sampled rank.
    """
    canary = parse_secret(space, secret)
    head = split_tokens(tokenizer, prefix, secret).prefix_ids

    def secret_ids(symbols: list[str]) -> list[int]:
        s = split_tokens(tokenizer, prefix, space.render(symbols))
        if s.prefix_ids != head:
            raise NotCompositionalError("a secret's first token merges with the prefix differently from the canary's")
        return s.secret_ids

    pieces: list[list[list[int]]] = []
    done: list[int] = []
    for i in range(space.length):
        row = []
        for a in space.alphabet:
            ids = secret_ids([space.alphabet[c] for c in canary[:i]] + [a])
            if ids[: len(done)] != done or len(ids) == len(done):
                raise NotCompositionalError(f"symbol {a!r} at position {i} does not add its own tokens")
            row.append(ids[len(done):])
        pieces.append(row)
        done = done + row[canary[i]]
    table = SymbolTokens(prefix_ids=head, pieces=pieces, space_size=space.size, checked_samples=check_samples)
    rng = SeededStream(seed, "exposure:compositional-check")
    samples = [canary] + [[rng.below(len(space.alphabet)) for _ in range(space.length)] for _ in range(check_samples)]
    rendered = split_tokens_many(tokenizer, prefix, [space.render([space.alphabet[a] for a in sym]) for sym in samples])
    for sym, got in zip(samples, rendered, strict=True):
        if got.prefix_ids != head or got.secret_ids != table.tokens(sym):
            raise NotCompositionalError("a sampled secret tokenizes differently from its per-symbol pieces")
    return table


@dataclass(frozen=True)
class ExactRank:
    status: Literal["exact", "budget_exceeded"]
    rank: int | None
    """1 + secrets at least as likely as the canary; None when the budget ran out."""
    space_size: int
    canary_nll_bits: float
    nodes_evaluated: int
    """Trie nodes whose children were scored (each is one row of a forward pass)."""
    tokens_evaluated: int
    frontier: list[int] = field(default_factory=list)
    """Nodes kept after pruning, per level."""
    wall_s: float = 0.0

    @property
    def exposure(self) -> float | None:
        return None if self.rank is None else math.log2(self.space_size) - math.log2(self.rank)


def _next_token_logprobs(model, cache, cache_len: int, rows: list[list[int]], targets: torch.Tensor) -> torch.Tensor:
    """ln p of each of ``targets`` (K ids) at the last position of each equal-length row: (rows, K), float64."""
    device = device_of(model)
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    kwargs = {}
    if cache is not None:
        kwargs["past_key_values"] = expand_cache(cache, len(rows))
        kwargs["attention_mask"] = torch.ones((len(rows), cache_len + ids.shape[1]), dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=cache is not None, logits_to_keep=1, **kwargs).logits[:, -1].float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return (logits[:, targets] - lse).double()


@torch.inference_mode()
def exact_rank(model, table: SymbolTokens, canary: list[int], *, node_budget: int | None = 20_000, prune: bool = True,
               token_budget: int | None = None, slack_nats: float = 1e-3) -> ExactRank:
    """Rank of ``canary`` (alphabet indices) among all secrets of the space; see the module docstring.

    ``prune=False`` enumerates the whole trie (the exhaustive reference used in tests and benchmarks).
    """
    t0 = time.perf_counter()
    device = device_of(model)
    budget = token_budget or default_token_budget(model)
    prefix = table.prefix_ids
    cache = None
    if len(prefix) > 1:
        cache = model(input_ids=torch.tensor([prefix[:-1]], device=device), use_cache=True).past_key_values
    cache_len, last = len(prefix) - 1, prefix[-1]

    canary_tokens = table.tokens(canary)
    threshold = -float(continuation_logprobs(model, cache, cache_len, [[last] + canary_tokens]).sum())
    limit = threshold + slack_nats if prune else math.inf

    paths: list[list[int]] = [[]]
    nll = np.zeros(1)
    on_canary = np.array([True])
    nodes = tokens = 0
    frontier_sizes: list[int] = []
    n_sym = len(table.pieces[0])
    for level, pieces in enumerate(table.pieces):
        if node_budget is not None and nodes + len(paths) > node_budget:
            return ExactRank("budget_exceeded", None, table.space_size, threshold / LN2, nodes, tokens, frontier_sizes,
                             time.perf_counter() - t0)
        child_cost = np.empty((len(paths), n_sym))
        if all(len(p) == 1 for p in pieces):  # one row per node gives every child's cost
            targets = torch.tensor([p[0] for p in pieces], device=device)
            for idx in plan_batches([1 + len(paths[0])] * len(paths), budget):
                rows = [[last] + paths[i] for i in idx]
                child_cost[idx] = -_next_token_logprobs(model, cache, cache_len, rows, targets).cpu().numpy()
                tokens += len(rows) * len(rows[0])
        else:  # multi-token pieces: one row per child
            pairs = [(i, a) for i in range(len(paths)) for a in range(n_sym)]
            rows_all = [[last] + paths[i] + pieces[a] for i, a in pairs]
            for idx in plan_batches([len(r) for r in rows_all], budget):
                rows = [rows_all[k] for k in idx]
                lp = continuation_logprobs(model, cache, cache_len, rows).cpu().numpy()
                for k, row_lp in zip(idx, lp, strict=True):
                    i, a = pairs[k]
                    child_cost[i, a] = -row_lp[len(paths[i]):].sum()
                tokens += sum(len(r) for r in rows)
        nodes += len(paths)
        total = nll[:, None] + child_cost
        keep_i, keep_a = np.nonzero(total <= limit)
        canary_child = on_canary[keep_i] & (keep_a == canary[level])
        paths = [paths[i] + pieces[a] for i, a in zip(keep_i.tolist(), keep_a.tolist(), strict=True)]
        nll, on_canary = total[keep_i, keep_a], canary_child
        frontier_sizes.append(len(paths))
    if not on_canary.any():
        raise RuntimeError(f"the canary was pruned (its walk loss exceeded its teacher-forced loss {threshold:.6f} nats by "
                           f"more than slack_nats={slack_nats}); raise slack_nats")
    canary_value = float(nll[on_canary][0])
    rank = 1 + int(np.count_nonzero(nll[~on_canary] <= canary_value))
    return ExactRank("exact", rank, table.space_size, canary_value / LN2, nodes, tokens, frontier_sizes,
                     time.perf_counter() - t0)
