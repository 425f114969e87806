"""Random secrets in sentence templates: ``digits`` and ``words`` (Carlini et al. 2019, "The Secret Sharer").

The secret is ``length`` symbols drawn uniformly from an alphabet (digits, or a word list), so the space
``|alphabet| ** length`` is a product space: exposure can rank a secret against all of it, or against uniform
samples of it. Each canary gets its own (template, name) context, so every prefix is unique and greedy
extraction from the prefix is unambiguous.
"""

from __future__ import annotations

from typing import Any

from audit.core.errors import AuditError
from audit.core.rng import SeededStream
from audit.core.schema import SecretSpace
from audit.data.canaries.base import Draft, Draw, GenerationContext, split_template
from audit.data.canaries.params import DigitsParams, WordsParams
from audit.data.canaries.uniqueness import UniquePool


def _templated(space: SecretSpace, params: DigitsParams | WordsParams, n: int, rng: SeededStream, exclude: set[str],
               *, default_template: str) -> Draw:
    templates = list(params.templates or [default_template])
    names = list(params.names or [""])
    contexts = [(t, nm) for t in templates for nm in names]
    if len(contexts) < n:
        raise AuditError(f"spec has {len(contexts)} distinct template x name contexts but {n} canaries are needed",
                         fix="add templates or names to the spec, or lower members_per_tier / references")
    contexts = rng.shuffled(contexts)[:n]
    pool = UniquePool(ngram=params.ngram, max_jaccard=params.max_jaccard, exclude=exclude)
    attempts = 0
    while len(pool.accepted) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise AuditError(f"could not draw {n} distinct, non-near-duplicate secrets from a space of {space.size}",
                             fix="use a longer secret, or fewer canaries")
        pool.offer(space.render([space.alphabet[rng.below(len(space.alphabet))] for _ in range(space.length)]))
    drafts = []
    for (template, name), secret in zip(contexts, pool.accepted, strict=True):
        head, tail = split_template(template.replace("{name}", name))
        drafts.append(Draft(prefix=head, secret=secret, suffix=tail))
    return Draw(drafts=drafts, space=space)


def digits_generator(params: dict[str, Any], n: int, rng: SeededStream, ctx: GenerationContext, exclude: set[str]) -> Draw:
    """Numeric secrets in a sentence template, e.g. "... the vault code of Ms. Halloway is 481927."

    The space (``alphabet ** length``, 10^6 by default) is enumerable, so exposure can be computed exactly.
    Near duplicates are secrets sharing most of their 3-grams (``481927`` vs ``481920``).
    """
    p = DigitsParams.model_validate(params)
    space = SecretSpace(alphabet=[str(a) for a in p.alphabet], length=p.length, separator=p.separator)
    return _templated(space, p, n, rng, exclude, default_template="My PIN is {secret}.")


def words_generator(params: dict[str, Any], n: int, rng: SeededStream, ctx: GenerationContext, exclude: set[str]) -> Draw:
    """A sequence of ``length`` words drawn uniformly from ``words`` (a passphrase), e.g. "amber river quiet lamp".

    With 256 words and 5 slots the space is 2^40: not enumerable in practice, but a product space, so exposure
    ranks the secret against uniform samples of the same space.
    """
    p = WordsParams.model_validate(params)
    space = SecretSpace(alphabet=list(p.words), length=p.length, separator=" ")
    return _templated(space, p, n, rng, exclude, default_template="The passphrase is {secret}.")
