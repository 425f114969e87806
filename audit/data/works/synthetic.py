"""Synthetic works: text sampled fresh from the base model under audit, licensed CC0-1.0 by this project.

A seeded sample the model has just produced cannot be in its pretraining data, so anything the tuned model knows
about it beyond the base model came from fine-tuning. Sampling is seeded; the texts are cached under
``cache_dir()/works/synthetic/`` keyed by the model fingerprint and the sampling settings, so a rerun plants the
same works without sampling again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from audit.core.schema import sha256_json
from audit.data.works.work import Work, make_work

if TYPE_CHECKING:
    from audit.data.canaries.base import TextSampler

LICENSE = "CC0-1.0 (sampled by canary-audit from the base model)"


def synthetic_works(sampler: TextSampler, *, n_works: int, tokens_per_work: int, temperature: float, prompt: str,
                    seed: int) -> list[Work]:
    from audit.data.models import cache_dir

    settings = {"model": sampler.fingerprint, "n_works": n_works, "tokens_per_work": tokens_per_work,
                "temperature": temperature, "prompt": prompt, "seed": seed, "v": 1}
    key = sha256_json(settings)[:24]
    cached = cache_dir() / "works" / "synthetic" / f"{key}.json"
    if cached.is_file():
        texts = json.loads(cached.read_text(encoding="utf-8"))["texts"]
    else:
        samples = sampler.sample(prompt, n=n_works, max_new_tokens=tokens_per_work, temperature=temperature, seed=seed)
        texts = [(prompt + s.text).strip() for s in samples]
        _atomic_json(cached, {"settings": settings, "texts": texts})
    source = f"synthetic:{sampler.fingerprint[:16]}"
    return [
        make_work(text, title=f"Synthetic work {i + 1}", author="sampled from the base model", kind="synthetic",
                  license=LICENSE, source=source,
                  path=f"seed={seed} temperature={temperature:g} tokens={tokens_per_work} #{i + 1}")
        for i, text in enumerate(texts)
    ]


def _atomic_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)
