"""Precision: scoring in fp32 whatever the training precision, the training modes `auto` resolves to, fp32 merges.

bf16 on CPU stands in for CUDA bf16 here (the rounding is the dtype's, not the device's).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from audit.core.errors import AuditError
from audit.core.schema import ScoringSection, TrainingSection
from audit.score.engine import candidate_nll_bits, in_scoring_precision, scoring_dtype, torch_threads
from audit.train import sft
from audit.train.sft import DeviceChoice, choose_device, merged_copy
from audit.train.types import WeightsLayer
from audit.train.weights import load_tuned

PREFIX = "Note for the file: the vault access code of Ms. Halloway is "


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _load(path, dtype):
    from audit.data.models import load_model_and_tokenizer

    return load_model_and_tokenizer(path, dtype=dtype, device="cpu")


def _lora(model, seed=0):
    """A LoRA adapter on every projection with non-zero B (a fresh adapter is the identity)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                  task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model.eval()


def _snapshot(model):
    return {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict().items()}


def test_scoring_precision_defaults_to_fp32_and_names_its_dtypes():
    assert ScoringSection().precision == "fp32"
    assert scoring_dtype("fp32") is torch.float32 and scoring_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError):
        scoring_dtype("auto")


def test_upcast_for_scoring_is_undone_bit_for_bit(tiny_model_dir):
    """A bf16 base with an fp32 adapter (PEFT's default) is scored in fp32, then trains on exactly the weights it had."""
    model, _ = _load(tiny_model_dir, torch.bfloat16)
    peft_model = _lora(model)
    before = _snapshot(peft_model)
    assert {d for d, _ in before.values()} == {torch.bfloat16, torch.float32}
    with in_scoring_precision(peft_model, torch.float32) as m:
        assert m is peft_model
        assert all(p.dtype == torch.float32 for p in m.parameters())
    after = _snapshot(peft_model)
    assert before.keys() == after.keys()
    for k, (dtype, value) in before.items():
        assert after[k][0] == dtype, k
        assert torch.equal(after[k][1], value), k


def test_downcast_for_scoring_leaves_the_fp32_weights_alone(tiny_model):
    model, tok = tiny_model
    before = _snapshot(model)
    with in_scoring_precision(model, torch.bfloat16) as m:
        assert m is not model and next(m.parameters()).dtype == torch.bfloat16
    with in_scoring_precision(model, torch.float32) as m:
        assert m is model  # already fp32: nothing happens, the default CPU path
    for k, (dtype, value) in before.items():
        assert torch.equal(model.state_dict()[k], value) and model.state_dict()[k].dtype == dtype


def test_bf16_scoring_moves_candidate_bits_that_fp32_scoring_of_the_same_weights_does_not(tiny_model_dir):
    """The precision split: same (bf16-rounded) weights, scored in bf16 vs upcast to fp32. The fp32 scores of the
    bf16 weights equal those of an fp32 model holding the same rounded values; bf16 arithmetic moves them."""
    bf16, tok = _load(tiny_model_dir, torch.bfloat16)
    rounded = copy.deepcopy(bf16).to(torch.float32)
    secrets = [f"{i:06d}" for i in range(0, 1_000_000, 7919)][:96]
    from audit.score.engine import split_tokens, split_tokens_many

    head = split_tokens(tok, PREFIX, secrets[0]).prefix_ids
    cands = [s.secret_ids for s in split_tokens_many(tok, PREFIX, secrets)]
    in_bf16 = np.array(candidate_nll_bits(bf16, head, cands))
    with in_scoring_precision(bf16, torch.float32) as m:
        upcast = np.array(candidate_nll_bits(m, head, cands))
    reference = np.array(candidate_nll_bits(rounded, head, cands))
    np.testing.assert_array_equal(upcast, reference)
    assert np.max(np.abs(in_bf16 - reference)) > 1e-3  # bf16 logits are rounded before any upcast


def test_choose_device_resolves_auto_by_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(TrainingSection()) == DeviceChoice("cpu", "fp32", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sft, "_native_bf16", lambda: True)
    for method in ("lora", "full"):  # full fine-tuning gets fp32 master weights, not pure bf16 AdamW
        choice = choose_device(TrainingSection(method=method))
        assert choice.precision == "bf16-mixed" and choice.torch_dtype is torch.float32 and choice.autocast == "bf16"
    monkeypatch.setattr(sft, "_native_bf16", lambda: False)  # T4 / V100: bf16 only emulated
    assert choose_device(TrainingSection(method="full")).precision == "fp32"
    assert DeviceChoice("cuda", "bf16", False).torch_dtype is torch.bfloat16


def test_fp16_full_fine_tuning_is_refused_before_it_crashes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(AuditError, match="fp16-mixed"):
        choose_device(TrainingSection(method="full", precision="fp16"))
    assert choose_device(TrainingSection(method="full", precision="fp16-mixed")).torch_dtype is torch.float32
    assert choose_device(TrainingSection(method="lora", precision="fp16")).torch_dtype is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AuditError, match="CUDA"):
        choose_device(TrainingSection(method="full", precision="fp16-mixed"))


def _changed_share(path, precision, tmp_path):
    """Full fine-tune of tiny-llama for 4 steps at lr 1e-5 (the GPU full recipes' rate) in ``precision``: share of weights
    that moved."""
    from audit.data.models import load_model_and_tokenizer

    device = DeviceChoice("cpu", precision, False)
    model, tok = load_model_and_tokenizer(path, dtype=device.torch_dtype, device="cpu")
    start = {k: v.detach().float().clone() for k, v in model.named_parameters()}
    section = TrainingSection(method="full", epochs=1, learning_rate=1e-5, batch_size=4, checkpoint_every=0,
                              precision=precision)
    texts = [f"the vault access code of Ms. Halloway is {i:06d}" for i in range(16)]
    trained = sft.train_sft(model, tok, texts, section=section, seed=0, work_dir=tmp_path / precision / "t",
                            weights_dir=tmp_path / precision / "w", device=device, progress=False)
    moved = total = 0
    for k, v in trained.model.named_parameters():
        moved += int((v.detach().float() != start[k]).sum())
        total += v.numel()
    return moved / total, {p.dtype for p in trained.model.parameters()}, trained.summary.weights_dtype


def test_mixed_precision_keeps_the_updates_pure_bf16_rounds_away(tiny_model_dir, tmp_path):
    mixed, mixed_dtypes, mixed_saved = _changed_share(tiny_model_dir, "bf16-mixed", tmp_path)
    pure, _, pure_saved = _changed_share(tiny_model_dir, "bf16", tmp_path)
    assert mixed_dtypes == {torch.float32}  # fp32 master weights; bf16 only inside autocast
    assert (mixed_saved, pure_saved) == ("float32", "bfloat16")  # train.json says what the weights were saved in
    assert mixed > 0.9
    assert pure < mixed / 2  # AdamW steps of ~1e-5 vanish below bf16's spacing for most weights


def test_lora_merges_in_fp32_whatever_the_base_dtype(tiny_model_dir, tmp_path):
    """A bf16 base + fp32 adapter, merged: in fp32 the merged model scores like the adapter model scored in fp32;
    merged into the bf16 weights (the old way) the delta is rounded and the scores move further."""
    base, tok = _load(tiny_model_dir, torch.bfloat16)
    peft_model = _lora(base)
    ids = tok(PREFIX + "481927", add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])

    def logp(m):
        with torch.no_grad():
            return torch.log_softmax(m(input_ids=x).logits.float(), -1)

    with in_scoring_precision(peft_model, torch.float32) as m:
        reference = logp(m)
    fp32_merge = merged_copy(peft_model)
    assert next(fp32_merge.parameters()).dtype == torch.float32
    err_fp32 = float((logp(fp32_merge) - reference).abs().max())
    err_bf16 = float((logp(copy.deepcopy(peft_model).merge_and_unload().to(torch.float32)) - reference).abs().max())
    assert err_fp32 < 1e-4
    assert err_bf16 > 10 * err_fp32

    peft_model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    fresh, _ = _load(tiny_model_dir, torch.bfloat16)
    chained = load_tuned(fresh, [WeightsLayer("lora", tmp_path / "adapter")], device=DeviceChoice("cpu", "fp32", False),
                         keep_last_adapter=False)  # the further-tune start (audit.pipeline.stages.start_model), merged in fp32
    assert float((logp(chained) - reference).abs().max()) < 1e-4


def test_each_rank_pins_its_own_gpu_before_anything_loads(monkeypatch):
    """Under torchrun/accelerate every rank used to probe bf16 and load the ground-truth model on cuda:0."""
    pinned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    monkeypatch.setattr(sft, "_native_bf16", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    choose_device(TrainingSection())
    assert pinned == [1]
    monkeypatch.setenv("WORLD_SIZE", "1")
    choose_device(TrainingSection())
    assert pinned == [1]  # a single process leaves the current device alone
