"""A deliberately naive second engine behind the scoring protocol (:mod:`audit.score.backend`): ``scoring.backend: loop``.

One sequence at a time, one full forward pass per question, no key/value cache, no batching, no padding, and the
log-softmax taken in float64 on the host side of the logits. It shares no code with :mod:`audit.score.engine` beyond
the protocol, so an audit scored through it checks the batched engine (and the exact walk's cached levels) end to end:
the same scores within rounding, the same ranks (``tests/test_scoring_backend.py``). Slow by design: the reference
for an engine, not for audits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from audit.score.backend import LN2, TokenScores

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LoopBackend:
    """A transformers model, asked one sequence at a time (see the module docstring)."""

    name = "loop"

    def __init__(self, model: Any, precision: str, tokenizer: Any = None) -> None:
        self.model, self.precision, self.tokenizer = model, precision, tokenizer
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def _logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        """``ln p(. | ids[: j + 1])`` for every position j of one unpadded sequence: (len(ids), V), float64."""
        logits = self.model(input_ids=torch.tensor([list(ids)], device=self.device)).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    def token_logprobs(self, sequences: Sequence[Sequence[int]], *, vocab_stats: bool = False) -> list[TokenScores]:
        out = []
        for seq in sequences:
            seq = list(seq)
            if len(seq) < 2:
                empty = np.zeros(0)
                out.append(TokenScores(seq, empty, empty if vocab_stats else None, empty if vocab_stats else None,
                                       np.zeros(0, dtype=bool)))
                continue
            lp = self._logprobs(seq)[:-1]
            targets = torch.tensor(seq[1:], device=self.device)
            mean = var = None
            if vocab_stats:
                p = lp.exp()
                mean_t = (p * lp).sum(-1)
                mean, var = mean_t.cpu().numpy(), (p * (lp - mean_t[:, None]) ** 2).sum(-1).cpu().numpy()
            out.append(TokenScores(seq, lp.gather(-1, targets[:, None])[:, 0].cpu().numpy(), mean, var,
                                   (lp.argmax(-1) == targets).cpu().numpy()))
        return out

    def sequence_nll(self, prefix_ids: Sequence[int], tokens: Sequence[int]) -> float:
        """``-ln p(tokens | prefix)`` in nats: one pass over ``prefix + tokens``."""
        lp = self._logprobs(list(prefix_ids) + list(tokens))
        start = len(prefix_ids) - 1
        return -float(sum(lp[start + j, t] for j, t in enumerate(tokens)))

    def next_logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """``ln p(. | ids)`` over the vocabulary: one pass over ``ids``."""
        return self._logprobs(ids)[-1].cpu().numpy()

    def candidate_bits(self, prefix_ids: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
        return [self.sequence_nll(prefix_ids, c) / LN2 for c in candidates]

    def prefix_walk(self, prefix_ids: Sequence[int]) -> LoopWalk:
        return LoopWalk(self, list(prefix_ids))

    @torch.inference_mode()
    def generate(self, prefixes: Sequence[Sequence[int]], *, max_new_tokens: int, samples: int | None = None,
                 temperature: float = 1.0, seed: int = 0) -> list[list[list[int]]]:
        rng = torch.Generator(device="cpu").manual_seed(seed)
        out = []
        for prefix in prefixes:
            per = []
            for _ in range(1 if samples is None else samples):
                ids = list(prefix)
                for _ in range(max_new_tokens):
                    lp = self._logprobs(ids)[-1]
                    if samples is None:
                        ids.append(int(lp.argmax()))
                    else:
                        probs = torch.softmax(lp.float().cpu() / temperature, dim=-1)
                        ids.append(int(torch.multinomial(probs, 1, generator=rng)))
                per.append(ids[len(prefix):])
            out.append(per)
        return out

    @torch.inference_mode()
    def sample_until_end(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, top_k: int,
                         top_p: float, seed: int, batch_size: int,
                         on_progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
        rng = torch.Generator(device="cpu").manual_seed(seed)
        eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        out = []
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new_tokens):
                probs = torch.softmax(self._logprobs(ids)[-1].float().cpu() / temperature, dim=-1)
                order = torch.argsort(probs, descending=True)
                keep = torch.cumsum(probs[order], 0) - probs[order] < top_p  # the nucleus: mass before each < top_p
                if top_k > 0:
                    keep[top_k:] = False
                kept = torch.zeros_like(probs)
                kept[order[keep]] = probs[order[keep]]
                token = int(torch.multinomial(kept, 1, generator=rng))
                if token == eos:
                    break
                ids.append(token)
            out.append(ids[len(prompt):])
            if on_progress is not None:
                on_progress(len(out) * max_new_tokens, len(out))
        return out


class LoopWalk:
    """Every path and piece of every level scored from scratch: one pass over ``prefix + path + piece`` each."""

    def __init__(self, backend: LoopBackend, prefix_ids: list[int]) -> None:
        self.backend, self.prefix = backend, prefix_ids

    def path_nll(self, tokens: Sequence[int]) -> float:
        return self.backend.sequence_nll(self.prefix, tokens)

    def extension_logprobs(self, paths: Sequence[Sequence[int]], pieces: Sequence[Sequence[int]], *,
                           extended_later: bool) -> np.ndarray:
        out = np.empty((len(paths), len(pieces)))
        for i, path in enumerate(paths):
            context = self.prefix + list(path)
            if all(len(piece) == 1 for piece in pieces):  # one pass over the path answers every one-token piece
                lp = self.backend.next_logprobs(context)
                out[i] = [float(lp[piece[0]]) for piece in pieces]
            else:
                out[i] = [-self.backend.sequence_nll(context, piece) for piece in pieces]
        return out


@contextlib.contextmanager
def open_loop(model: Any, tokenizer: Any, *, precision: str | None, batch_size: int) -> Iterator[LoopBackend]:
    """``model`` in ``precision`` (None: its own dtype; a copy when that differs: the caller's weights stay as they
    were) as a :class:`LoopBackend`; ``batch_size`` is not needed (nothing is batched)."""
    own = next(p.dtype for p in model.parameters() if p.is_floating_point())
    dtype = own if precision is None else DTYPES[precision]
    name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype))
    params = [p for p in model.parameters() if p.is_floating_point()]
    if all(p.dtype == dtype for p in params):
        yield LoopBackend(model, name, tokenizer)
        return
    import copy

    yield LoopBackend(copy.deepcopy(model).to(dtype), name, tokenizer)
