"""DP-SGD on LoRA with Opacus (audit.train.dp): bad settings refused before training, a run on tiny-llama that moves
only the adapter and reports the accountant's eps for the steps it took, and the silent no-op caught."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from audit.errors import AuditError
from audit.schema import LoraSection
from audit.train.dp import DPNoOpError, DPSettings, check_dp_settings, per_record_mean_loss

pytest.importorskip("opacus")

TEXTS = [f"Note {i}: the door code of room {i} is {100000 + 7919 * i}." for i in range(40)]


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
    from audit.models import load_model_and_tokenizer
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
    from audit.models import load_model_and_tokenizer
    from audit.train.dp import train_dp_lora

    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(DPNoOpError, match="left the LoRA weights unchanged"):
        train_dp_lora(model, tok, TEXTS[:16], settings=DPSettings(noise_multiplier=1.0, delta=1e-3), lora=LoraSection(),
                      epochs=1, batch_size=8, learning_rate=0.0, max_length=32, weights_dir=tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # nothing saved for a run that did nothing


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_no_one_run_bound_exceeds_the_accountants_eps(tiny_model_dir, tmp_path, epsilon):
    """Soundness on a real DP run: 100 single-copy canaries, each inserted by a fair coin, DP-LoRA at eps, then every
    bound method on loss_diff guesses (all canaries, and the best-of-k grid) stays at or below eps_accountant.

    Measured: tiny-llama learns nothing at these settings (loss_diff AUC 0.58 at eps 1, 0.44 at eps 8) and every bound
    is 0, so this guards the wiring and the direction, not tightness; the SmolLM2 table is the lead's to measure."""
    import numpy as np

    from audit.metrics.privacy import BOUND_METHODS, best_of_guess_counts, epsilon_lower_bound_by, one_run_guesses
    from audit.models import load_model_and_tokenizer
    from audit.score.engine import pad_id_of, score_token_sequences, split_tokens
    from audit.train.dp import train_dp_lora

    rng = np.random.default_rng(int(epsilon))
    canaries = [(f"The locker code of Ms. Rivera, room {i}, is ", f"{rng.integers(0, 10**6):06d}") for i in range(100)]
    member = rng.random(100) < 0.5
    records = [f"Room {i} was cleaned on day {i % 7} by the morning staff." for i in range(100)]
    records += [p + s + "." for (p, s), m in zip(canaries, member, strict=True) if m]
    delta = 1e-4
    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    base_model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    result = train_dp_lora(model, tok, records, settings=DPSettings(epsilon=epsilon, delta=delta), lora=LoraSection(),
                           epochs=3, batch_size=16, learning_rate=2e-2, max_length=32, weights_dir=tmp_path / "adapter",
                           progress=False)
    splits = [split_tokens(tok, p, s) for p, s in canaries]
    seqs = [s.prefix_ids + s.secret_ids for s in splits]

    def secret_loss(m):
        out = score_token_sequences(m, seqs, vocab_stats=False, pad_token_id=pad_id_of(tok))
        return np.array([-o.span(len(s.prefix_ids)).logprobs.mean() for o, s in zip(out, splits, strict=True)])

    scores = secret_loss(base_model) - secret_loss(result.model)  # loss_diff, higher = member
    r, v = one_run_guesses(scores, member, k_pos=50, k_neg=50)
    assert result.eps_accountant <= epsilon * 1.01
    for method in BOUND_METHODS:
        assert epsilon_lower_bound_by(method, 100, r, v, delta=delta) <= result.eps_accountant, method
        if method != "xiang_eps_delta":
            best = best_of_guess_counts(scores, member, method=method, delta=delta)
            assert best.eps_lower_bound <= result.eps_accountant, method
