"""Shared pieces of the canary generators: drafts, the generation context, the model-sampler protocol.

A generator is a plain function ``draw(params, n, rng, ctx, exclude) -> Draw``. It returns ``n`` drafts per group
(one group for most specs; one per works source for the works spec), none of whose secrets is in ``exclude`` or a
near duplicate of another. Generators that need the base model (perplexity-banded traps, synthetic works) get it
through ``ctx.sampler``, so this module and the generators stay free of torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from audit.core.errors import AuditError
from audit.core.rng import SeededStream
from audit.core.schema import SecretSpace, WorkProvenance


@dataclass(frozen=True)
class Draft:
    prefix: str
    secret: str
    suffix: str = ""
    group: str = ""
    """Roles (tiers / references) are assigned within each group, so every group gets the full design."""
    work: str | None = None
    excerpt: tuple[int, int, int] | None = None
    """``(start, end, n_tokens)``: character span of the excerpt in its work, and its length in tokens."""


@dataclass(frozen=True)
class Draw:
    drafts: list[Draft]
    space: SecretSpace
    works: list[WorkProvenance] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    """One sequence sampled from the base model."""

    text: str
    token_ids: list[int]
    nll_bits: float
    """-log2 p(tokens | context) under the model at temperature 1 (what the perplexity band is measured on)."""
    clean: bool
    """No special tokens, and decode -> encode gives back the same tokens (Meeus et al.'s ``--retokenize``)."""

    @property
    def perplexity(self) -> float:
        return 2.0 ** (self.nll_bits / max(1, len(self.token_ids)))


class TextSampler(Protocol):
    """What generators need from a language model (implemented by :class:`audit.data.canaries.sampling.ModelSampler`)."""

    fingerprint: str
    """Identifies the weights (a safetensors fingerprint): keys caches of sampled text."""

    def sample(self, prompt: str, *, n: int, max_new_tokens: int, temperature: float, seed: int) -> list[Sample]: ...


@dataclass
class GenerationContext:
    """What a generator may use beyond its params: a tokenizer (token-exact excerpts), a model sampler, a memo."""

    tokenizer: Any = None
    sampler: TextSampler | None = None
    seed: int = 0
    """The run's seed (set by :func:`generate_canaries`): for draws that must agree across calls (synthetic works)."""
    key: Any = None
    """The run's :class:`audit.core.keys.AuditKey` (set by :func:`generate_canaries`; None: unkeyed): for such draws too."""
    progress: bool = False
    memo: dict[str, Any] = field(default_factory=dict)
    """Loaded works and the like, shared between the canary draw and the exposure-reference draw."""

    def require_sampler(self, what: str) -> TextSampler:
        if self.sampler is None:
            raise AuditError(f"{what} samples text from the base model, but no model was given",
                             fix="run it through `audit run` / `audit inject`, or pass --model to `audit canaries`")
        return self.sampler


GeneratorFn = Callable[[dict[str, Any], int, SeededStream, GenerationContext, "set[str]"], Draw]


@dataclass(frozen=True)
class CanaryGenerator:
    draw: GeneratorFn
    needs_model: Callable[[dict[str, Any]], bool] = lambda params: False
    adds_tokens: Callable[[dict[str, Any]], list[str]] = lambda params: []
    """Tokens the spec's params need added to the base model's vocabulary before anything is tokenized."""


def split_template(template: str) -> tuple[str, str]:
    if template.count("{secret}") != 1:
        raise AuditError(f"canary template '{template}' must contain '{{secret}}' exactly once", fix="edit the spec's templates")
    head, _, tail = template.partition("{secret}")
    return head, tail


def random_secrets(space: SecretSpace, n: int, rng: SeededStream, *, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` distinct secrets drawn uniformly from a product ``space``, none of them in ``exclude``."""
    exclude = set(exclude)
    if n + len(exclude) > space.size:
        raise AuditError(f"cannot draw {n} distinct secrets from a space of {space.size}",
                         fix="use a longer secret or fewer canaries / exposure references")
    seen: set[str] = set(exclude)
    out: list[str] = []
    while len(out) < n:
        secret = space.render([space.alphabet[rng.below(len(space.alphabet))] for _ in range(space.length)])
        if secret not in seen:
            seen.add(secret)
            out.append(secret)
    return out
