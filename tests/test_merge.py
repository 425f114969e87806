"""Merged weights: a LoRA adapter folded into its base scores like the adapter itself (tiny-llama, tolerance 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from audit.core.schema import ScoringSection, TrainingSection
from audit.data.canaries import generate_canaries, load_spec, reference_secrets
from audit.data.models import fingerprint_safetensors_dir, load_model_and_tokenizer
from audit.score.canaries import score_canaries
from audit.train.sft import choose_device, train_sft

TOLERANCE = 1e-4
FLOAT_FIELDS = ("secret_nll_bits", "mia_loss", "mia_min_k", "mia_min_k_pp", "mia_zlib", "text_bits")


@pytest.fixture(scope="module")
def tuned_with_merged(tiny_model_dir, tmp_path_factory):
    """A LoRA tune of tiny-llama on digit canaries with ``training.save_merged``: (train result, tokenizer, canaries)."""
    out = tmp_path_factory.mktemp("merge")
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    canaries = generate_canaries(load_spec("digits"), seed=0, tiers=[8], members_per_tier=2, references=2)
    texts = [c.text for c in canaries.members() for _ in range(c.repetitions)]
    texts += [f"note {i} about the weather" for i in range(16)]
    section = TrainingSection(method="lora", epochs=4, learning_rate=2e-2, batch_size=8, save_merged=True, checkpoint_every=0)
    trained = train_sft(model, tokenizer, texts, section=section, seed=0, work_dir=out / "trainer", weights_dir=out / "adapter",
                        device=choose_device(section), progress=False)
    return trained, tokenizer, canaries, tiny_model_dir


def test_merged_weights_are_saved_as_safetensors_with_their_fingerprint(tuned_with_merged):
    trained, _, _, base_dir = tuned_with_merged
    s = trained.summary
    merged = s.merged_path
    assert merged and [p.name for p in Path(merged).glob("*.safetensors")] == ["model.safetensors"]
    assert not list(Path(merged).glob("*.bin"))
    assert fingerprint_safetensors_dir(merged) == s.merged_fingerprint
    assert s.merged_fingerprint not in {s.weights_fingerprint, fingerprint_safetensors_dir(base_dir)}
    assert hasattr(trained.model, "disable_adapter")  # the adapter model itself is left intact by the merge


def test_adapter_and_merged_weights_give_the_same_scores(tuned_with_merged):
    trained, tokenizer, canaries, base_dir = tuned_with_merged
    merged, _ = load_model_and_tokenizer(trained.summary.merged_path, dtype=torch.float32, device="cpu")
    base, _ = load_model_and_tokenizer(base_dir, dtype=torch.float32, device="cpu")
    refs = reference_secrets(load_spec("digits"), canaries, n=31, seed=0)
    section = ScoringSection(exposure_references=31, exact_exposure=False, sampled_extraction_samples=2)
    with_adapter = score_canaries(trained.model, tokenizer, canaries, refs, label="tuned", section=section, progress=False,
                                  seed=0)
    with_merged = score_canaries(merged, tokenizer, canaries, refs, label="tuned", section=section, progress=False, seed=0)
    untuned = score_canaries(base, tokenizer, canaries, refs, label="base", section=section, progress=False, seed=0)
    moved = max(abs(a.secret_nll_bits - b.secret_nll_bits) for a, b in zip(with_adapter, untuned, strict=True))
    assert moved > 1.0  # the adapter is not a no-op, so agreement below means something
    for a, m in zip(with_adapter, with_merged, strict=True):
        assert a.canary_id == m.canary_id
        for name in FLOAT_FIELDS:
            assert getattr(a, name) == pytest.approx(getattr(m, name), abs=TOLERANCE), name
        assert (a.rank, a.extracted, a.extraction_lcp_tokens, a.sampled_matches) == (m.rank, m.extracted, m.extraction_lcp_tokens,
                                                                                     m.sampled_matches)
