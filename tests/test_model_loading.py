"""Models are read straight onto their device, and a full fine-tune's weights are loaded without a base under them."""

from __future__ import annotations

import torch

from audit.data.models import fingerprint_tensors, load_causal_lm, load_model_and_tokenizer
from audit.pipeline import stages
from audit.train import distributed
from audit.train import stage as train_stage
from audit.train.types import DeviceChoice, TrainPlan, TrainResult, WeightsLayer

CPU = DeviceChoice("cpu", "fp32", False)


def _weights(model) -> str:
    return fingerprint_tensors(dict(model.state_dict()))


def test_a_model_read_onto_its_device_is_the_model_read_then_moved(tiny_model_dir):
    """The old way (read into host memory, then ``.to(device)``) and the new one give the same tensors, and the new one
    leaves no device map: the Trainer would take the model for one split over devices, PEFT would re-dispatch it."""
    from transformers import AutoModelForCausalLM

    old = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, use_safetensors=True).to("cpu")
    new = load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu")
    assert _weights(new) == _weights(old) and not hasattr(new, "hf_device_map")
    assert not any(hasattr(m, "_hf_hook") for m in new.modules())  # no dispatch hooks: the forward is the model's own
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    assert _weights(model) == _weights(old) and not model.training and tokenizer.pad_token is not None


def test_added_token_rows_are_made_on_the_cpu_whatever_the_device(tiny_model_dir, monkeypatch):
    """New-token canaries get rows computed from the other rows: computed on the CPU before the move, a GPU run's
    base has the bytes a CPU run's has."""
    import audit.data.models as models

    seen = []
    real = models.load_causal_lm
    # where the loader is asked to put the tensors (read onto the CPU here whatever it is asked: no GPU on CI)
    monkeypatch.setattr(models, "load_causal_lm",
                        lambda path, device, **kw: seen.append(device) or real(path, device="cpu", **kw))
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **kw: moved.append(a) or self)
    load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cuda", added_tokens=["<zq1>", "<zq2>"])
    assert seen == ["cpu"] and moved == [("cuda",)]  # rows made on the CPU, then the model moved
    load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cuda")  # no added tokens: straight there
    assert seen == ["cpu", "cuda"] and moved == [("cuda",)]


def test_a_full_layer_replaces_what_is_below_it_so_none_of_it_is_read(tiny_model_dir, tmp_path):
    from audit.train.weights import load_tuned

    never = tmp_path / "no-such-adapter"  # applying this LoRA layer would fail
    model = load_tuned(None, [WeightsLayer("lora", never), WeightsLayer("full", tiny_model_dir)], device=CPU)
    assert _weights(model) == _weights(load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu"))


def _distributed_train(monkeypatch, tmp_path, tiny_model_dir, method: str) -> tuple[list, object]:
    """``train_stage.train`` as a process of a distributed run sees it once its trainer has saved ``method`` weights."""
    import audit.train.sft as sft
    from audit.core.schema import Recipe
    from audit.pipeline.origin import FreshBase
    from audit.report.tracking import NullTracker

    recipe = Recipe(name="t", model={"source": str(tiny_model_dir)}, training={"method": method}, tracking={"enabled": False})
    ctx = stages.RunContext(recipe=recipe, resolved=None, device=CPU, tracking=False, tracking_uri="", progress=False)
    plan = TrainPlan(run_dir=tmp_path, train=True, method=method)
    loads: list = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(sft, "train_sft", lambda *a, **kw: TrainResult(model="sharded", summary=None))
    monkeypatch.setattr(train_stage, "load_base", lambda ctx: loads.append("base") or (load_causal_lm(
        tiny_model_dir, dtype=torch.float32, device="cpu"), None))
    truth = type("Truth", (), {"training_texts": [], "secret_spans": None})()
    result = train_stage.train(ctx, FreshBase(recipe=recipe).layers, "start", None, truth, plan, tracker=NullTracker())
    return loads, result.model


def test_after_distributed_full_training_the_saved_model_is_loaded_without_a_base(monkeypatch, tmp_path, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "model")  # what rank 0 saved: the tuned full model
    loads, model = _distributed_train(monkeypatch, tmp_path, tiny_model_dir, "full")
    assert loads == [] and _weights(model) == _weights(load_causal_lm(tmp_path / "model", dtype=torch.float32, device="cpu"))


def test_after_distributed_lora_training_the_adapter_goes_on_a_fresh_base(monkeypatch, tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu"), config).save_pretrained(
        str(tmp_path / "adapter"), safe_serialization=True)
    loads, model = _distributed_train(monkeypatch, tmp_path, tiny_model_dir, "lora")
    assert loads == ["base"] and type(model).__name__ == "PeftModelForCausalLM"


def test_a_distributed_run_refuses_the_loading_that_leaves_other_processes_empty_weights(monkeypatch):
    import pytest

    from audit.core.errors import AuditError

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    stages.check_whole_model_per_process()  # one process holds the whole model anyway
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(AuditError, match="fsdp_cpu_ram_efficient_loading is on"):
        stages.check_whole_model_per_process()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # what recipes/accelerate/fsdp.yaml gives
    stages.check_whole_model_per_process()
