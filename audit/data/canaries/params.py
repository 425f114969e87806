"""Typed params per canary generator: a spec's ``params`` (and a recipe's ``canaries.params`` overrides) are
validated here, so an unknown key is an error that names it with a did-you-mean, like every other recipe key.

    audit validate tiny/lora_cpu canaries.params.lenght=8
    error: canary spec digits: unknown param 'lenght'. Did you mean 'length'? (fix: valid params of the digits generator: ...)

Every default a generator uses is a field default here, where ``audit canaries`` and the docs can see it, not a
``params.get(key, default)`` inside the generator. Pure pydantic, no torch.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from audit.core.errors import AuditError, did_you_mean
from audit.data.canaries.uniqueness import DEFAULT_MAX_JACCARD

RESERVED_DOMAINS = ("example.com", "example.org", "example.net", "mail.test", "post.example")
"""RFC 2606 example domains: a synthetic email can never reach a real mailbox."""

PositiveInt = Annotated[StrictInt, Field(ge=1)]
"""A strict integer of at least 1 (a bool or a float such as 4.0 is refused)."""


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ngram: PositiveInt = Field(default=4)
    """Character n-gram length of the near-duplicate check between secrets."""
    max_jaccard: float = DEFAULT_MAX_JACCARD
    """Two secrets sharing more than this Jaccard share of their n-grams are near duplicates; the later is redrawn."""


class DigitsParams(_Params):
    """``digits``: ``length`` symbols of ``alphabet`` in a sentence template (Carlini et al. 2019)."""

    alphabet: str | list[str | int] = "0123456789"
    length: PositiveInt = Field(default=6)
    separator: str = ""
    templates: list[str] | None = None
    """Sentence templates with ``{secret}`` (and ``{name}``); default ``My PIN is {secret}.``."""
    names: list[str] | None = None
    ngram: PositiveInt = Field(default=3)

    @field_validator("alphabet")
    @classmethod
    def _at_least_two_symbols(cls, alphabet: str | list[str | int]) -> str | list[str | int]:
        symbols = list(alphabet) if isinstance(alphabet, str) else [str(a) for a in alphabet]
        if len(set(symbols)) < 2:
            raise ValueError("the alphabet needs at least two distinct symbols (one symbol is a space of one secret)")
        if len(set(symbols)) != len(symbols):
            raise ValueError("the alphabet repeats a symbol; make it unique")
        return alphabet


class WordsParams(_Params):
    """``words``: ``length`` words drawn uniformly from ``words`` (a passphrase)."""

    words: list[str] = Field(min_length=1)
    length: PositiveInt = Field(default=5)
    templates: list[str] | None = None
    names: list[str] | None = None

    @field_validator("words")
    @classmethod
    def _unique(cls, words: list[str]) -> list[str]:
        if len(set(words)) != len(words):
            raise ValueError("the word list repeats a word; make it unique")
        return words


class PiiParams(_Params):
    """``pii``: fake customer records (email, phone, Luhn-failing card) behind a name."""

    templates: list[str] = Field(min_length=1)
    first_names: list[str] = Field(min_length=1)
    last_names: list[str] = Field(min_length=1)
    email_words: list[str] = Field(min_length=1)
    domains: list[str] = Field(default_factory=lambda: list(RESERVED_DOMAINS), min_length=1)
    area_codes: list[str | int] = Field(default_factory=lambda: ["202", "312", "415", "617", "713", "206", "303", "404"],
                                        min_length=1)
    card_prefixes: list[str | int] = Field(default_factory=lambda: ["4", "5"], min_length=1)
    max_jaccard: float = 0.6


class TrapsParams(_Params):
    """``traps``: base-model samples kept inside a perplexity band (Meeus et al. 2024)."""

    secret_tokens: PositiveInt = Field(default=24, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    ppl_band: list[float] = Field(default_factory=lambda: [1.0, 100.0])
    batch: PositiveInt = Field(default=32, ge=1)
    max_rounds: PositiveInt = Field(default=20, ge=1)
    templates: list[str] = Field(default_factory=lambda: ["Archive record {tag}: {secret}"], min_length=1)
    tag_length: PositiveInt = Field(default=5)
    prompt: str = ""
    retokenize: bool = True
    """Drop samples whose text does not tokenize back to the sampled tokens (the paper's ``--retokenize``)."""
    ngram: PositiveInt = Field(default=5)

    @field_validator("ppl_band")
    @classmethod
    def _band(cls, band: list[float]) -> list[float]:
        if len(band) != 2 or not 0 < band[0] < band[1]:
            raise ValueError(f"ppl_band must be [low, high] with 0 < low < high (got {band!r}), e.g. [10, 100]")
        return band


class WorksParams(_Params):
    """``works``: excerpts of sample works (public domain, synthetic, or a folder of licensed ones)."""

    sources: list[str] = Field(min_length=1)
    excerpt_tokens: PositiveInt = Field(default=48, ge=2)
    prefix_tokens: PositiveInt = Field(default=16, ge=1)
    synthetic: dict[str, Any] = Field(default_factory=dict)
    """Settings of the ``synthetic`` source (works, tokens, temperature, prompt): see :mod:`audit.data.works`."""
    ngram: PositiveInt = Field(default=5)


class RareTokensParams(_Params):
    """``rare_tokens``: ``length`` tokens from the ``pool`` rarest whole-word tokens of the vocabulary (Panda et al. 2025)."""

    length: PositiveInt = Field(default=4)
    pool: PositiveInt = Field(default=1024, ge=2)
    """How many of the highest-id (latest-merged) whole-word tokens the secrets draw from."""
    templates: list[str] | None = None
    names: list[str] | None = None


class BigramParams(_Params):
    """``bigram``: ``length`` tokens drawn uniformly from every whole-word token (random vocabulary bigrams)."""

    length: PositiveInt = Field(default=4)
    templates: list[str] | None = None
    names: list[str] | None = None


class NewTokensParams(_Params):
    """``new_tokens``: ``length`` tokens from ``pool`` tokens added to the vocabulary (Panda et al. 2025, ``new``)."""

    length: PositiveInt = Field(default=4)
    pool: PositiveInt = Field(default=1024, ge=2, le=100_000)
    """How many tokens are added (``<|c0000|>`` ..): the space is ``pool ** length``; each is an embedding row to train."""
    templates: list[str] | None = None
    names: list[str] | None = None
    ngram: PositiveInt = Field(default=9, ge=1)
    """One added token is 8-9 characters (``<|c0042|>``): near duplicates share most tokens, not their brackets."""


PARAMS: dict[str, type[_Params]] = {"digits": DigitsParams, "words": WordsParams, "pii": PiiParams,
                                    "traps": TrapsParams, "works": WorksParams, "rare_tokens": RareTokensParams,
                                    "bigram": BigramParams, "new_tokens": NewTokensParams}
"""Generator name -> its params model."""


def parse_params(generator: str, params: dict[str, Any], *, spec: str) -> _Params:
    """``params`` validated for ``generator``: an unknown key or a bad value is one :class:`AuditError`."""
    model = PARAMS.get(generator)
    if model is None:
        raise AuditError(f"canary spec '{spec}' names unknown generator '{generator}'." + did_you_mean(generator, PARAMS),
                         fix=f"use one of: {', '.join(PARAMS)}")
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        valid = ", ".join(model.model_fields)
        if err["type"] == "extra_forbidden":
            raise AuditError(f"canary spec {spec}: unknown param '{key}'." + did_you_mean(key, model.model_fields),
                             fix=f"valid params of the {generator} generator: {valid}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise AuditError(f"canary spec {spec}: param '{key}': {msg} (got {err.get('input')!r})",
                         fix=f"set canaries.params.{key} (params of the {generator} generator: {valid})") from None
