"""DP-SGD on LoRA with Opacus (audit.train.dp): bad settings refused before training, a run on tiny-llama that moves
only the adapter and reports the accountant's eps for the steps it took, and the silent no-op caught. Panda et al.'s
new-token canaries with the secret-span loss under DP: every record's per-sample gradient (token rows of the embedding
and the tied head included) is that record's own gradient, its clipped norm never exceeds the bound, and the
accountant is given the same mechanism as without them."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from audit.core.errors import AuditError
from audit.core.schema import LoraSection
from audit.data.canaries.tokens import new_token_pool
from audit.data.validate import check_dp_settings
from audit.train.dp import DPNoOpError, DPSettings, per_record_mean_loss

pytest.importorskip("opacus")

TEXTS = [f"Note {i}: the door code of room {i} is {100000 + 7919 * i}." for i in range(40)]
POOL = new_token_pool(16)
PREFIX = "Archive key of room {i}: "
SECRETS = ["".join(POOL[(i * k + k) % 16] for k in (1, 3, 5)) for i in range(40)]
CANARY_TEXTS = [PREFIX.format(i=i) + SECRETS[i] + "." if i % 4 == 0 else TEXTS[i] for i in range(40)]
SPANS = {i: [(len(PREFIX.format(i=i)), len(PREFIX.format(i=i)) + len(SECRETS[i]))] for i in range(0, 40, 4)}
"""Every fourth record carries a three-token new-token secret, labelled alone (training.loss=secret); the rest are
ordinary notes trained on every token."""


@pytest.mark.parametrize(("settings", "message"), [
    (DPSettings(epsilon=0.0), "epsilon must be a positive number"),
    (DPSettings(epsilon=-1.0), "epsilon must be a positive number"),
    (DPSettings(epsilon=1000.0), "beyond 64"),
    (DPSettings(), "exactly one of epsilon and noise_multiplier"),
    (DPSettings(epsilon=4.0, noise_multiplier=1.0), "exactly one of epsilon and noise_multiplier"),
    (DPSettings(epsilon=4.0, delta=0.025), "must lie in (0, 1/n)"),
    (DPSettings(epsilon=4.0, delta=0.0), "must lie in (0, 1/n)"),
    (DPSettings(noise_multiplier=0.0), "noise_multiplier must be > 0"),
    (DPSettings(epsilon=4.0, max_grad_norm=0.0), "max_grad_norm must be > 0"),
])
def test_bad_dp_settings_are_one_line_errors_with_a_fix(settings, message):
    with pytest.raises(AuditError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        check_dp_settings(settings, n_records=40)
    assert "\n" not in str(info.value) and "(fix: " in str(info.value)


def test_per_record_loss_ignores_the_other_records_lengths():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5], [1, 2, -100, -100, -100]])
    both = per_record_mean_loss(logits, labels)
    alone = per_record_mean_loss(logits[:1], labels[:1])
    assert both[0] == pytest.approx(float(alone[0]))
    # record 1 has one labelled next token: its loss is that token's cross-entropy
    assert both[1] == pytest.approx(float(torch.nn.functional.cross_entropy(logits[1, 0:1], labels[1, 1:2])))


@pytest.fixture(scope="module")
def dp_run(tiny_model_dir, tmp_path_factory):
    from audit.data.models import load_model_and_tokenizer
    from audit.train.dp import train_dp_lora

    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path_factory.mktemp("dp") / "adapter"
    result = train_dp_lora(model, tok, TEXTS, settings=DPSettings(noise_multiplier=1.0, delta=1e-3), lora=LoraSection(),
                           epochs=1, batch_size=8, learning_rate=1e-2, max_length=32, weights_dir=out, progress=False)
    return result, base, out


def test_dp_lora_moves_only_the_adapter_and_saves_safetensors(dp_run):
    result, base, out = dp_run
    assert result.steps == 5 and result.lora_delta_max > 0
    for name, p in result.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), base[name.replace(".base_layer", "")]), name
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved) and any(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)


def test_reported_eps_is_the_accountants_for_the_steps_taken(dp_run):
    from opacus.accountants import PRVAccountant

    result = dp_run[0]
    accountant = PRVAccountant()
    for _ in range(result.steps):
        accountant.step(noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate)
    assert result.sample_rate == pytest.approx(8 / 40) and result.noise_multiplier == 1.0
    assert result.eps_accountant == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-3)
    assert 0 < result.eps_accountant < math.inf


def test_a_run_that_leaves_the_adapter_unchanged_fails_loudly(tiny_model_dir, tmp_path):
    from audit.data.models import load_model_and_tokenizer
    from audit.train.dp import train_dp_lora

    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(DPNoOpError, match="left the LoRA weights unchanged"):
        train_dp_lora(model, tok, TEXTS[:16], settings=DPSettings(noise_multiplier=1.0, delta=1e-3), lora=LoraSection(),
                      epochs=1, batch_size=8, learning_rate=0.0, max_length=32, weights_dir=tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # nothing saved for a run that did nothing


def _token_model(tiny_model_dir):
    """tiny-llama with the 16 added tokens, LoRA and trainable rows for them, LoRA B moved off zero (so that every
    trainable matrix has a gradient), plus its tokenizer and the encoded records."""
    from audit.data.models import load_model_and_tokenizer
    from audit.train.dp import _encode, dp_lora_model

    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu", added_tokens=POOL)
    torch.manual_seed(0)
    model, layers = dp_lora_model(model, LoraSection(), trainable_token_ids=tok.convert_tokens_to_ids(POOL))
    assert len(layers) == 2  # the embedding and the tied output head read the same rows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    picked = [0, 1, 4, 5, 8]  # three carry a secret, two do not
    ids, mask, labels = _encode(tok, [CANARY_TEXTS[i] for i in picked], 64, {k: SPANS[i] for k, i in enumerate(picked)
                                                                            if i in SPANS})
    return model, ids, mask, labels


def _own_gradients(model, ids, mask, labels) -> list[list[torch.Tensor]]:
    """Each record's gradient of its own loss, computed alone by autograd (no Opacus): what DP-SGD must clip."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for b in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], use_cache=False).logits
        per_record_mean_loss(logits, labels[b:b + 1]).mean().backward()
        out.append([p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    return out


def test_secret_loss_labels_a_canary_records_secret_tokens_alone(tiny_model_dir):
    from transformers import AutoTokenizer

    from audit.data.models import extend_tokenizer
    from audit.train.dp import _encode

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    extend_tokenizer(tok, POOL)
    ids, mask, labels = _encode(tok, CANARY_TEXTS[:2], 64, {0: SPANS[0]})
    kept = [int(t) for t, lab in zip(ids[0], labels[0], strict=True) if lab != -100]
    assert kept == tok.convert_tokens_to_ids([POOL[1], POOL[3], POOL[5]])  # SECRETS[0], nothing of its prefix or "."
    assert torch.equal(labels[1][mask[1] == 1], ids[1][mask[1] == 1])  # a record without a canary: every token


def test_each_records_per_sample_gradient_is_its_own_gradient_new_token_rows_included(tiny_model_dir):
    from audit.train.dp import TOKEN_ROWS, wrap_for_opacus

    model, ids, mask, labels = _token_model(tiny_model_dir)
    own = _own_gradients(model, ids, mask, labels)
    gsm = wrap_for_opacus(model)
    per_record_mean_loss(gsm(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels).mean().backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(TOKEN_ROWS in n or "trainable_tokens_delta" in n for n, _ in named) and len(named) == len(own[0])
    for j, (name, p) in enumerate(named):
        for b in range(ids.shape[0]):
            torch.testing.assert_close(p.grad_sample[b], own[b][j], rtol=1e-4, atol=1e-6, msg=f"{name}, record {b}")
    rows = next(j for j, (n, _) in enumerate(named) if TOKEN_ROWS in n or "trainable_tokens_delta" in n)
    assert own[0][rows].abs().max() > 0  # a canary record's gradient reaches its secret's rows: the check has teeth


def test_a_records_clipped_gradient_never_exceeds_the_clipping_norm(tiny_model_dir):
    from opacus.optimizers import DPOptimizer

    from audit.train.dp import wrap_for_opacus

    model, ids, mask, labels = _token_model(tiny_model_dir)
    own = _own_gradients(model, ids, mask, labels)
    bound = 0.05
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = wrap_for_opacus(model)
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=bound,
                            expected_batch_size=1)
    clipped_some = False
    for b in range(ids.shape[0]):  # one record per batch: the clipped sum is that record's clipped gradient
        optimizer.zero_grad(set_to_none=True)
        logits = gsm(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], use_cache=False).logits
        per_record_mean_loss(logits, labels[b:b + 1]).mean().backward()
        optimizer.clip_and_accumulate()
        clipped = torch.cat([p.summed_grad.flatten() for p in params])
        true = torch.cat([g.flatten() for g in own[b]])
        assert float(clipped.norm()) <= bound * (1 + 1e-5), b
        torch.testing.assert_close(clipped, true * min(1.0, bound / float(true.norm())), rtol=1e-4, atol=1e-7)
        clipped_some |= float(true.norm()) > bound
    assert clipped_some


def test_new_token_rows_and_the_secret_loss_leave_the_accountant_as_it_was(tiny_model_dir, tmp_path):
    """The same records, batch, epochs and target eps with and without the design: the same noise, q, steps and eps.
    The rows are trained and saved as PEFT's own adapter, which a freshly extended base reloads into the same model."""
    from audit.data.models import load_model_and_tokenizer
    from audit.train.dp import TOKEN_ROWS, train_dp_lora
    from audit.train.types import DeviceChoice, WeightsLayer
    from audit.train.weights import load_tuned

    runs = {}
    for design in ("plain", "new_tokens"):
        tokens = POOL if design == "new_tokens" else ()
        model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu", added_tokens=tokens)
        runs[design] = train_dp_lora(
            model, tok, CANARY_TEXTS if tokens else TEXTS, settings=DPSettings(epsilon=4.0, delta=1e-3),
            lora=LoraSection(), epochs=1, batch_size=8, learning_rate=1e-2, max_length=32, progress=False,
            weights_dir=tmp_path / design, trainable_token_ids=tok.convert_tokens_to_ids(POOL) if tokens else None,
            secret_spans=SPANS if tokens else None)
    plain, new = runs["plain"], runs["new_tokens"]
    assert (new.noise_multiplier, new.sample_rate, new.steps, new.eps_accountant) == (
        plain.noise_multiplier, plain.sample_rate, plain.steps, plain.eps_accountant)
    assert new.summary.trainable_params == plain.summary.trainable_params + 16 * 64  # LoRA plus one row per new token
    saved = load_file(str(tmp_path / "new_tokens" / "adapter_model.safetensors"))
    assert any("trainable_tokens_delta" in k for k in saved) and not any(TOKEN_ROWS in k for k in saved)
    base, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu", added_tokens=POOL)
    reloaded = load_tuned(base, [WeightsLayer("lora", tmp_path / "new_tokens")], device=DeviceChoice("cpu", "fp32", False))
    ids = torch.tensor([tok(CANARY_TEXTS[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, new.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [4.0, 8.0])
def test_no_one_run_bound_exceeds_the_accountants_eps(tiny_model_dir, tmp_path, epsilon):
    """Soundness on a real DP run that can fail it: 256 single-copy canaries in Panda et al.'s strongest design (each
    secret one added token of its own, the loss on the secret alone), each inserted by a fair coin, DP-LoRA at eps
    with large Poisson batches (q = 1/2), then every bound method on loss_diff guesses (all canaries, and the best-of-k
    grid) stays at or below eps_accountant, and at least one bound is above 0 (else soundness would hold vacuously).

    Measured (seed 0, CPU): loss_diff AUC 0.65 at eps 4 and 0.66 at eps 8; Steinke's bound 0.145 and 0.305, the
    largest 0.67 (xiang_gdp_best_k) and 1.26 (xiang_gdp) against eps_accountant 3.88 and 7.77. The six-digit
    canaries this test used before (batch 16, 3 epochs) were not learned at all under DP, and every bound was 0."""
    import numpy as np

    from audit.data.corpus import builtin_records
    from audit.data.models import load_model_and_tokenizer
    from audit.metrics.privacy import BOUND_METHODS, best_of_guess_counts, epsilon_lower_bound_by, one_run_guesses
    from audit.score.engine import pad_id_of, score_token_sequences, split_tokens
    from audit.train.dp import train_dp_lora

    m = 256
    pool = new_token_pool(1024)
    rng = np.random.default_rng(0)
    canaries = [(f"Archive key of person {i}: ", pool[j]) for i, j in enumerate(rng.permutation(1024)[:m])]
    member = rng.random(m) < 0.5
    records = [r["text"] for r in builtin_records("notes", n=120, seed=0)]
    spans = {}
    for (prefix, secret), inside in zip(canaries, member, strict=True):
        if inside:
            spans[len(records)] = [(len(prefix), len(prefix) + len(secret))]
            records.append(prefix + secret + ".")
    delta = 1e-4
    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu", added_tokens=pool)
    base_model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu", added_tokens=pool)
    result = train_dp_lora(model, tok, records, settings=DPSettings(epsilon=epsilon, delta=delta), lora=LoraSection(),
                           epochs=10, batch_size=128, learning_rate=2e-2, max_length=32, weights_dir=tmp_path / "adapter",
                           progress=False, trainable_token_ids=tok.convert_tokens_to_ids(pool), secret_spans=spans)
    assert result.sample_rate == 0.5
    splits = [split_tokens(tok, p, s) for p, s in canaries]
    seqs = [s.prefix_ids + s.secret_ids for s in splits]

    def secret_loss(model):
        out = score_token_sequences(model, seqs, vocab_stats=False, pad_token_id=pad_id_of(tok))
        return np.array([-o.span(len(s.prefix_ids)).logprobs.mean() for o, s in zip(out, splits, strict=True)])

    scores = secret_loss(base_model) - secret_loss(result.model)  # loss_diff, higher = member
    r, v = one_run_guesses(scores, member, k_pos=m // 2, k_neg=m // 2)
    assert result.eps_accountant <= epsilon * 1.01
    bounds = {}
    for method in BOUND_METHODS:
        bounds[method] = epsilon_lower_bound_by(method, m, r, v, delta=delta)
        if method != "xiang_eps_delta":
            bounds[f"{method}_best_k"] = best_of_guess_counts(scores, member, method=method, delta=delta).eps_lower_bound
    assert max(bounds.values()) > 0, f"every bound is 0: this run cannot fail soundness ({bounds})"
    assert all(b <= result.eps_accountant for b in bounds.values()), (bounds, result.eps_accountant)
