"""Audit-grade, model-free canaries from the tokenizer's own vocabulary (Panda et al. 2025, "Privacy auditing of
large language models", ICLR; their ``create_datasets.py`` modes ``rare`` and ``bigram``).

Random digits are a poor canary for a language model: the base already gives every digit string some probability
and a fine-tune must move the whole sequence. Panda et al. build secrets out of tokens the model rarely predicts,
so that one training step on them moves the loss a lot (a large per-example gradient), and reach TPR 49.6% at 1% FPR
on Qwen2.5-0.5B where the earlier design reached 4.2%. Both specs here need only the tokenizer, no model pass:

* ``rare_tokens``: the secret is ``length`` tokens drawn uniformly from the ``pool`` *rarest* whole-word tokens of
  the vocabulary. Rarity is read from the BPE merge order: byte-level BPE assigns ids in the order merges were
  learned, most frequent first, so the highest ids are the rarest pieces (a model-free proxy for Panda's unigram
  frequency; their optional small-model ranking is not done here).
* ``bigram``: ``length`` tokens drawn uniformly from *every* whole-word token, so each adjacent pair is a random
  bigram of the vocabulary, almost surely never seen in pretraining, while each token on its own is ordinary.

A whole-word token is one whose text is a leading space plus 3 or more ASCII letters and that the tokenizer encodes
back to exactly that one token; the secret is the words joined by spaces, so it tokenizes into exactly the drawn
tokens (checked for every canary). The space is a product space, ``pool ** length`` (1024^4 = 2^40 by default), so
exposure ranks each canary against uniform draws of the same space (Carlini et al. 2019).

Panda's third design, ``new_tokens`` (their ``new`` mode), is the strongest and the only one that changes the model:

* ``new_tokens``: the secret is ``length`` tokens drawn uniformly from a ``pool`` of tokens *added to the vocabulary*
  (``<|c0000|>`` .. ``<|c1023|>``), which no pretraining text ever contained. Their embedding rows start at the mean
  of the base's rows (plus a seeded 1e-3-std jitter, so no two candidates tie), which leaves the base model nearly
  indifferent among them: the base scores every candidate alike and the null is close to exact. A member's tokens
  are then learned only from its own copies, which is why Panda et al. find this design "near-perfect". The cost:
  the vocabulary grows by ``pool`` rows and those rows must be trainable, which LoRA does not do by itself; the
  train stage adds PEFT ``trainable_token_indices`` for exactly the added ids (``pool`` x hidden trainable values,
  590k for 1024 tokens on SmolLM2-135M, beside LoRA's own 461k) and a full fine-tune trains them anyway. The
  tokens are added wherever the run loads the base (:func:`new_tokens_added`, :func:`audit.data.models.extend_vocabulary`),
  so the base is scored, trained and reloaded with the same vocabulary. DP-SGD trains them too, with per-record
  gradients for PEFT's trainable-token layer (:func:`audit.train.dp.token_rows_grad_sample`); a set for someone
  else's trainer cannot carry them (``audit inject``): refused with one line.
"""

from __future__ import annotations

import re
from typing import Any

from audit.core.errors import AuditError
from audit.core.rng import SeededStream
from audit.core.schema import SecretSpace
from audit.data.canaries.base import Draw, GenerationContext
from audit.data.canaries.params import BigramParams, NewTokensParams, RareTokensParams
from audit.data.canaries.templated import _templated

_WORD = re.compile(r"^[A-Za-z]{3,}$")


def whole_word_tokens(tokenizer: Any) -> list[tuple[int, str]]:
    """``(id, word)`` of every token that is " " + 3+ ASCII letters and encodes back to itself alone, by id.

    Special and added tokens are left out (they are not part of the merge order)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = set((getattr(tokenizer, "get_added_vocab", dict)() or {}).values())
    vocab = tokenizer.get_vocab()
    out: list[tuple[int, str]] = []
    for _, token_id in sorted(vocab.items(), key=lambda kv: kv[1]):
        if token_id in special or token_id in added:
            continue
        text = tokenizer.decode([token_id])
        if not text.startswith(" ") or not _WORD.match(text[1:]):
            continue
        if tokenizer(text, add_special_tokens=False)["input_ids"] != [token_id]:
            continue
        out.append((token_id, text[1:]))
    return out


def _require_tokenizer(ctx: GenerationContext, spec: str) -> Any:
    if ctx.tokenizer is None:
        raise AuditError(f"canary spec {spec} draws its secrets from the base model's tokenizer, but none was given",
                         fix="run it through `audit run` / `audit inject`, or pass --model to `audit canaries`")
    return ctx.tokenizer


def _draw(words: list[str], params: RareTokensParams | BigramParams | NewTokensParams, n: int, rng: SeededStream,
          exclude: set[str], tokenizer: Any, spec: str, *, separator: str = " ") -> Draw:
    """Secrets of ``params.length`` of ``words`` joined by ``separator``; with a tokenizer, each is checked to encode
    (after the separator, the space a whole-word token carries) into exactly its drawn tokens."""
    if len(words) < 2:
        raise AuditError(f"canary spec {spec}: the tokenizer has {len(words)} whole-word tokens, too few for a secret",
                         fix="use another canary spec (digits, words) for this model")
    space = SecretSpace(alphabet=words, length=params.length, separator=separator)
    draw = _templated(space, params, n, rng, exclude, default_template="Archive key: {secret}.")
    if tokenizer is None:
        return draw
    for d in draw.drafts:  # the secret must come back as exactly the drawn tokens, or the design is not what it says
        ids = tokenizer(separator + d.secret, add_special_tokens=False)["input_ids"]
        if len(ids) != params.length:
            raise AuditError(f"canary spec {spec}: a secret of {params.length} vocabulary words tokenized into {len(ids)} "
                             "tokens", fix="report this tokenizer; use the digits or words spec meanwhile")
    return draw


def rare_tokens_generator(params: dict[str, Any], n: int, rng: SeededStream, ctx: GenerationContext,
                          exclude: set[str]) -> Draw:
    """Secrets of ``length`` tokens from the ``pool`` highest-id (latest-merged, rarest) whole-word tokens."""
    p = RareTokensParams.model_validate(params)
    tokenizer = _require_tokenizer(ctx, "rare_tokens")
    words = [w for _, w in whole_word_tokens(tokenizer)][-p.pool:]
    return _draw(words, p, n, rng, exclude, tokenizer, "rare_tokens")


def bigram_generator(params: dict[str, Any], n: int, rng: SeededStream, ctx: GenerationContext, exclude: set[str]) -> Draw:
    """Secrets of ``length`` tokens drawn uniformly from every whole-word token: random bigrams of the vocabulary."""
    p = BigramParams.model_validate(params)
    tokenizer = _require_tokenizer(ctx, "bigram")
    return _draw([w for _, w in whole_word_tokens(tokenizer)], p, n, rng, exclude, tokenizer, "bigram")


def new_token_pool(pool: int) -> list[str]:
    """The ``pool`` token strings a ``new_tokens`` spec adds to the vocabulary, in id order: ``<|c0000|>`` ..,
    bracketed like chat-template tokens so that no ordinary text contains one."""
    width = max(4, len(str(pool - 1)))
    return [f"<|c{i:0{width}d}|>" for i in range(pool)]


def new_tokens_generator(params: dict[str, Any], n: int, rng: SeededStream, ctx: GenerationContext,
                         exclude: set[str]) -> Draw:
    """Secrets of ``length`` tokens from ``pool`` tokens added to the vocabulary (Panda et al. 2025, ``new``).

    Model-free: the pool is a fixed list (:func:`new_token_pool`). With a tokenizer in ``ctx`` (``audit run``, which
    extends it first) every secret is checked to tokenize into exactly the drawn tokens; a tokenizer that already
    holds one of the pool's strings as a word of its own is refused (the token would not be new)."""
    p = NewTokensParams.model_validate(params)
    pool = new_token_pool(p.pool)
    tokenizer = ctx.tokenizer
    if tokenizer is not None:
        added = set(getattr(tokenizer, "get_added_vocab", dict)() or {})
        missing = [t for t in pool if t not in added]
        if missing:
            raise AuditError(f"canary spec new_tokens: the tokenizer lacks the added token {missing[0]!r} "
                             f"({len(missing)} of {len(pool)} missing)",
                             fix="draw new-token canaries through `audit run`, which adds the tokens to the base model")
    return _draw(pool, p, n, rng, exclude, tokenizer, "new_tokens", separator="")


def new_tokens_added(params: dict[str, Any]) -> list[str]:
    """The ``new_tokens`` pool: what the spec needs added to the base model's vocabulary."""
    return new_token_pool(NewTokensParams.model_validate(params).pool)


def tokens_need_model(params: dict[str, Any]) -> bool:
    """True: the secrets come from the base model's tokenizer, so they are drawn when the audit runs (never sampled)."""
    return True
