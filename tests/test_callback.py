"""The Python API (``inject_canaries``) and ``CanaryAuditCallback``'s parts: the trainer pre-flight on the real dataset
and collator, the curve points on a live model, and the ground truth they read. Tiny-llama, CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import short_sft

from audit.core.errors import AuditError
from audit.core.schema import CanarySet, Recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def notes():
    from datasets import Dataset

    from audit.data.corpus import builtin_records

    return Dataset.from_list(builtin_records("notes", n=40, seed=0))


@pytest.fixture(scope="module")
def injected(notes, tmp_path_factory):
    from audit import inject_canaries

    return inject_canaries(notes, model="tiny-llama", out=tmp_path_factory.mktemp("gt") / "gt", tiers=(1, 4),
                           members_per_tier=2, references=4, exposure_references=15, max_length=64)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from audit.data.ground_truth import load_tokenizer

    return load_tokenizer(tiny_model_dir)


# --------------------------------------------------------------------------------------------------- inject_canaries


def test_importing_audit_stays_torch_free_and_the_api_names_load_on_first_use():
    code = ("import sys, audit\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "f = audit.inject_canaries\nassert 'torch' not in sys.modules\nprint(f.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "audit.integrations.api"


def test_inject_canaries_returns_the_injected_dataset_and_the_files_audit_inject_writes(injected, notes):
    train, gt = injected  # a named tuple: unpacks
    assert {p.name for p in gt.iterdir()} >= {"canaries.jsonl", "canaries.meta.json", "manifest.json", "preflight.json",
                                             "train.jsonl", "recipe.yaml", "corpus.jsonl"}
    manifest = json.loads((gt / "manifest.json").read_text())
    rows = [json.loads(x) for x in (gt / "train.jsonl").read_text().splitlines()]
    assert train.to_list() == rows  # the Dataset is train.jsonl, record for record
    assert len(train) == len(notes) + len(manifest["placements"]) == len(notes) + 2 * (1 + 4)
    assert oct((gt / "canaries.jsonl").stat().st_mode & 0o777) == "0o600"
    secrets = [json.loads(x)["secret"] for x in (gt / "canaries.jsonl").read_text().splitlines()]
    corpus = (gt / "corpus.jsonl").read_text()
    assert not any(s in corpus for s in secrets)  # the dataset as given holds no canary


def test_the_recipe_inject_canaries_writes_draws_the_same_injection_again_from_its_corpus_file(injected, tokenizer):
    """What `audit measure` relies on: the ground truth can be drawn again from recipe.yaml alone."""
    from audit.core.config import read_yaml, validate_recipe
    from audit.core.keys import resolve_key
    from audit.data.ground_truth import prepare_ground_truth

    gt = injected.ground_truth
    recipe = validate_recipe(read_yaml(gt / "recipe.yaml"))
    again = prepare_ground_truth(recipe, tokenizer=tokenizer, key=resolve_key())
    stored = json.loads((gt / "manifest.json").read_text())
    assert again.injection.manifest.model_dump(mode="json") == stored


def test_inject_canaries_plants_chat_records_in_assistant_turns(tmp_path):
    from datasets import Dataset

    from audit import inject_canaries

    chats = Dataset.from_list([{"messages": [{"role": "user", "content": f"Question {i}?"},
                                             {"role": "assistant", "content": f"Answer {i}."}]} for i in range(20)])
    train, gt = inject_canaries(chats, model="tiny-llama", out=tmp_path / "gt", tiers=(2,), members_per_tier=1, references=2)
    canary = json.loads((gt / "canaries.jsonl").read_text().splitlines()[0])
    planted = [r for r in train.to_list() if any(canary["secret"] in m["content"] for m in r["messages"])]
    assert len(planted) == 2
    assert all(m["role"] == "assistant" for r in planted for m in r["messages"] if canary["secret"] in m["content"])


@pytest.mark.parametrize("case", ["not_a_dataset", "missing_column", "not_empty_out", "bad_tiers"])
def test_bad_input_to_inject_canaries_is_one_line_and_writes_nothing(case, tmp_path, notes):
    from audit import inject_canaries

    out = tmp_path / "gt"
    kwargs = {"model": "tiny-llama", "out": out}
    dataset = notes
    if case == "not_a_dataset":
        dataset = "notes.jsonl"
    elif case == "missing_column":
        kwargs["text_field"] = "body"
    elif case == "not_empty_out":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "bad_tiers":
        kwargs["tiers"] = (0,)
    with pytest.raises(AuditError) as err:
        inject_canaries(dataset, **kwargs)
    assert "\n" not in str(err.value) and "(fix: " in str(err.value)
    assert (not out.exists()) or [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("where", ["out", "its_parent"])
def test_inject_canaries_names_a_file_given_for_out_as_a_file(where, tmp_path, notes):
    from audit import inject_canaries

    (tmp_path / "gt").write_text("keep me")
    out = tmp_path / "gt" if where == "out" else tmp_path / "gt" / "sub"
    with pytest.raises(AuditError, match=rf"output directory {out}( cannot be created: {tmp_path / 'gt'})? is a file, not a "
                                         r"folder \(fix: give inject_canaries a new or empty out= directory") as err:
        inject_canaries(notes, model="tiny-llama", out=out)
    assert "\n" not in str(err.value) and "not empty" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["gt"] and (tmp_path / "gt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------- trainer pre-flight


def _sft_inputs(train, tokenizer, *, max_length: int, assistant_only: bool = False):
    """The dataset and collator TRL's SFTTrainer really trains on (its own _prepare_dataset and collator)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from audit.data.models import load_model_and_tokenizer, resolve_model

    model, _ = load_model_and_tokenizer(resolve_model("tiny-llama", progress=False).path, dtype=torch.float32, device="cpu")
    args = SFTConfig(output_dir="/tmp/unused-sft", max_length=max_length, report_to="none", use_cpu=True,
                     assistant_only_loss=assistant_only, dataset_text_field="text", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    return trainer.train_dataset, trainer.data_collator


def test_trainer_preflight_counts_every_planted_copy_in_the_sft_dataset_and_collator(injected, tokenizer):
    from audit.data.ground_truth import read_canary_set
    from audit.integrations.callback import trainer_preflight

    dataset, collate = _sft_inputs(injected.dataset, tokenizer, max_length=64)
    canaries = read_canary_set(injected.ground_truth)
    found = trainer_preflight(dataset, collate, tokenizer, canaries)
    assert found == {c.id: c.repetitions for c in canaries.members()}


def test_trainer_preflight_refuses_copies_cut_by_truncation(injected, tokenizer):
    from audit.data.ground_truth import read_canary_set
    from audit.integrations.callback import trainer_preflight

    dataset, collate = _sft_inputs(injected.dataset, tokenizer, max_length=8)  # every canary record cut after 8 tokens
    with pytest.raises(AuditError, match=r"pre-flight \(trainer\): 10 of 10 planted canary copies never reach the loss"):
        trainer_preflight(dataset, collate, tokenizer, read_canary_set(injected.ground_truth))


def test_trainer_preflight_refuses_copies_whose_labels_the_collator_masks(injected, tokenizer):
    """A collator that masks the canary records' labels (as prompt masking would): a silent false negative, refused."""
    from audit.data.ground_truth import read_canary_set
    from audit.integrations.callback import trainer_preflight

    dataset, collate = _sft_inputs(injected.dataset, tokenizer, max_length=64)
    canaries = read_canary_set(injected.ground_truth)
    victim = canaries.members()[-1]

    def masking(examples):
        batch = collate(examples)
        for i, ids in enumerate(batch["input_ids"].tolist()):
            if victim.secret in tokenizer.decode(ids):
                batch["labels"][i, :] = -100
        return batch

    with pytest.raises(AuditError, match=rf"canary {victim.id}: 0 of {victim.repetitions} copies") as err:
        trainer_preflight(dataset, masking, tokenizer, canaries)
    assert "\n" not in str(err.value)


def test_trainer_preflight_refuses_a_dataset_without_the_canaries(notes, injected, tokenizer):
    from audit.data.ground_truth import read_canary_set
    from audit.integrations.callback import trainer_preflight

    dataset, collate = _sft_inputs(notes, tokenizer, max_length=64)  # the dataset before injection
    with pytest.raises(AuditError, match="never reach the loss"):
        trainer_preflight(dataset, collate, tokenizer, read_canary_set(injected.ground_truth))


# --------------------------------------------------------------------------------------------------- ground truth, points


@dataclass(frozen=True)
class Live:
    """What the callback scores a live model with: the ground truth as read, and its exposure references."""

    canaries: CanarySet
    reference_secrets: list[str]
    recipe: Recipe


def live_truth(gt_dir: Path, tokenizer) -> Live:
    """The ground truth as the callback reads it at train begin (the one reader) and the references it draws."""
    from audit.pipeline.external import exposure_references, read_ground_truth_dir
    from audit.pipeline.origin import ground_truth_key

    gt = read_ground_truth_dir(gt_dir)
    return Live(canaries=gt.canaries, reference_secrets=exposure_references(gt, tokenizer=tokenizer, key=ground_truth_key(gt)),
                recipe=gt.recipe)


def test_the_callback_draws_the_exposure_references_audit_run_draws(injected, tokenizer):
    from audit.core.config import read_yaml, validate_recipe
    from audit.core.keys import resolve_key
    from audit.data.ground_truth import prepare_ground_truth

    live = live_truth(injected.ground_truth, tokenizer)
    recipe = validate_recipe(read_yaml(injected.ground_truth / "recipe.yaml"))
    full = prepare_ground_truth(recipe, tokenizer=tokenizer, key=resolve_key())
    assert live.reference_secrets == full.reference_secrets and len(live.reference_secrets) == 15


def test_the_ground_truth_reader_refuses_canaries_that_do_not_match_the_manifest(injected, tmp_path):
    import shutil

    from audit.pipeline.external import read_ground_truth_dir

    gt = tmp_path / "gt"
    shutil.copytree(injected.ground_truth, gt)
    manifest = json.loads((gt / "manifest.json").read_text())
    manifest["canary_set_sha256"] = "0" * 64
    (gt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AuditError, match="do not match its manifest"):
        read_ground_truth_dir(gt)


def test_one_function_reads_a_ground_truth_directory_for_measure_the_callback_and_a_further_tune():
    """``audit.pipeline.external.read_ground_truth_dir`` is the one reader: the callback's own reader is gone, and no other
    module of the package reads canaries.jsonl, canaries.meta.json or manifest.json of a directory it did not write."""
    import audit
    import audit.integrations.callback

    assert not hasattr(audit.integrations.callback, "load_live_truth") and not hasattr(audit.integrations.callback, "LiveTruth")
    assert not hasattr(audit.integrations.callback, "finish_report")  # the report is built once, never patched after
    package = Path(audit.__file__).parent
    readers = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                     if "read_canary_set(" in p.read_text() or "(LAYOUT.manifest).read_text" in p.read_text()
                     or "/ LAYOUT.canaries).read_text" in p.read_text())
    # ground_truth.py defines read_canary_set (the reader's part) and reads back the manifest `audit inject` just wrote
    assert readers == ["data/ground_truth.py", "pipeline/external.py"]


def test_a_curve_point_leaves_the_model_in_train_mode_with_weights_and_rng_untouched(injected, tokenizer):
    import torch

    from audit.data.models import load_model_and_tokenizer, resolve_model
    from audit.integrations.callback import CurveRecorder

    model, _ = load_model_and_tokenizer(resolve_model("tiny-llama", progress=False).path, dtype=torch.float32, device="cpu")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    live = live_truth(injected.ground_truth, tokenizer)
    seen = []
    recorder = CurveRecorder(canaries=live.canaries, reference_secrets=live.reference_secrets, section=live.recipe.scoring,
                             seed=0, tokenizer=tokenizer, on_point=lambda step, m: seen.append(step))
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    metrics = recorder.measure(model, 7)
    assert torch.equal(torch.rand(3), expected_draw)  # scoring drew from a forked RNG
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert seen == [7] and recorder.curves["exposure.mean/rep_4/tuned"] == [(7, metrics["exposure.mean/rep_4/tuned"])]
    assert "mia.auc/loss_diff" in metrics and not any(k.endswith("/base") for k in metrics)
    # nothing trained yet: the live model is its own base, so the tuned tier means are the base rows' means
    base_rep4 = [s.exposure for s in recorder.base_scores if s.repetitions == 4]
    assert metrics["exposure.mean/rep_4/tuned"] == pytest.approx(sum(base_rep4) / len(base_rep4), abs=1e-4)


@pytest.mark.slow  # two short trainings with three curve points (~10 s idle; minutes on a loaded 2-core machine)
def test_measuring_during_training_leaves_the_training_itself_unchanged(injected, tokenizer, tmp_path):
    """Dropout on (0.1) and shuffled batches: a point that drew from the global RNG would change the later losses."""
    from audit.integrations.callback import CurveCallback, CurveRecorder

    live = live_truth(injected.ground_truth, tokenizer)
    recorder = CurveRecorder(canaries=live.canaries, reference_secrets=live.reference_secrets, section=live.recipe.scoring,
                             seed=0, tokenizer=tokenizer)
    plain = short_sft(injected.dataset, tokenizer, tmp_path / "a", [])
    measured = short_sft(injected.dataset, tokenizer, tmp_path / "b", [CurveCallback(recorder, every_steps=2)])
    assert measured == plain and len(plain) == 6
    assert [s for s, _ in recorder.curves["exposure.mean/rep_4/tuned"]] == [2, 4]  # not 6: the final audit measures it
    assert len(recorder.base_scores) == len(live.canaries.canaries)  # the base: the adapter disabled, scored once


@pytest.mark.parametrize("kwargs, message", [
    ({"every_steps": -5}, "every_steps must be 0"),
    ({"gates": [{"metric": "exposure.mean/rep_16/tuned", "of": "first_step_above", "min": 10}]}, "'threshold' goes with"),
    ({"gates": "no_such_gates.yaml"}, "gates file no_such_gates.yaml does not exist"),
])
def test_bad_callback_arguments_are_one_line_errors_before_training(kwargs, message, in_tmp):
    from audit.integrations.callback import CanaryAuditCallback

    with pytest.raises(AuditError, match=message) as err:
        CanaryAuditCallback(ground_truth="gt", **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("ground_truth", [None, "", 3, ["gt"]])
def test_a_ground_truth_that_is_no_path_is_one_line_naming_the_argument(ground_truth, in_tmp):
    from audit.integrations.callback import CanaryAuditCallback

    with pytest.raises(AuditError, match=r"CanaryAuditCallback\(ground_truth=\) must be the ground-truth directory, got .*"
                                         r"\(fix: pass ground_truth= the folder inject_canaries\(out=...\)") as err:
        CanaryAuditCallback(ground_truth=ground_truth)
    assert "\n" not in str(err.value)


def test_a_directory_that_is_not_a_ground_truth_is_named_with_the_missing_files(tmp_path):
    from audit.pipeline.external import read_ground_truth_dir

    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(AuditError, match=r"gt is not a ground-truth directory: canaries.jsonl, canaries.meta.json, "
                                         r"manifest.json missing \(fix: give the directory `audit inject --out` or "
                                         r"inject_canaries\(out=...\) wrote"):
        read_ground_truth_dir(tmp_path / "gt")
