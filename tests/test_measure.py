"""`audit measure` before it scores: what `audit inject` records for it, and every refusal (one line, exit 2, nothing
written). The end-to-end measurements are in tests/test_measure_e2e.py (slow)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from helpers import measure_refused, other_shape_model, perturbed_copy

from audit.core.layout import LAYOUT
from audit.pipeline.external import Vocabulary

TINY_VOCAB = Vocabulary(rows=512)
"""tiny-llama's embedding rows, under a canary spec that adds no token."""


@pytest.fixture
def gt(injected, in_tmp) -> Path:
    path = in_tmp / "gt"
    shutil.copytree(injected, path)
    return path


# --------------------------------------------------------------------------------------------------- what inject records


def test_inject_records_the_base_key_and_manifest_that_measure_checks(injected, tiny_model_dir):
    from audit.core.schema import InjectionManifest
    from audit.data.models import fingerprint_safetensors_dir

    record = json.loads((injected / "inject.json").read_text())
    meta = json.loads((injected / "canaries.meta.json").read_text())
    manifest = InjectionManifest.model_validate_json((injected / "manifest.json").read_text())
    assert record["base"]["source"] == "tiny-llama"
    assert record["base"]["fingerprint"] == fingerprint_safetensors_dir(tiny_model_dir)
    assert record["key_id"] == meta["key_id"] == manifest.key_id and record["key_id"]
    assert record["manifest_sha256"] == manifest.sha256() and record["canary_set_sha256"] == manifest.canary_set_sha256
    assert (record["spec"], record["seed"], record["references"]["n"]) == ("digits", 0, 255)


def test_inject_writes_its_recipe_so_measure_can_draw_the_same_injection_again(injected):
    from audit.core.config import load_recipe, read_yaml, validate_recipe

    stored = validate_recipe(read_yaml(injected / "recipe.yaml"))
    assert stored == load_recipe("tiny/lora_cpu")


def test_inject_saves_the_injected_set_as_a_private_datasets_directory(injected):
    from datasets import load_from_disk

    rows = [json.loads(line) for line in (injected / "train.jsonl").read_text().splitlines()]
    dataset = load_from_disk(str(injected / "train_dataset"))
    assert dataset["text"] == [r["text"] for r in rows] and len(rows) == 162
    assert stat.S_IMODE((injected / "train_dataset").stat().st_mode) == 0o700
    for f in (injected / "train_dataset").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
    for name in ("train.jsonl", "canaries.jsonl"):
        assert stat.S_IMODE((injected / name).stat().st_mode) == 0o600, name
    assert not [p for p in injected.iterdir() if p.name.startswith(".")], "no work folder is left behind"


# --------------------------------------------------------------------------------------------------- refusals


def test_measure_refuses_a_directory_that_is_not_ground_truth(in_tmp, capsys):
    (in_tmp / "empty").mkdir()
    measure_refused(["empty", "--model", "tiny-llama"], capsys, "manifest.json", root=in_tmp)
    measure_refused(["nowhere", "--model", "tiny-llama"], capsys, "does not exist", root=in_tmp)


def test_measure_refuses_a_ground_truth_missing_its_manifest(gt, capsys):
    (gt / "manifest.json").unlink()
    measure_refused(["gt", "--model", "tiny-llama"], capsys, "manifest.json missing", root=gt.parent)


def test_measure_refuses_canaries_edited_after_injection(gt, capsys):
    rows = [json.loads(line) for line in (gt / "canaries.jsonl").read_text().splitlines()]
    rows[0]["secret"] = "000000" if rows[0]["secret"] != "000000" else "111111"
    (gt / "canaries.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    measure_refused(["gt", "--model", "tiny-llama"], capsys, "canaries.jsonl was edited", root=gt.parent)


def test_measure_refuses_canaries_that_do_not_match_the_manifest(gt, capsys):
    manifest = json.loads((gt / "manifest.json").read_text())
    manifest["canary_set_sha256"] = "0" * 64
    (gt / "manifest.json").write_text(json.dumps(manifest))
    measure_refused(["gt", "--model", "tiny-llama"], capsys, "do not match its manifest.json", root=gt.parent)


def test_measure_refuses_a_ground_truth_whose_injection_no_longer_reproduces_its_manifest(gt, capsys, tmp_path):
    tuned = perturbed_copy(tmp_path / "tuned")
    recipe = (gt / "recipe.yaml").read_text()
    (gt / "recipe.yaml").write_text(recipe.replace("builtin_records: 120", "builtin_records: 100"))
    measure_refused(["gt", "--model", str(tuned)], capsys, "differs from its manifest.json", root=gt.parent)


def test_measure_refuses_the_base_itself_as_nothing_was_trained(gt, capsys, tiny_model_dir):
    measure_refused(["gt", "--model", "tiny-llama"], capsys, "nothing was trained", root=gt.parent)
    copy = gt.parent / "copy_of_base"
    shutil.copytree(tiny_model_dir, copy)  # the same weights under another name
    measure_refused(["gt", "--model", "copy_of_base"], capsys, "nothing was trained", root=gt.parent)


def test_measure_refuses_an_adapter_that_was_never_trained(gt, capsys, tiny_model_dir):
    _adapter(gt.parent / "fresh", tiny_model_dir, trained=False)
    measure_refused(["gt", "--adapter", "fresh"], capsys, "every LoRA B matrix", root=gt.parent)


def _adapter(out: Path, model_dir: Path, *, trained: bool = True, **lora) -> Path:
    """A LoRA adapter (``q_proj`` unless ``lora`` says otherwise) for the model in ``model_dir``, saved to ``out``;
    ``trained``: every B matrix non-zero, as after training (PEFT starts them at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from audit.data.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_dir, dtype=torch.float32, device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=2, **{"target_modules": ["q_proj"], **lora}))
    if trained:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    param.fill_(0.01)
    peft_model.save_pretrained(str(out))
    return out


def test_measure_refuses_a_model_whose_tokenizer_differs_from_the_base(gt, capsys):
    perturbed_copy(gt.parent / "retokenized", added_token="<new-token>")
    measure_refused(["gt", "--model", "retokenized"], capsys, "tokenizer saved in", root=gt.parent)


def test_measure_refuses_a_model_of_another_shape_that_shares_the_bases_tokenizer(gt, capsys, tiny_model_dir):
    other_shape_model(gt.parent / "narrow", tiny_model_dir)
    measure_refused(["gt", "--model", "narrow"], capsys, "--model narrow is not a fine-tune of the base tiny-llama: its tensor "
             "model.embed_tokens.weight is [512, 32], the base's [512, 64]", root=gt.parent)


def test_a_model_of_another_architecture_or_depth_is_named_by_its_first_difference(tmp_path, tiny_model_dir):
    from audit.core.errors import AuditError
    from audit.pipeline.external import check_same_shape

    other = tmp_path / "mistral"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(AuditError, match=r"it is a mistral model \(MistralForCausalLM\), the base a llama model "
                                         r"\(LlamaForCausalLM\)"):
        check_same_shape(other, tiny_model_dir, tuned_name="mistral", base_name="tiny-llama", vocab=TINY_VOCAB)
    deeper = other_shape_model(tmp_path / "deeper", tiny_model_dir, hidden_size=64, layers=3)
    with pytest.raises(AuditError, match=r"it has a tensor model.layers.2.input_layernorm.weight \(\[64\]\), which the "
                                         "base does not") as info:
        check_same_shape(deeper, tiny_model_dir, tuned_name="deeper", base_name="tiny-llama", vocab=TINY_VOCAB)
    assert "fix: give weights fine-tuned from tiny-llama" in info.value.one_line()
    check_same_shape(tiny_model_dir, tiny_model_dir, tuned_name="itself", base_name="tiny-llama", vocab=TINY_VOCAB)


def test_measure_refuses_an_adapter_made_for_another_base_before_writing_anything(gt, capsys, tiny_model_dir):
    narrow = other_shape_model(gt.parent / "narrow", tiny_model_dir)
    _adapter(gt.parent / "adapter", narrow)
    err = measure_refused(["gt", "--adapter", "adapter"], capsys, f"--adapter {gt.parent / 'adapter'} was made for {narrow}, not "
                   "for tiny-llama: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight is [2, 32], which does "
                   "not fit model.layers.0.self_attn.q_proj.weight [64, 64] of tiny-llama", root=gt.parent)
    assert "pass --base (or --model) with the model it was trained on" in err


def test_an_adapter_for_this_base_fits_with_lora_on_embeddings_and_saved_modules(tmp_path, tiny_model_dir):
    """What PEFT saves for LoRA on an embedding (its A spans the rows), a saved embedding base layer and
    ``modules_to_save`` all fit the model they were made on, and not one of another width or depth."""
    from audit.core.errors import AuditError
    from audit.pipeline.external import check_adapter_fits

    adapter = _adapter(tmp_path / "adapter", tiny_model_dir, target_modules=["q_proj", "embed_tokens"], modules_to_save=["norm"])
    check_adapter_fits(adapter, tiny_model_dir, below_name="tiny-llama", vocab=TINY_VOCAB)
    narrow = other_shape_model(tmp_path / "narrow", tiny_model_dir)
    with pytest.raises(AuditError, match=r"its model.embed_tokens.weight is \[512, 64\], the one of narrow \[512, 32\]"):
        check_adapter_fits(adapter, narrow, below_name="narrow", vocab=TINY_VOCAB)
    deeper_model = other_shape_model(tmp_path / "deeper", tiny_model_dir, hidden_size=64, layers=3)
    deeper = _adapter(tmp_path / "deeper_adapter", deeper_model)
    with pytest.raises(AuditError, match="it adapts model.layers.2.self_attn.q_proj, which tiny-llama does not have"):
        check_adapter_fits(deeper, tiny_model_dir, below_name="tiny-llama", vocab=TINY_VOCAB)


def test_an_adapter_with_rows_for_the_tokens_a_canary_spec_adds_fits_when_the_spec_adds_them(tmp_path, tiny_model_dir):
    """A run with new-token canaries (``new_tokens``) gives the base rows for them and trains them as PEFT trainable
    tokens, whose saved embedding has those rows too: measuring that run again must not call it another model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from audit.core.errors import AuditError
    from audit.data.models import load_model_and_tokenizer
    from audit.pipeline.external import check_adapter_fits

    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    model.resize_token_embeddings(520, mean_resizing=False)
    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=list(range(512, 520)))
    get_peft_model(model, config).save_pretrained(str(tmp_path / "adapter"))
    check_adapter_fits(tmp_path / "adapter", tiny_model_dir, below_name="tiny-llama", vocab=Vocabulary(rows=512, added=8))
    with pytest.raises(AuditError, match=r"its model.embed_tokens.weight is \[520, 64\], the one of tiny-llama \[512, 64\]"):
        check_adapter_fits(tmp_path / "adapter", tiny_model_dir, below_name="tiny-llama", vocab=TINY_VOCAB)


def test_measure_names_an_adapter_file_it_cannot_read(gt, capsys, tiny_model_dir, tmp_path_factory, unreadable):
    adapter = _adapter(tmp_path_factory.mktemp("elsewhere") / "adapter", tiny_model_dir)  # outside the folder compared
    weights = unreadable(adapter / "adapter_model.safetensors")
    err = measure_refused(["gt", "--adapter", str(adapter)], capsys, f"cannot read {weights} (permission denied)", root=gt.parent)
    assert "FileNotFoundError" not in err and "chmod u+r" in err


@pytest.mark.parametrize("name", ["canaries.jsonl", "manifest.json"])
def test_measure_names_a_ground_truth_file_it_cannot_read(name, injected, in_tmp, capsys, tmp_path_factory, unreadable):
    truth = tmp_path_factory.mktemp("elsewhere") / "gt"  # outside the folder compared, which it could not read either
    shutil.copytree(injected, truth)
    unreadable(truth / name)
    measure_refused([str(truth), "--model", "tiny-llama"], capsys, f"cannot read {truth.resolve() / name} (permission denied)",
             root=in_tmp)


def test_tokenizers_compare_by_vocabulary_and_merges_not_by_object(tmp_path, tiny_model_dir):
    from audit.data.ground_truth import load_tokenizer
    from audit.pipeline.external import tokenizer_fingerprint

    first, second = load_tokenizer(tiny_model_dir), load_tokenizer(tiny_model_dir)
    assert first is not second and tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    second.add_tokens(["<new-token>"])
    assert tokenizer_fingerprint(first) != tokenizer_fingerprint(second)


def test_measure_refuses_another_audit_key_than_the_ground_truths(gt, capsys, monkeypatch, tmp_path):
    tuned = perturbed_copy(tmp_path / "tuned")
    monkeypatch.setenv("CANARY_AUDIT_KEY", "6b" * 32)
    measure_refused(["gt", "--model", str(tuned)], capsys, "was made with audit key", root=gt.parent)


def test_measure_refuses_overrides_of_what_shaped_the_ground_truth(gt, capsys, tmp_path):
    tuned = perturbed_copy(tmp_path / "tuned")
    err = measure_refused(["gt", "--model", str(tuned), "canaries.tiers=[1,2]"], capsys, "shaped the ground truth",
                          root=gt.parent)
    assert "inject again" in err
    err = measure_refused(["gt", "--model", str(tuned), "model.source=smollm2-135m"], capsys, "shaped the ground truth",
                          root=gt.parent)
    assert "--base" in err


def test_measure_refuses_no_tuned_model_and_a_missing_adapter(gt, capsys):
    measure_refused(["gt"], capsys, "no tuned model given", root=gt.parent)
    measure_refused(["gt", "--adapter", "nowhere"], capsys, "not a PEFT adapter directory", root=gt.parent)


def test_measure_refuses_a_gate_no_run_can_pass(gt, capsys, tmp_path):
    tuned = perturbed_copy(tmp_path / "tuned")
    (gt.parent / "gates.yaml").write_text("")
    measure_refused(["gt", "--model", str(tuned), "gates=[{metric: exposure.mean/rep_16/tuned, min: 99}]"], capsys,
             "exposure.mean/rep_16/tuned", root=gt.parent)


def test_a_measurement_is_rebuilt_from_its_external_json_wherever_the_resume_starts(gt, monkeypatch):
    from audit.pipeline.external import measure_recipe, read_ground_truth_dir
    from audit.pipeline.origin import external_model, origin_for
    from audit.pipeline.resume import RunDir

    perturbed_copy(gt.parent / "tuned")
    truth_dir = read_ground_truth_dir("gt")
    recipe = measure_recipe(truth_dir)
    origin = external_model(truth_dir, recipe, model="tuned", adapter=None, base_given=False)  # relative to the cwd
    run_dir = gt.parent / "runs" / "measured"
    run_dir.mkdir(parents=True)
    (run_dir / LAYOUT.external).write_text(json.dumps(origin.record_file()))
    (gt.parent / "elsewhere").mkdir()
    monkeypatch.chdir(gt.parent / "elsewhere")  # `audit run --resume` from another folder
    again = origin_for(recipe, directory=RunDir(run_dir))
    assert type(again).__name__ == "ExternalModel"
    assert again.record_file() == origin.record_file()  # external.json is written once: a resume must compute it byte for byte
    assert again.tuned_layers == origin.tuned_layers and again.weights_fingerprint == origin.weights_fingerprint
