"""The scoring engine: token log-probabilities and greedy continuations, batched.

Two entry points serve every metric:

* :func:`candidate_nll_bits` scores many candidate secrets after one shared prefix. The prefix is run once and
  its key/value cache reused for every batch of candidates, so each candidate costs only its own tokens
  (a 6-digit secret after a 15-token prefix: 6 token positions instead of 21).
* :func:`greedy_continuations` decodes a batch of prefixes greedily (left-padded), for extraction.

Both run under ``torch.inference_mode`` and work on a plain model or a ``PeftModel`` (wrap the call in
``model.disable_adapter()`` to score the base weights on identical inputs).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

LN2 = math.log(2.0)


@dataclass(frozen=True)
class SplitTokens:
    """``prefix_ids + secret_ids`` is the tokenization of ``prefix + secret``."""

    prefix_ids: list[int]
    secret_ids: list[int]


def split_tokens(tokenizer, prefix: str, secret: str) -> SplitTokens:
    """Tokenize ``prefix + secret`` and find where the secret's tokens begin.

    The boundary is the longest common token prefix of ``tok(prefix)`` and ``tok(prefix + secret)``: a BPE merge
    across the boundary (``"is"`` + ``" 4"``) moves the boundary left rather than scoring a token the model
    would never see.
    """
    full = tokenizer(prefix + secret, add_special_tokens=False)["input_ids"]
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    b = 0
    while b < min(len(full), len(head)) and full[b] == head[b]:
        b += 1
    if b == 0:
        raise ValueError("the canary prefix must contain at least one token of its own")
    return SplitTokens(prefix_ids=full[:b], secret_ids=full[b:])


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def candidate_nll_bits(model, prefix_ids: list[int], candidates: list[list[int]], *, batch_size: int = 64) -> list[float]:
    """-log2 p(candidate | prefix) for each candidate token list, sharing the prefix's KV cache.

    Candidates may differ in length; they are right-padded per batch and padded positions are ignored.
    """
    device = _device_of(model)
    prefix = torch.tensor([prefix_ids], device=device)
    out = model(input_ids=prefix, use_cache=True)
    prefix_cache = out.past_key_values
    first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # distribution of the first secret token
    p_len = len(prefix_ids)
    results: list[float] = [0.0] * len(candidates)
    order = sorted(range(len(candidates)), key=lambda i: -len(candidates[i]))  # longest first: OOM shows early
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [candidates[i] for i in idx]
        width = max(len(c) for c in batch)
        nll = -first_logp[torch.tensor([c[0] for c in batch], device=device)].double()
        if width > 1:
            ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
            mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
            for row, c in enumerate(batch):
                ids[row, : len(c)] = torch.tensor(c, device=device)
                mask[row, : len(c)] = 1
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch))
            attention = torch.cat([torch.ones((len(batch), p_len), dtype=torch.long, device=device), mask], dim=1)
            logits = model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1], past_key_values=cache, use_cache=True).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            token_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            nll = nll - (token_logp * mask[:, 1:]).sum(dim=1).double()
        for row, i in enumerate(idx):
            results[i] = float(nll[row]) / LN2
    return results


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prefixes: list[list[int]], *, max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    """Greedy-decode ``max_new_tokens`` after each prefix (token ids); returns the new token ids per prefix."""
    device = _device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[list[int]] = [[] for _ in prefixes]
    order = sorted(range(len(prefixes)), key=lambda i: -len(prefixes[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prefixes[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(idx), width), dtype=torch.long, device=device)
        for row, i in enumerate(idx):  # left padding keeps every prefix's last token in the last column
            ids[row, width - len(prefixes[i]) :] = torch.tensor(prefixes[i], device=device)
            mask[row, width - len(prefixes[i]) :] = 1
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=None, num_beams=1,
        )
        for row, i in enumerate(idx):
            results[i] = generated[row, width:].tolist()
    return results


@torch.inference_mode()
def sequence_logprobs(model, tokenizer, texts: list[str], *, batch_size: int = 32, max_length: int | None = None) -> list[list[float]]:
    """Teacher-forced natural-log probabilities of tokens 2..n of each text (the first token has no context).

    Texts are sorted longest first and right-padded per batch; results come back in input order.
    """
    device = _device_of(model)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_length or None] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[list[float]] = [[] for _ in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(idx), width), dtype=torch.long, device=device)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i], device=device)
            mask[row, : len(encoded[i])] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(idx):
            results[i] = token_logp[row, : max(len(encoded[i]) - 1, 0)].tolist()
    return results
