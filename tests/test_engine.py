"""The scoring engine against a plain per-sequence transformers computation (tiny-llama, CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.score.engine import (
    adapter_disabled,
    candidate_nll_bits,
    default_token_budget,
    greedy_continuations,
    output_cache,
    plan_batches,
    sampled_continuations,
    score_token_sequences,
    torch_threads,
    vocab_reductions,
    with_cache,
)

TEXTS = [
    "Note for the file: the vault access code of Ms. Halloway is 481927.",
    "hi",
    "For the record, the locker combination of Dr. Moreau is 000111.",
    "Security memo: Mr. Novak changed the alarm PIN to 93.",
    "x",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny-model ops: a second OpenMP thread only waits on a shared 2-core machine
        yield


def _plain(model, ids: list[int]):
    """One sequence, one forward pass, full log_softmax: the reference every batched number must match."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    target = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * (logp - mu[:, None]) ** 2).sum(-1)
    return target.numpy(), mu.numpy(), var.numpy()


@pytest.fixture(scope="module")
def encoded(tiny_model):
    _, tok = tiny_model
    return [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("budget", [8, 64, 4096])
def test_batched_scores_equal_per_sequence_transformers(tiny_model, encoded, budget):
    model, tok = tiny_model
    scores = score_token_sequences(model, encoded, token_budget=budget, pad_token_id=tok.pad_token_id)
    for ids, s in zip(encoded, scores, strict=True):
        lp, mu, var = _plain(model, ids)
        assert s.token_ids == ids
        assert s.logprobs.shape == (len(ids) - 1,)
        np.testing.assert_allclose(s.logprobs, lp, atol=1e-4)
        np.testing.assert_allclose(s.vocab_mean, mu, atol=1e-4)
        np.testing.assert_allclose(s.vocab_var, var, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(s.top1, _plain_top1(model, ids))


def _plain_top1(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return (logits.argmax(-1) == torch.tensor(ids[1:])).numpy()


def test_top1_says_whether_the_target_is_the_argmax_on_hand_made_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 1.0], [2.0, 2.0, 0.0], [0.0, 0.0, 9.0]])
    targets = torch.tensor([1, 2, 1, 2])
    got = vocab_reductions(logits, targets, with_stats=False, with_top1=True)
    assert got.top1.tolist() == [True, False, False, True]  # row 2 ties 0 and 1: the first maximum wins, as argmax
    assert got.mean is None and got.var is None
    assert vocab_reductions(logits, targets, with_stats=False).top1 is None  # only on request (candidate scoring)
    empty = vocab_reductions(logits[:0], targets[:0], with_stats=True, with_top1=True)
    assert empty.top1.shape == (0,) and empty.mean.shape == (0,)


def test_a_batch_where_the_model_often_predicts_the_next_token_gets_true_top1(tiny_model):
    """The check can fail: a sequence the tiny model greedily wrote itself has every continuation token at top 1."""
    model, tok = tiny_model
    prompt = tok("Note for the file:", add_special_tokens=False)["input_ids"]
    written = greedy_continuations(model, tok, [prompt], max_new_tokens=8)[0]
    s = score_token_sequences(model, [prompt + written], vocab_stats=False)[0]
    assert s.top1[len(prompt) - 1:].all() and s.top1.dtype == bool
    assert s.span(len(prompt)).top1.tolist() == s.top1[len(prompt) - 1:].tolist()


def test_vocab_mean_keeps_its_precision_on_a_peaked_token():
    """mu = sum p ln p on a token the model is sure of: ~-1e-7, while E_p[x] and logsumexp(x) are both ~20. Taking
    their fp32 difference loses everything (ulp(20) = 1.9e-6); reducing over ln p directly keeps it to 1e-5 relative."""
    g = torch.Generator().manual_seed(0)
    vocab = 49152
    rows = []
    for top in (12.0, 20.0, 23.5):
        x = torch.randn(vocab, generator=g) - 10.0
        x[7] = top
        rows.append(x)
    logits = torch.stack(rows)
    targets = torch.full((3,), 7)
    lp, _, mu, var = vocab_reductions(logits, targets, with_stats=True)
    ref = torch.log_softmax(logits.double(), dim=-1)
    p = ref.exp()
    mu_ref = (p * ref).sum(-1)
    var_ref = (p * (ref - mu_ref[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(mu.double().numpy(), mu_ref.numpy(), rtol=1e-5, atol=0)
    np.testing.assert_allclose(var.double().numpy(), var_ref.numpy(), rtol=1e-5, atol=0)
    np.testing.assert_allclose(lp.double().numpy(), ref[:, 7].numpy(), atol=1e-6)


def test_spans_and_bits(tiny_model, encoded):
    model, tok = tiny_model
    s = score_token_sequences(model, encoded[:1], vocab_stats=False)[0]
    assert s.vocab_mean is None
    tail = s.span(5)
    np.testing.assert_array_equal(tail.logprobs, s.logprobs[4:])
    assert s.bits == pytest.approx(-s.logprobs.sum() / np.log(2))
    with pytest.raises(ValueError):
        s.span(0)


def test_plan_batches_respects_the_budget():
    lengths = [3, 10, 7, 7, 1, 12, 2]
    batches = plan_batches(lengths, 20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20
    assert batches[0][0] == 5  # longest first


def test_candidate_scoring_with_shared_prefix_equals_full_sequences(tiny_model):
    model, tok = tiny_model
    prefix = tok("the vault access code is ", add_special_tokens=False)["input_ids"]
    cands = [tok(c, add_special_tokens=False)["input_ids"] for c in ["481927", "0", "12", "999999."]]
    got = candidate_nll_bits(model, prefix, cands, batch_size=3)
    for c, bits in zip(cands, got, strict=True):
        lp = _plain(model, prefix + c)[0][len(prefix) - 1 :]
        assert bits == pytest.approx(-lp.sum() / np.log(2), abs=1e-4)


@pytest.mark.parametrize("shared_levels", [0, 1, 2, 4])
def test_candidates_sharing_first_tokens_score_as_full_sequences(tiny_model, shared_levels):
    """The trie levels (shared first tokens, repeats, candidates shorter than the shared depth, batches smaller than a
    level) give every candidate the bits of its own teacher-forced sequence."""
    model, tok = tiny_model
    prefix = tok("the vault access code is ", add_special_tokens=False)["input_ids"]
    texts = ["481927", "481900", "481927", "4", "48", "12", "129", "999999.", "0", "481", "7777777777"]
    cands = [tok(c, add_special_tokens=False)["input_ids"] for c in texts]
    assert len({tuple(c[:2]) for c in cands}) < len(cands)  # the trie really shares nodes
    got = candidate_nll_bits(model, prefix, cands, batch_size=2, shared_levels=shared_levels)
    for c, bits in zip(cands, got, strict=True):
        lp = _plain(model, prefix + c)[0][len(prefix) - 1 :]
        assert bits == pytest.approx(-lp.sum() / np.log(2), abs=1e-4)


def test_batched_greedy_equals_one_at_a_time(tiny_model, encoded):
    model, tok = tiny_model
    prefixes = [e[:8] for e in encoded if len(e) >= 8] + [encoded[1]]
    batched = greedy_continuations(model, tok, prefixes, max_new_tokens=6, batch_size=4)
    for p, cont in zip(prefixes, batched, strict=True):
        assert cont == greedy_continuations(model, tok, [p], max_new_tokens=6, batch_size=1)[0]
        assert len(cont) == 6


def test_sampling_is_seeded(tiny_model, encoded):
    model, tok = tiny_model
    prefixes = [encoded[0][:10], encoded[2][:6]]
    a = sampled_continuations(model, tok, prefixes, num_samples=5, max_new_tokens=4, seed=3)
    b = sampled_continuations(model, tok, prefixes, num_samples=5, max_new_tokens=4, seed=3)
    c = sampled_continuations(model, tok, prefixes, num_samples=5, max_new_tokens=4, seed=4)
    assert a == b
    assert a != c
    assert [len(x) for x in a] == [5, 5] and all(len(s) == 4 for x in a for s in x)
    assert len({tuple(s) for s in a[0]}) > 1  # an untrained model samples different continuations


def test_samples_continue_each_prefix_from_its_own_cached_keys(tiny_model, encoded):
    """At a temperature near 0 sampling is greedy decoding: the shared prefill (left padding, positions, the cache
    repeated per sample) must give every sample the greedy continuation of its own prefix."""
    model, tok = tiny_model
    prefixes = [encoded[0][:10], encoded[2][:6], encoded[1][:3], encoded[3][:1]]
    sampled = sampled_continuations(model, tok, prefixes, num_samples=3, max_new_tokens=5, seed=0, temperature=1e-4,
                                    batch_size=6)
    for p, samples in zip(prefixes, sampled, strict=True):
        greedy = greedy_continuations(model, tok, [p], max_new_tokens=5, batch_size=1)[0]
        assert samples == [greedy] * 3


def test_adapter_disabled_scores_the_base_weights(tiny_model_dir, encoded):
    from peft import LoraConfig, get_peft_model

    from audit.data.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    plain = score_token_sequences(base, encoded[:2])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    tuned = score_token_sequences(peft_model, encoded[:2])
    with adapter_disabled(peft_model) as m:
        again = score_token_sequences(m, encoded[:2])
    for p, t, a in zip(plain, tuned, again, strict=True):
        np.testing.assert_allclose(a.logprobs, p.logprobs, atol=1e-6)
        assert not np.allclose(t.logprobs, p.logprobs, atol=1e-4)
    with pytest.raises(TypeError, match="no PEFT adapter"):
        with adapter_disabled(base):
            pass


def test_the_cache_goes_in_under_the_name_the_model_declares(tiny_model):
    """transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40); a model whose forward
    still names past_key_values (remote code, older transformers) gets that name."""
    model, _ = tiny_model
    marker = object()
    assert with_cache(model, marker) == {"cache": marker}

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return past_key_values

    assert with_cache(OldStyle(), marker) == {"past_key_values": marker}
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert output_cache(out) is out["cache"] and output_cache(out).get_seq_length() == 3


def test_cuda_token_budget_depends_on_the_device_not_on_free_memory(monkeypatch, tiny_model):
    """Free memory changes after training or beside other jobs; the batch plan (and in bf16 the numbers) must not."""
    import audit.score.engine as engine

    model, _ = tiny_model
    vocab = model.get_output_embeddings().weight.shape[0]

    class Props:
        total_memory = 80 << 30

    monkeypatch.setattr(engine, "device_of", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: pytest.fail("the budget must not read free memory"))
    assert default_token_budget(model) == min(65536, (80 << 30) // 8 // (vocab * 12))
