"""``training.loss=secret`` (Panda et al. 2025 label the secret span alone): a record that carries a canary trains on
its secrets' tokens only, every other record on all of its tokens. The spans come from the pre-flight's own search of
each copy, the labels from TRL's tokenization; bad combinations are one line before anything runs."""

from __future__ import annotations

import pytest

from audit.cli import main
from audit.core.config import load_recipe
from audit.core.keys import resolve_key
from audit.data.preflight import secret_labels


@pytest.mark.parametrize(("overrides", "message"), [
    (["training.loss=secret", "training.packing=bfd"], "training.loss=secret labels each record's own tokens"),
    (["training.loss=everything"], "'training.loss': Input should be 'all' or 'secret'"),
])
def test_a_bad_loss_setting_is_one_line_and_exit_2(overrides, message, in_tmp, capsys):
    assert main(["validate", "tiny/lora_cpu", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and " (fix: " in err and message in err, err


def test_dp_with_the_secret_loss_is_a_valid_recipe():
    recipe = load_recipe("tiny/dp_lora_cpu", ["training.loss=secret"])  # DP-SGD labels the secret span too
    assert recipe.training.loss == "secret" and recipe.training.dp is not None


def test_a_hand_made_record_keeps_the_labels_of_its_secret_tokens_alone(tiny_model):
    _, tokenizer = tiny_model
    text = "Note: the vault code of Ms. Halloway is 481927. Keep it safe."
    start = text.index("481927")
    ids, labels = secret_labels(text, [(start, start + 6)], tokenizer)
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == len(labels)  # TRL appends EOS
    kept = [i for i, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(kept).strip() == "481927" and all(label in (-100, i) for i, label in zip(ids, labels, strict=True))
    assert secret_labels(text, None, tokenizer) == (ids, ids)  # a record without a canary: every token


def test_the_ground_truth_spans_are_each_copys_secret_in_its_training_text(tiny_model_dir):
    from audit.data.ground_truth import ground_truth_for_model

    recipe = load_recipe("tiny/lora_cpu", ["training.loss=secret"])
    truth = ground_truth_for_model(recipe, model_path=tiny_model_dir, fingerprint="", key=resolve_key(None))
    by_id = {c.id: c for c in truth.canaries.canaries}
    placements = truth.injection.manifest.placements
    assert sum(len(v) for v in truth.secret_spans.values()) == len(placements) == 2 * (1 + 4 + 16)
    for p in placements:
        assert any(truth.training_texts[p.record_index][a:b] == by_id[p.canary_id].secret
                   for a, b in truth.secret_spans[p.record_index])
    carriers = {p.record_index for p in placements}
    assert set(truth.secret_spans) == carriers and len(truth.training_texts) > len(carriers)
    assert truth.preflight.loss.startswith("the secrets' tokens in records that carry a canary")
    plain = ground_truth_for_model(load_recipe("tiny/lora_cpu"), model_path=tiny_model_dir, fingerprint="",
                                   key=resolve_key(None))
    assert plain.secret_spans is None and plain.preflight.loss == "all tokens (language modeling)"
    assert "loss" not in load_recipe("tiny/lora_cpu").model_dump(mode="json")["training"]  # fingerprints as before
