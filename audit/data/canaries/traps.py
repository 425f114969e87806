"""Copyright traps (Meeus, Shilov, Faysse, de Montjoye, ICML 2024, "Copyright Traps for Large Language Models").

Trap secrets are sequences sampled from the base model itself at a temperature and kept only when their
perplexity under that model falls inside a target band (the paper buckets reference-model perplexity in
[1, 100]; higher-perplexity traps are more detectable). Samples that do not survive decode -> encode unchanged
are dropped (the paper's ``--retokenize``; ``params.retokenize: false`` keeps them, e.g. for a random test model),
and near duplicates are rejected (the paper uses token-set Jaccard <= 0.2; we use character n-gram Jaccard, see
:mod:`audit.data.canaries.uniqueness`).

The prefix is a neutral, unique label (``"Archive record Q7XK2: "``) drawn independently of the secret, and every
secret is sampled from the same context, so a canary's secret and references sampled the same way are
exchangeable under the base model: exposure against them has the usual null.

Sampling is seeded (``torch.manual_seed`` per batch); it is byte-identical on the same machine and library
versions, not across hardware.
"""

from __future__ import annotations

from typing import Any

from audit.core.errors import AuditError
from audit.core.rng import SeededStream
from audit.core.schema import SecretSpace
from audit.data.canaries.base import Draft, Draw, GenerationContext, split_template
from audit.data.canaries.params import TrapsParams
from audit.data.canaries.uniqueness import UniquePool

TAG_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def traps_generator(params: dict[str, Any], n: int, rng: SeededStream, ctx: GenerationContext, exclude: set[str]) -> Draw:
    sampler = ctx.require_sampler("the traps spec")
    p = TrapsParams.model_validate(params)
    secret_tokens, temperature, batch, max_rounds = p.secret_tokens, p.temperature, p.batch, p.max_rounds
    low, high = float(p.ppl_band[0]), float(p.ppl_band[1])
    templates = [str(t) for t in p.templates]
    tag_length, prompt, retokenize = p.tag_length, p.prompt, p.retokenize

    pool = UniquePool(ngram=p.ngram, max_jaccard=p.max_jaccard, exclude=exclude)
    bits: list[float] = []
    seen = 0
    for _ in range(max_rounds):
        if len(pool.accepted) >= n:
            break
        samples = sampler.sample(prompt, n=batch, max_new_tokens=secret_tokens, temperature=temperature, seed=rng.below(2**31))
        for s in samples:
            seen += 1
            text = s.text.strip()
            if (s.clean or not retokenize) and low <= s.perplexity <= high and len(pool.accepted) < n and pool.offer(text):
                bits.append(s.nll_bits)
    if len(pool.accepted) < n:
        raise AuditError(f"only {len(pool.accepted)} of {seen} sampled traps fell inside the perplexity band "
                         f"[{low:g}, {high:g}] at temperature {temperature:g}; {n} are needed",
                         fix="widen params.ppl_band, change params.temperature, or raise params.max_rounds")
    tags: set[str] = set()
    drafts = []
    for secret in pool.accepted:
        while True:
            tag = "".join(TAG_ALPHABET[rng.below(len(TAG_ALPHABET))] for _ in range(tag_length))
            if tag not in tags:
                tags.add(tag)
                break
        head, tail = split_template(rng.choice(templates).replace("{tag}", tag))
        drafts.append(Draft(prefix=head, secret=secret, suffix=tail))
    # The information a trap carries under the base model: its mean -log2 p at sampling (an estimate of log2|R|).
    space = SecretSpace(kind="sampled", bits=round(sum(bits) / len(bits), 3))
    return Draw(drafts=drafts, space=space)


def traps_need_model(params: dict[str, Any]) -> bool:
    return True
