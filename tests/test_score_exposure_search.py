"""Exact exposure by pruned trie walk: agrees with exhaustive enumeration, and sits at the null when unlearned."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from audit.core.schema import SecretSpace
from audit.data.canaries import generate_canaries, load_spec
from audit.metrics import exposure_interpolation, null_exposure_mean
from audit.score.engine import candidate_nll_bits, torch_threads
from audit.score.exposure_search import (
    NotCompositionalError,
    choose_exact_method,
    enumerate_rank,
    exact_rank,
    expected_walk_rows,
    parse_secret,
    symbol_tokens,
    trie_rows,
)

DIGITS3 = SecretSpace(alphabet=list("0123456789"), length=3)
PREFIX = "Note for the file: the vault access code of Ms. Halloway is "


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny-model ops: a second OpenMP thread only waits on a shared 2-core machine
        yield


def _all_secrets(space):
    return [f"{i:0{space.length}d}" for i in range(space.size)]


@pytest.fixture(scope="module")
def brute_force(tiny_model):
    """Every secret's NLL from the independent shared-prefix scorer (no trie)."""
    model, tok = tiny_model
    table = symbol_tokens(tok, PREFIX, DIGITS3, "000")
    secrets = _all_secrets(DIGITS3)
    bits = candidate_nll_bits(model, table.prefix_ids, [table.tokens(parse_secret(DIGITS3, s)) for s in secrets], batch_size=256)
    return table, secrets, np.array(bits)


def test_parse_secret():
    assert parse_secret(DIGITS3, "042") == [0, 4, 2]
    spaced = SecretSpace(alphabet=["ab", "c"], length=2, separator="-")
    assert parse_secret(spaced, "c-ab") == [1, 0]
    assert parse_secret(SecretSpace(alphabet=["ab", "c"], length=2), "cab") == [1, 0]
    with pytest.raises(ValueError):
        parse_secret(DIGITS3, "04")


def test_digit_pieces_are_single_tokens(tiny_model):
    _, tok = tiny_model
    table = symbol_tokens(tok, PREFIX, DIGITS3, "481")
    assert all(len(piece) == 1 for row in table.pieces for piece in row)
    assert table.prefix_ids + table.tokens([4, 8, 1]) == tok(PREFIX + "481", add_special_tokens=False)["input_ids"]


def test_pruned_walk_equals_exhaustive_and_brute_force(tiny_model, brute_force):
    model, _ = tiny_model
    table, secrets, bits = brute_force
    order = np.argsort(bits, kind="stable")
    for k in (order[0], order[1], order[17], order[500], order[-1]):
        canary = parse_secret(DIGITS3, secrets[k])
        pruned = exact_rank(model, table, canary)
        full = exact_rank(model, table, canary, prune=False, node_budget=None)
        expected = 1 + int(np.count_nonzero(np.delete(bits, k) <= bits[k]))
        assert pruned.status == full.status == "exact"
        assert pruned.rank == full.rank == expected
        assert pruned.canary_nll_bits == pytest.approx(bits[k], abs=1e-4)
        assert full.frontier == [10, 100, 1000]
        assert pruned.nodes_evaluated <= full.nodes_evaluated == 111
        assert pruned.exposure == pytest.approx(math.log2(1000) - math.log2(expected))
    top = exact_rank(model, table, parse_secret(DIGITS3, secrets[order[0]]))
    assert top.frontier[-1] < 1000  # even a near-uniform random model prunes at the last level


def test_exact_rank_matches_the_interpolation_formula(brute_force):
    _, secrets, bits = brute_force
    k = 123
    rank = 1 + int(np.count_nonzero(np.delete(bits, k) <= bits[k]))
    # the same rank through the public sampled formula with the whole space as references
    assert exposure_interpolation([bits[k]], np.delete(bits, k))[0] == pytest.approx(math.log2(1000) - math.log2(rank))


def test_budget_exceeded_reports_no_rank(tiny_model, brute_force):
    model, _ = tiny_model
    table, secrets, bits = brute_force
    worst = parse_secret(DIGITS3, secrets[int(np.argmax(bits))])
    out = exact_rank(model, table, worst, node_budget=20)
    assert out.status == "budget_exceeded" and out.rank is None and out.exposure is None
    assert out.nodes_evaluated <= 20


def test_unlearned_canaries_average_the_null(tiny_model):
    """Canaries the model never saw have uniform ranks: mean exposure ~ 1/ln 2 (1.44 bits), not 0."""
    model, tok = tiny_model
    spec = load_spec("digits", {"length": 3})
    canaries = generate_canaries(spec, seed=11, tiers=[1], members_per_tier=16, references=16).canaries
    exposures = []
    for c in canaries:
        result = exact_rank(model, symbol_tokens(tok, c.prefix, DIGITS3, c.secret), parse_secret(DIGITS3, c.secret),
                            node_budget=None)
        exposures.append(result.exposure)
    null = null_exposure_mean(1000)
    assert null == pytest.approx(1 / math.log(2), abs=0.01)
    # 32 uniform ranks: the mean has standard deviation ~1.44 / sqrt(32) = 0.25 bits
    assert abs(float(np.mean(exposures)) - null) < 0.6
    assert max(exposures) < math.log2(1000)


class MergingTokenizer:
    """Characters are tokens, except that "12" merges into one token: not compositional over digits."""

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        ids, i = [], 0
        while i < len(text):
            if text.startswith("12", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_non_compositional_tokenizer_is_detected():
    with pytest.raises(NotCompositionalError):
        symbol_tokens(MergingTokenizer(), "code ", DIGITS3, "345")


def test_multi_token_symbols_walk_equals_brute_force(tiny_model):
    """Word symbols span several tokens: the recomputing branch of the walk must rank exactly too."""
    model, tok = tiny_model
    space = SecretSpace(alphabet=["canoe", "zebra", "xylo", "quartz"], length=3, separator=" ")  # space stays its own token
    table = symbol_tokens(tok, "the passphrase is ", space, "canoe zebra xylo")
    assert any(len(piece) > 1 for row in table.pieces for piece in row)
    secrets = [[a, b, c] for a in range(4) for b in range(4) for c in range(4)]
    bits = np.array(candidate_nll_bits(model, table.prefix_ids, [table.tokens(s) for s in secrets]))
    for k in (int(np.argmin(bits)), 21, int(np.argmax(bits))):
        pruned = exact_rank(model, table, secrets[k])
        full = exact_rank(model, table, secrets[k], prune=False, node_budget=None)
        assert pruned.rank == full.rank == 1 + int(np.count_nonzero(np.delete(bits, k) <= bits[k]))
        assert full.frontier == [4, 16, 64]


class SteppedRounding(torch.nn.Module):
    """The real tiny model, except that one-token steps after a cache (how the walk decodes) see logits shifted by a
    fixed per-token pattern of up to ``eps`` nats, while multi-token passes (the teacher-forced threshold) do not: the
    walk-vs-threshold gap that bf16 shows on SmolLM2 (+0.196 nats), at a size the test controls."""

    def __init__(self, inner, eps: float):
        super().__init__()
        self.inner = inner
        vocab = inner.get_output_embeddings().weight.shape[0]
        self.register_buffer("shift", eps * torch.sin(torch.arange(vocab, dtype=torch.float32) * 1.7), persistent=False)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        out = self.inner(input_ids=input_ids, cache=cache, **kwargs)
        if cache is not None and input_ids.shape[1] == 1:
            out.logits = out.logits + self.shift
        return out


def test_walk_reaches_an_exact_rank_when_its_arithmetic_disagrees_with_the_threshold(tiny_model, brute_force):
    """A positive walk-vs-threshold gap once pruned the canary itself and raised; now the canary's path is kept and the
    walk reruns at the limit its own arithmetic gives, so the rank equals the unpruned walk's."""
    model, _ = tiny_model
    table, secrets, bits = brute_force
    stepped = SteppedRounding(model, eps=0.2).eval()
    order = np.argsort(bits, kind="stable")
    rewalked = 0
    for k in order[:40]:
        canary = parse_secret(DIGITS3, secrets[k])
        pruned = exact_rank(stepped, table, canary, node_budget=None)
        full = exact_rank(stepped, table, canary, prune=False, node_budget=None)
        assert pruned.status == full.status == "exact"
        assert pruned.rank == full.rank
        assert pruned.canary_nll_bits == pytest.approx(full.canary_nll_bits, abs=1e-9)
        rewalked += pruned.walks > 1
    assert rewalked >= 5  # the gap really exceeded the 1e-3 slack for a good share of these canaries


class Drifting(SteppedRounding):
    """Each one-token step costs a little more than the one before: no walk can reproduce the previous one's value."""

    def __init__(self, inner, digit_ids):
        super().__init__(inner, eps=0.0)
        self.digits = torch.tensor(digit_ids)
        self.calls = 0

    def forward(self, input_ids=None, cache=None, **kwargs):
        out = super().forward(input_ids=input_ids, cache=cache, **kwargs)
        if (cache is not None or "past_key_values" in kwargs) and input_ids.shape[1] == 1:
            self.calls += 1
            out.logits[..., self.digits] -= 0.01 * self.calls
        return out


def test_a_walk_that_cannot_agree_with_itself_reports_unstable_instead_of_raising(tiny_model, brute_force):
    model, _ = tiny_model
    table, secrets, bits = brute_force
    drifting = Drifting(model, [p[0] for p in table.pieces[1]]).eval()
    out = exact_rank(drifting, table, parse_secret(DIGITS3, secrets[int(np.argmin(bits))]), node_budget=None, slack_nats=0.0)
    assert out.status == "unstable" and out.rank is None and out.exposure is None
    assert out.walks == 3


# ------------------------------------------------------------------------ enumeration, and the choice between the two


DIGITS4 = SecretSpace(alphabet=list("0123456789"), length=4)


def test_enumeration_ranks_equal_the_walks_and_brute_force_on_4_digits(tiny_model):
    """The whole-trie enumeration and the pruned walk give the same exact rank: the most likely secret (the one a
    learned canary would be), a near-top one and mid-rank ones, against the independent shared-prefix scorer."""
    model, tok = tiny_model
    table = symbol_tokens(tok, PREFIX, DIGITS4, "0000")
    secrets = _all_secrets(DIGITS4)
    bits = np.array(candidate_nll_bits(model, table.prefix_ids, [table.tokens(parse_secret(DIGITS4, s)) for s in secrets],
                                       batch_size=512))
    order = np.argsort(bits, kind="stable")
    for k in (order[0], order[9], order[5000], order[7777]):
        canary = parse_secret(DIGITS4, secrets[k])
        walk = exact_rank(model, table, canary, node_budget=None)
        enum = enumerate_rank(model, table, canary)
        expected = 1 + int(np.count_nonzero(np.delete(bits, k) <= bits[k]))
        assert (walk.status, walk.method) == ("exact", "walk") and (enum.status, enum.method) == ("exact", "enumeration")
        assert enum.rank == walk.rank == expected
        assert enum.canary_nll_bits == pytest.approx(walk.canary_nll_bits, abs=1e-6)
        assert enum.nodes_evaluated == trie_rows(10, 4) == 1111 and enum.walks == 1
        assert enum.frontier == [10, 100, 1000, 10000]
        assert walk.nodes_evaluated <= enum.nodes_evaluated


class Flat(torch.nn.Module):
    """The real tiny model's cache, with every logit set to zero: all secrets cost exactly the same."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        out = self.inner(input_ids=input_ids, cache=cache, **kwargs)
        out.logits = torch.zeros_like(out.logits)
        return out


def test_ties_count_against_the_canary_in_both_methods(tiny_model):
    """Every secret ties with every other: rank |R| (the paper's convention), by the walk and by the enumeration."""
    model, tok = tiny_model
    flat = Flat(model).eval()
    table = symbol_tokens(tok, PREFIX, DIGITS3, "000")
    for secret in ("000", "517", "999"):
        walk = exact_rank(flat, table, parse_secret(DIGITS3, secret), node_budget=None)
        enum = enumerate_rank(flat, table, parse_secret(DIGITS3, secret))
        assert walk.rank == enum.rank == 1000
        assert walk.exposure == enum.exposure == 0.0
        assert walk.canary_nll_bits == pytest.approx(3 * math.log2(len(tok)))


def test_trie_rows_count_every_node_with_children():
    assert trie_rows(10, 6) == 111_111
    assert trie_rows(10, 3) == 111
    assert trie_rows(4, 3) == 1 + 4 + 16


def test_the_chooser_walks_a_low_rank_and_enumerates_a_rank_that_cannot_prune():
    six = dict(alphabet_size=10, length=6)
    low = choose_exact_method(rank_estimate=22, budget=200_000, **six)
    assert low.method == "walk" and low.walk_rows == 220 and low.enumeration_rows == 111_111
    mid = choose_exact_method(rank_estimate=500_000, budget=200_000, **six)
    assert mid.method == "enumeration" and mid.walk_rows == 111_111  # the walk is capped by the trie: a tie
    # the walk's rank rule fails (10 x 20,000 > 150,000) but the whole trie fits
    assert choose_exact_method(rank_estimate=20_000, budget=150_000, **six).method == "enumeration"


def test_the_chooser_keeps_the_old_decision_when_the_trie_exceeds_the_budget():
    """Default budget 2,000 rows < 111,111: walk iff |A| x estimate <= budget, as before; an unlearned canary skips."""
    six = dict(alphabet_size=10, length=6, budget=2_000)
    assert choose_exact_method(rank_estimate=200, **six).method == "walk"
    assert choose_exact_method(rank_estimate=200.01, **six).method == "skip"
    unlearned = choose_exact_method(rank_estimate=500_000, **six)
    assert unlearned.method == "skip" and "111111 rows" in unlearned.reason


def test_the_chooser_weighs_measured_costs_per_row_and_reruns():
    six = dict(alphabet_size=10, length=6, budget=200_000)
    # rank 5,000: 50,000 walk rows against 111,111 enumeration rows
    assert choose_exact_method(rank_estimate=5_000, **six).method == "walk"
    # enumeration rows 3x cheaper (e.g. larger batches): 111,111 / 3 < 50,000
    cheap = choose_exact_method(rank_estimate=5_000, walk_row_s=3e-3, enumeration_row_s=1e-3, **six)
    assert cheap.method == "enumeration"
    assert cheap.walk_s == pytest.approx(150.0) and cheap.enumeration_s == pytest.approx(111.111)
    # a walk expected to run 3 times (reduced precision) costs 150,000 rows
    assert choose_exact_method(rank_estimate=5_000, walks_expected=3.0, **six).method == "enumeration"


def test_scoring_enumerates_where_the_walk_cannot_prune_and_walks_where_it_can(tiny_model):
    """score_canaries within a budget that holds the whole 3-digit trie: a canary whose sampled rank is low is walked
    (status exact), the others enumerated (status enumerated), each with the rank the pruned walk gives."""
    from audit.core.schema import ScoringSection
    from audit.data.canaries import reference_secrets
    from audit.score.canaries import score_canaries

    model, tok = tiny_model
    spec = load_spec("digits", {"length": 3})
    canaries = generate_canaries(spec, seed=5, tiers=[1], members_per_tier=3, references=3)
    refs = reference_secrets(spec, canaries, n=31, seed=5)
    section = ScoringSection(exposure_references=31, exact_exposure_budget=10_000, sampled_extraction_samples=0)
    rows = score_canaries(model, tok, canaries, refs, label="base", section=section, progress=False, seed=1)
    for row, c in zip(rows, canaries.canaries, strict=True):
        walk = exact_rank(model, symbol_tokens(tok, c.prefix, DIGITS3, c.secret, seed=1), parse_secret(DIGITS3, c.secret))
        estimate = 1 + (row.rank - 1) / 31 * 999
        assert row.exact_status == ("exact" if 10 * estimate < 111 else "enumerated")
        assert row.exact_rank == walk.rank
        assert row.exact_nodes == (walk.nodes_evaluated if row.exact_status == "exact" else 111)
    assert "enumerated" in {r.exact_status for r in rows}


def test_expected_walk_rows_from_the_losses():
    """A memorized canary (loss far under any one symbol's) costs one row per level; one whose loss is above what
    random secrets cost before their last symbol costs the whole trie; in between, the kept share per level."""
    refs = np.random.default_rng(0).normal(60.0, 3.0, size=255)  # 10 bits per symbol, as a near-uniform model
    assert expected_walk_rows(0.05, refs, 10, 6) == pytest.approx(6.0)
    assert expected_walk_rows(70.0, refs, 10, 6) == pytest.approx(trie_rows(10, 6), abs=1e-3)
    middle = expected_walk_rows(45.0, refs, 10, 6)  # around the 5-symbol prefixes' mean (50 bits): part of level 5 kept
    assert 11_111 < middle < 111_111


def test_the_chooser_takes_the_walks_rows_from_the_losses_when_given():
    six = dict(alphabet_size=10, length=6)
    # rank 1, but its loss says the walk would expand 85,000 rows (tiny-llama's 16x canary): beyond 2,000, skip at once
    assert choose_exact_method(rank_estimate=1, budget=2_000, **six).method == "walk"
    assert choose_exact_method(rank_estimate=1, budget=2_000, walk_rows=85_000, **six).method == "skip"
    assert choose_exact_method(rank_estimate=1, budget=200_000, walk_rows=85_000, **six).method == "walk"
    # a rank the rank rule would skip (10 x 500 > 2,000) whose loss says the walk prunes to 300 rows
    assert choose_exact_method(rank_estimate=500, budget=2_000, walk_rows=300, **six).method == "walk"


def test_a_walk_that_cannot_finish_falls_back_to_the_enumeration_within_the_budget(tiny_model):
    """_exact: the walk runs (a low sampled rank), cannot agree with itself (Drifting), and the whole 3-digit trie
    still fits the budget: the enumeration ranks it, status enumerated, rows of both counted."""
    from audit.core.schema import ScoringSection
    from audit.score.canaries import _exact

    model, tok = tiny_model
    spec = load_spec("digits", {"length": 3})
    canaries = generate_canaries(spec, seed=5, tiers=[1], members_per_tier=1, references=1)
    c = canaries.canaries[0]
    table = symbol_tokens(tok, c.prefix, DIGITS3, c.secret, seed=1)
    section = ScoringSection(exposure_references=31, exact_exposure_budget=10_000)
    drifting = Drifting(model, [p[0] for p in table.pieces[1]]).eval()
    status, rank, rows = _exact(drifting, tok, c, canaries, section, rank=1, n_refs=31, seed=1)
    assert status == "enumerated" and rows > 111
    fresh = Drifting(model, [p[0] for p in table.pieces[1]]).eval()
    assert rank == enumerate_rank(fresh, table, parse_secret(DIGITS3, c.secret)).rank
    tight = section.model_copy(update={"exact_exposure_budget": 150})  # walk fits (10 x 1 rows), the trie after it does not
    fresh = Drifting(model, [p[0] for p in table.pieces[1]]).eval()
    status, rank, _ = _exact(fresh, tok, c, canaries, tight, rank=1, n_refs=31, seed=1)
    assert status in {"unstable", "budget_exceeded"} and rank is None
