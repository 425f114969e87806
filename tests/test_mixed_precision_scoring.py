"""A model trained in ``bf16-mixed`` is scored in fp32, like the same weights reloaded.

``accelerator.prepare`` (the Trainer calls it) replaces ``model.forward`` with a bf16-autocast wrapper when native AMP
is on; on CPU accelerate turns it on for ``bf16-mixed`` too, so these tests see on CPU what every default GPU run
does. The tuned model was scored in the same process with the wrapper still on: bf16 arithmetic against an fp32 base,
and numbers a resumed run (which reloads the weights) did not reproduce.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from audit.cli import main
from audit.core.schema import TrainingSection
from audit.score.engine import candidate_nll_bits, in_scoring_precision, split_tokens, split_tokens_many, torch_threads
from audit.train import sft
from audit.train.types import DeviceChoice, WeightsLayer
from audit.train.weights import load_tuned

PREFIX = "Note for the file: the vault access code of Ms. Halloway is "
SECRETS = [f"{i:06d}" for i in range(0, 1_000_000, 7919)][:48]
TEXTS = [f"the vault access code of Ms. Halloway is {i:06d}" for i in range(16)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def _load(path):
    from audit.data.models import load_model_and_tokenizer

    return load_model_and_tokenizer(path, dtype=torch.float32, device="cpu")


def _bits(model, tok) -> np.ndarray:
    head = split_tokens(tok, PREFIX, SECRETS[0]).prefix_ids
    return np.array(candidate_nll_bits(model, head, [s.secret_ids for s in split_tokens_many(tok, PREFIX, SECRETS)]))


def _autocast_wrapped(model) -> bool:
    """accelerate keeps the forward it replaced in ``_original_forward`` (accelerator.py, ``prepare_model``)."""
    return any("_original_forward" in vars(m) for m in model.modules())


def _train(path, tmp_path, method, *, precision="bf16-mixed", callbacks=None):
    model, tok = _load(path)
    section = TrainingSection(method=method, epochs=1, learning_rate=3e-3, batch_size=4, checkpoint_every=0,
                                  precision=precision, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trained = sft.train_sft(model, tok, TEXTS, section=section, seed=0, work_dir=tmp_path / "t", weights_dir=tmp_path / "w",
                            device=DeviceChoice("cpu", precision, False), progress=False, callbacks=callbacks)
    return trained.model, tok


def _reload(path, weights_dir, method):
    base, _ = _load(path)
    return load_tuned(base, [WeightsLayer(method, weights_dir)], device=DeviceChoice("cpu", "fp32", False))


def _prepared(path):
    """tiny-llama prepared by a bf16 Accelerator on CPU, as the Trainer prepares it, and an untouched copy."""
    from accelerate import Accelerator

    model, tok = _load(path)
    plain = copy.deepcopy(model)
    prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
    assert _autocast_wrapped(prepared)
    return prepared, plain, tok


@pytest.fixture
def fresh_accelerate_state():
    """The Accelerator below sets accelerate's process-wide state: it must start from none (an earlier test's Trainer
    leaves its own behind in the same process), and the next Trainer must start from none too."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


# --------------------------------------------------------------------------------------------------- the engine guard


def test_scoring_a_prepared_model_runs_its_fp32_forward_and_puts_the_wrapper_back(tiny_model_dir, fresh_accelerate_state):
    prepared, plain, tok = _prepared(tiny_model_dir)
    reference = _bits(plain, tok)
    assert np.max(np.abs(_bits(prepared, tok) - reference)) > 1e-3  # the wrapper is bf16 arithmetic
    with in_scoring_precision(prepared, torch.float32) as scored:
        assert not _autocast_wrapped(scored)
        np.testing.assert_array_equal(_bits(scored, tok), reference)
    with in_scoring_precision(prepared, torch.bfloat16) as scored:  # a rounding cast works on a copy: no wrapper on it
        assert not _autocast_wrapped(scored)
    assert _autocast_wrapped(prepared)  # a curve point during training: the Trainer's next step is mixed again
    assert np.max(np.abs(_bits(prepared, tok) - reference)) > 1e-3


def test_scoring_ignores_an_autocast_it_is_called_under(tiny_model):
    model, tok = tiny_model
    reference = _bits(model, tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert np.max(np.abs(_bits(model, tok) - reference)) > 1e-3
        with in_scoring_precision(model, torch.float32) as scored:
            np.testing.assert_array_equal(_bits(scored, tok), reference)


# --------------------------------------------------------------------------------------------------- train_sft


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_bf16_mixed_model_computes_like_its_saved_weights_reloaded(tiny_model_dir, tmp_path, method):
    """The model train_sft returns (tuned scoring, the token view, sampled outputs use it) is the fp32 model, not
    accelerate's autocast wrapper around it: its logits, and a full fine-tune's generation, equal a fresh reload's."""
    trained, tok = _train(tiny_model_dir, tmp_path, method)
    reloaded = _reload(tiny_model_dir, tmp_path / "w", method)
    assert not _autocast_wrapped(trained)
    np.testing.assert_array_equal(_bits(trained, tok), _bits(reloaded, tok))
    if method == "full":
        ids = torch.tensor([tok(PREFIX, add_special_tokens=False)["input_ids"]])

        def generated(m):
            with torch.no_grad():
                out = m.generate(input_ids=ids, max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
            return torch.stack(out.logits)

        assert torch.equal(generated(trained), generated(reloaded))


def test_a_curve_point_during_bf16_mixed_training_is_scored_in_fp32_and_training_stays_mixed(tiny_model_dir, tmp_path):
    """scoring.every_steps scores the live model inside the Trainer (audit.train.curve_points, through in_scoring_precision):
    fp32, the scores of the same weights loaded fresh; the steps after it still train under autocast."""
    points = []

    class Point(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                assert _autocast_wrapped(model)
                with in_scoring_precision(model, torch.float32) as scored, torch.inference_mode():
                    points.append((_bits(scored, tok), {k: v.detach().clone() for k, v in model.state_dict().items()}))
                assert _autocast_wrapped(model)

    _, tok = _load(tiny_model_dir)
    _train(tiny_model_dir, tmp_path, "lora", callbacks=[Point()])
    (live, weights), = points
    fresh, _ = _load(tiny_model_dir)
    from peft import LoraConfig, get_peft_model

    fresh = get_peft_model(fresh, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    fresh.load_state_dict(weights)
    np.testing.assert_array_equal(live, _bits(fresh.eval(), tok))


# --------------------------------------------------------------------------------------------------- audit run


def _plain_secret_bits(model, tok, prefix: str, secrets: list[str]) -> list[float]:
    """-log2 p(secret | prefix) by plain transformers, one unpadded sequence per secret, in float64 after the logits."""
    head = tok(prefix, add_special_tokens=False)["input_ids"]
    out = []
    for secret in secrets:
        full = tok(prefix + secret, add_special_tokens=False)["input_ids"]
        b = next((i for i, (x, y) in enumerate(zip(full, head, strict=False)) if x != y), min(len(full), len(head)))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), dim=-1)
        out.append(-sum(float(logp[i - 1, full[i]]) for i in range(b, len(full))) / math.log(2))
    return out


def _independent_check(run_dir: Path, tiny_model_dir, method: str, tuned_rows: list[dict]) -> None:
    """The saved weights, loaded by plain transformers + peft in fp32: secret bits within 1e-3, the same ranks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from audit.pipeline.external import exposure_references, read_ground_truth_dir
    from audit.pipeline.origin import ground_truth_key

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    if method == "lora":
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(run_dir / "adapter"))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"))
    model.eval()
    truth = read_ground_truth_dir(run_dir)  # the run directory read as ground truth, as `audit measure` reads it
    references = exposure_references(truth, tokenizer=tok, key=ground_truth_key(truth))
    canaries = {c.id: c for c in truth.canaries.canaries}
    ranked = [r for r in tuned_rows if r["rank"] is not None]
    assert ranked
    for row in tuned_rows:
        canary = canaries[row["canary_id"]]
        bits, *refs = _plain_secret_bits(model, tok, canary.prefix,
                                         [canary.secret, *(references if row["rank"] is not None else [])])
        assert abs(bits - row["secret_nll_bits"]) < 1e-3, row["canary_id"]
        if row["rank"] is not None:
            assert 1 + sum(r <= bits for r in refs) == row["rank"], row["canary_id"]


@pytest.mark.parametrize("recipe, method", [("tiny/lora_cpu", "lora"), ("tiny/full_cpu", "full")])
def test_bf16_mixed_tuned_scores_equal_a_resumed_runs_from_the_reloaded_weights(in_tmp, tiny_model_dir, recipe, method):
    """scores_tuned.jsonl of a bf16-mixed run, byte for byte, is what a resume computes from the saved weights (the
    train stage read back: audit.train.stage.TrainedWeights), and what plain fp32 transformers give those weights."""
    args = ["run", recipe, "training.precision=bf16-mixed", "training.epochs=4", "scoring.exposure_references=31",
            "tracking.enabled=false", "--quiet"]
    assert main(args) == 0
    (run_dir,) = (in_tmp / "runs").iterdir()
    in_process = (run_dir / "scores_tuned.jsonl").read_bytes()
    assert json.loads((run_dir / "train.json").read_text())["precision"] == "bf16-mixed"
    for name in ("scores_tuned.jsonl", "scores.jsonl", "token_view.json", "report.json", "report.html", "report.md"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "plots", ignore_errors=True)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert (run_dir / "scores_tuned.jsonl").read_bytes() == in_process
    rows = [json.loads(line) for line in in_process.decode().splitlines()]
    _independent_check(run_dir, tiny_model_dir, method, rows)
