"""Sampling text from the base model for the generators that need it (traps, synthetic works). Heavy edge: torch.

Sampling is ancestral (``do_sample``, no top-k / top-p truncation) at the requested temperature, for exactly
``max_new_tokens`` tokens. The perplexity band of the traps spec is measured at temperature 1 on the sampled
tokens (one teacher-forced pass), as Meeus et al. 2024 measure it under the reference model. Each batch is seeded
with ``torch.manual_seed``: the same seed gives the same text on the same machine and library versions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from audit.data.canaries.base import Sample


class ModelSampler:
    """A :class:`~audit.data.canaries.base.TextSampler` over a loaded causal LM and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, *, fingerprint: str, batch_size: int = 32) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.batch_size = batch_size

    def sample(self, prompt: str, *, n: int, max_new_tokens: int, temperature: float, seed: int) -> list[Sample]:
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        context = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if not context:  # unconditional: start from the beginning-of-text token (or end-of-text if there is none)
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            context = [start]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        special = set(tok.all_special_ids)
        config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_beams=1,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=None)
        device = next(self.model.parameters()).device
        out: list[Sample] = []
        for batch_start in range(0, n, self.batch_size):
            b = min(self.batch_size, n - batch_start)
            torch.manual_seed(seed + batch_start)
            ids = torch.tensor([context] * b, device=device)
            with torch.inference_mode():
                generated = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
                logits = self.model(input_ids=generated, attention_mask=torch.ones_like(generated)).logits
            new = generated[:, len(context):]
            logp = torch.log_softmax(logits[:, len(context) - 1 : -1].float(), dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for row in range(b):
                token_ids = new[row].tolist()
                text = tok.decode(token_ids, skip_special_tokens=True)
                clean = not (special & set(token_ids)) and tok(text, add_special_tokens=False)["input_ids"] == token_ids
                out.append(Sample(text=text, token_ids=token_ids, nll_bits=float(-logp[row].sum()) / math.log(2), clean=clean))
        return out


class LazyModelSampler:
    """Loads the model only when a generator first samples, so specs that never sample pay nothing."""

    def __init__(self, path: Path, *, fingerprint: str, device: str = "cpu", dtype: Any = None,
                 trust_remote_code: bool = False, tokenizer: Any = None) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._device = device
        self._dtype = dtype
        self._trust = trust_remote_code
        self._tokenizer = tokenizer
        self._sampler: ModelSampler | None = None

    def sample(self, prompt: str, *, n: int, max_new_tokens: int, temperature: float, seed: int) -> list[Sample]:
        if self._sampler is None:
            import torch

            from audit.data.models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(self.path, dtype=self._dtype or torch.float32, device=self._device,
                                                        trust_remote_code=self._trust)
            self._sampler = ModelSampler(model, self._tokenizer or tokenizer, fingerprint=self.fingerprint)
        return self._sampler.sample(prompt, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    def release(self) -> None:
        self._sampler = None
