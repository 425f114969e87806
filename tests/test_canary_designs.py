"""Audit-grade, model-free canary designs (Panda et al. 2025): ``rare_tokens`` (the rarest whole-word tokens of the
vocabulary by BPE merge order) and ``bigram`` (whole-word tokens drawn uniformly: random vocabulary bigrams). A
hand-made vocabulary pins which tokens qualify; the real tiny-llama tokenizer shows each secret is exactly the drawn
tokens; and a tiny audit runs end to end on each."""

from __future__ import annotations

import pytest

from audit.core.errors import AuditError
from audit.data.canaries import generate_canaries, load_spec, spec_needs_model
from audit.data.canaries.base import GenerationContext
from audit.data.canaries.tokens import whole_word_tokens


class HandMadeTokenizer:
    """A word-level vocabulary: ids in 'merge order', a special token, an added token, pieces that are not words."""

    vocab = {"<s>": 0, " the": 1, " a": 2, "ing": 3, " cat": 4, " dog": 5, " x9": 6, " owl": 7, "<new>": 8, " yak": 9,
             " ox": 10, "Cat": 11, " emu": 12}
    all_special_ids = [0]

    def get_vocab(self):
        return dict(self.vocab)

    def get_added_vocab(self):
        return {"<new>": 8}

    def decode(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return "".join(inverse[i] for i in ids)

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for word in text.split(" ")[1:] if text.startswith(" ") else text.split(" "):
            piece = " " + word
            ids.append(self.vocab.get(piece, 99))  # 99: an unknown word splits into something else
        if text == " emu":  # a token that does not encode back to itself (a merge that loses to another)
            return {"input_ids": [2, 12]}
        return {"input_ids": ids}


def test_whole_word_tokens_are_space_plus_three_letters_that_encode_to_themselves_in_id_order():
    assert whole_word_tokens(HandMadeTokenizer()) == [(1, "the"), (4, "cat"), (5, "dog"), (7, "owl"), (9, "yak")]
    # left out: <s> (special), " a" / " ox" (under 3 letters), "ing" / "Cat" (no leading space), " x9" (a digit),
    # <new> (added), " emu" (does not round-trip)


def test_rare_tokens_draw_from_the_highest_ids_and_bigram_from_all():
    ctx = GenerationContext(tokenizer=HandMadeTokenizer())
    rare = load_spec("rare_tokens", {"pool": 2, "length": 2})
    drawn = generate_canaries(rare, seed=0, tiers=[1], members_per_tier=1, references=1, context=ctx)
    assert drawn.space.alphabet == ["owl", "yak"] and drawn.space.size == 4
    assert all(set(c.secret.split(" ")) <= {"owl", "yak"} for c in drawn.canaries)
    ctx = GenerationContext(tokenizer=HandMadeTokenizer())
    bigram = generate_canaries(load_spec("bigram", {"length": 2}), seed=0, tiers=[1], members_per_tier=1, references=1,
                               context=ctx)
    assert bigram.space.alphabet == ["the", "cat", "dog", "owl", "yak"] and bigram.space.log2_size == pytest.approx(2 * 2.321928)


def test_each_secret_tokenizes_into_exactly_its_drawn_tokens(tiny_model):
    _, tokenizer = tiny_model
    words = dict((w, i) for i, w in whole_word_tokens(tokenizer))
    assert len(words) >= 32
    for name in ("rare_tokens", "bigram"):
        spec = load_spec(name)
        canaries = generate_canaries(spec, seed=3, context=GenerationContext(tokenizer=tokenizer))
        assert len(canaries.canaries) == 12 and spec_needs_model(spec)  # drawn when the audit runs, not by validate
        for c in canaries.canaries:
            ids = tokenizer(" " + c.secret, add_special_tokens=False)["input_ids"]
            assert ids == [words[w] for w in c.secret.split(" ")] and len(ids) == 4, (name, c.secret)
    rare = generate_canaries(load_spec("rare_tokens", {"pool": 16}), seed=3, context=GenerationContext(tokenizer=tokenizer))
    highest = {w for _, w in whole_word_tokens(tokenizer)[-16:]}
    assert all(set(c.secret.split(" ")) <= highest for c in rare.canaries)


def test_a_token_design_without_a_tokenizer_says_what_it_needs():
    with pytest.raises(AuditError, match="draws its secrets from the base model's tokenizer"):
        generate_canaries(load_spec("bigram"), seed=0)
    with pytest.raises(AuditError, match="unknown param 'pol'. Did you mean 'pool'"):
        load_spec("rare_tokens", {"pol": 3})


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["rare_tokens", "bigram"])
def test_a_tiny_audit_runs_end_to_end_on_each_design(spec, in_tmp):
    from audit.core.config import load_recipe
    from audit.core.store import read_scores
    from audit.pipeline import run_audit

    recipe = load_recipe("tiny/lora_cpu", [f"canaries.spec={spec}", "scoring.exact_exposure=false",
                                           "scoring.sampled_extraction_samples=0"])
    result = run_audit(recipe, tracking=False, progress=False)
    report = result.report
    assert report.canaries.spec == spec and report.space_bits > 20
    top = {t.repetitions: t for t in report.tiers}[16]
    # the 16-copy canaries are learned (their base exposure is withheld from the shared report: 2 canaries, below the
    # disclosure rule's group; the run directory's scores have it)
    base = [s.exposure for s in read_scores(result.run_dir / "scores.jsonl", model="base") if s.repetitions == 16]
    assert "base" not in top.exposure_mean and top.exposure_mean["tuned"] > sum(base) / len(base)
    assert "privacy.eps_lb/steinke" in report.metrics and "mia.auc/loss_diff" in report.metrics
