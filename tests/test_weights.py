"""One load_tuned for every consumer of saved weights; the canary set reads back whole from its two files."""

from __future__ import annotations

import pytest

from audit.core.errors import AuditError
from audit.core.layout import LAYOUT
from audit.core.store import write_json, write_jsonl
from audit.data.canaries import generate_canaries, load_spec
from audit.data.ground_truth import canaries_meta, read_canary_set
from audit.train.types import DeviceChoice, WeightsLayer

CPU = DeviceChoice("cpu", "fp32", False)


def _fresh(tiny_model_dir):
    import torch

    from audit.data.models import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")[0]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_load_tuned_puts_an_adapter_back_and_merges_it_only_when_asked(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from audit.train.weights import load_tuned

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    tuned = get_peft_model(_fresh(tiny_model_dir), config).eval()
    tuned.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    ids = list(range(3, 15))
    want, plain = _logits(tuned, ids), _logits(_fresh(tiny_model_dir), ids)
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter moves the model: the checks below can fail

    kept = load_tuned(_fresh(tiny_model_dir), [WeightsLayer("lora", tmp_path / "adapter")], device=CPU)
    assert isinstance(kept, PeftModel) and not kept.training
    assert torch.equal(_logits(kept, ids), want)
    merged = load_tuned(_fresh(tiny_model_dir), [WeightsLayer("lora", tmp_path / "adapter")], device=CPU,
                        keep_last_adapter=False)
    assert not isinstance(merged, PeftModel)
    assert torch.allclose(_logits(merged, ids), want, atol=1e-4)

    from transformers import AutoTokenizer

    tuned.merge_and_unload().save_pretrained(str(tmp_path / "model"), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(tmp_path / "model"))  # as a full tune saves it
    full = load_tuned(_fresh(tiny_model_dir), [WeightsLayer("full", tmp_path / "model")], device=CPU)
    assert torch.allclose(_logits(full, ids), want, atol=1e-4)


def test_a_canary_set_reads_back_whole_from_its_rows_and_sidecar(tmp_path):
    canaries = generate_canaries(load_spec("words"), seed=3)
    assert read_canary_set(tmp_path) is None  # a run dir written before the sidecar: nothing to read
    write_jsonl(tmp_path / LAYOUT.canaries, canaries.canaries)
    meta = canaries_meta(canaries)
    write_json(tmp_path / LAYOUT.canaries_meta, meta)
    assert read_canary_set(tmp_path) == canaries
    assert not any(c.secret in (tmp_path / LAYOUT.canaries_meta).read_text() for c in canaries.canaries)
    rows = (tmp_path / LAYOUT.canaries).read_text().splitlines()
    (tmp_path / LAYOUT.canaries).write_text("\n".join(rows[1:]) + "\n")  # a row lost
    with pytest.raises(AuditError, match="does not match"):
        read_canary_set(tmp_path)
