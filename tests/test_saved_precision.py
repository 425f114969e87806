"""Several GPUs save what one GPU would: the fp32 weights, and train.json says which dtype was saved.

DeepSpeed is not installed here (and needs GPUs), so the ZeRO path is tested against a stand-in for the two calls
it makes (``deepspeed.utils.safe_get_full_fp32_param``, ``deepspeed.zero.GatheredParameters``): a bf16 working copy
whose fp32 masters live elsewhere, as DeepSpeed keeps them in the optimizer.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from audit.data.models import weights_dtype
from audit.train import distributed

ACCELERATE = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"


def test_weights_dtype_reads_the_headers(tiny_model_dir, tmp_path):
    assert weights_dtype(tiny_model_dir) == "float32"
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2), "ids": torch.arange(3)},
              str(tmp_path / "x.safetensors"))
    assert weights_dtype(tmp_path) == "bfloat16+float32"  # integer tensors are not weights' precision


def test_the_zero3_config_does_not_save_the_16bit_working_copy():
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(ACCELERATE / "zero3.yaml")).deepspeed_config["zero3_save_16bit_model"] is False


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """``deepspeed`` as the audit calls it: trained parameters have an fp32 master (``masters``), frozen ones do not;
    ``calls`` counts the gathers of frozen ZeRO-3 parameters."""
    masters: dict[int, torch.Tensor] = {}
    calls: list[str] = []

    @contextlib.contextmanager
    def gathered(params):
        calls.append("gather")
        yield

    def module(name: str, **attrs) -> types.ModuleType:  # with a spec: transformers and accelerate ask importlib about
        made = types.ModuleType(name)  # deepspeed, and (no package metadata) conclude it is not installed
        made.__spec__ = importlib.machinery.ModuleSpec(name, None)
        made.__dict__.update(attrs)
        return made

    utils = module("deepspeed.utils", safe_get_full_fp32_param=lambda p: masters.get(id(p)))
    monkeypatch.setitem(sys.modules, "deepspeed", module("deepspeed", utils=utils,
                                                         zero=types.SimpleNamespace(GatheredParameters=gathered)))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    return types.SimpleNamespace(masters=masters, calls=calls)


class _Trainer:
    """What save_weights reads of a Trainer under DeepSpeed; ``save_model`` is the 16-bit path it must not take."""

    is_deepspeed_enabled = True

    def __init__(self, model, main: bool):
        self.model = model
        self.accelerator = types.SimpleNamespace(is_main_process=main, wait_for_everyone=lambda: None,
                                                 unwrap_model=lambda m: m)

    def save_model(self, path):
        raise AssertionError("the 16-bit gather of Trainer.save_model was used")


def _bf16_working_copy(tiny_model_dir, fake, *, frozen: str = "norm"):
    """tiny-llama as DeepSpeed trains it under bf16: bf16 parameters, fp32 masters for the trained ones."""
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    masters = dict(fp32.named_parameters())
    for name, param in model.named_parameters():
        param.requires_grad_(frozen not in name)
        if param.requires_grad:
            fake.masters[id(param)] = masters[name].detach() + 1e-4  # a trained master: not a bf16 value
        else:
            param.ds_id = 0  # a frozen ZeRO-3 parameter: gathered, saved as it is
    return model, fp32


def test_zero_saves_the_fp32_masters_not_the_bf16_working_copy(tiny_model_dir, tmp_path, fake_deepspeed):
    model, fp32 = _bf16_working_copy(tiny_model_dir, fake_deepspeed)
    assert distributed.save_weights(_Trainer(model, main=True), tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert weights_dtype(tmp_path) == "bfloat16+float32"  # trained: fp32 masters; frozen norms: their bf16 copy
    trained = {n: p for n, p in fp32.named_parameters() if "norm" not in n}
    for name, weight in trained.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], weight.detach() + 1e-4), name
    frozen = [n for n, _ in model.named_parameters() if "norm" in n]
    assert frozen and all(saved[n].dtype == torch.bfloat16 for n in frozen)
    assert fake_deepspeed.calls == ["gather"] * len(frozen)


def test_zero_on_another_rank_gathers_alike_and_writes_nothing(tiny_model_dir, tmp_path, fake_deepspeed):
    model, _ = _bf16_working_copy(tiny_model_dir, fake_deepspeed)
    assert not distributed.save_weights(_Trainer(model, main=False), tmp_path)
    assert list(tmp_path.iterdir()) == [] and fake_deepspeed.calls  # it joined the collective gathers


def test_fsdp_and_ddp_save_through_the_trainer(tmp_path):
    saved: list = []
    trainer = types.SimpleNamespace(is_deepspeed_enabled=False, save_model=saved.append,
                                    accelerator=types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None))
    (tmp_path / "training_args.bin").write_bytes(b"pickle")
    assert distributed.save_weights(trainer, tmp_path) and saved == [str(tmp_path)]
    assert not (tmp_path / "training_args.bin").exists()
