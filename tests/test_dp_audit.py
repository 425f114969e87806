"""DP-SGD as a recipe (``training.dp``): bad settings are one-line exit-2 errors before anything is written, the
accountant's eps reaches the report beside every one-run bound with their ratio, the sampling assumptions are stated,
and canaries can be included by independent fair coins as the one-run bounds assume."""

from __future__ import annotations

import json
import math

import pytest

from audit.cli import main
from audit.core.config import load_recipe
from audit.core.errors import AuditError
from audit.core.schema import DPAccounting, MetricEntry, TrainSummary
from audit.metrics.privacy import compare_with_accountant, sampling_statement

SUMMARY = dict(method="lora", steps=3, final_loss=1.0, wall_s=1.0, trainable_params=10, total_params=100, device="cpu",
               precision="fp32", gradient_checkpointing=False, weights_path="adapter", weights_fingerprint="f" * 64)
ACCOUNTING = DPAccounting(eps_accountant=4.0, delta=1e-5, target_epsilon=4.0, noise_multiplier=1.1, max_grad_norm=1.0,
                          sample_rate=0.1, steps=30, records=160, accountant="prv", lora_delta_max=0.01)


@pytest.mark.parametrize(("override", "message"), [
    ("training.dp.epsilon=0", "'training.dp.epsilon': Input should be greater than 0"),
    ("training.dp.epsilon=-1", "'training.dp.epsilon': Input should be greater than 0"),
    ("training.dp.epsilon=nan", "'training.dp.epsilon': Input should be a finite number"),
    ("training.dp.epsilon=1000", "'training.dp.epsilon': Input should be less than or equal to 64"),
    ("training.dp.delta=1", "'training.dp.delta': Input should be less than 1"),
    ("training.dp.delta=0", "'training.dp.delta': Input should be greater than 0"),
    ("training.dp.noise_multiplier=1.0", "exactly one of epsilon"),
    ("training.dp.max_grad_norm=0", "'training.dp.max_grad_norm': Input should be greater than 0"),
    ("training.method=full", "training.dp trains a LoRA adapter"),
    ("training.packing=bfd", "training.dp needs one record per sequence"),
    ("training.gradient_accumulation_steps=2", "one Poisson batch per step"),
    ("training.precision=bf16", "training.dp trains in fp32"),
])
def test_a_bad_dp_section_is_one_line_and_exit_2_when_the_recipe_is_read(override, message, in_tmp, capsys):
    assert main(["validate", "tiny/dp_lora_cpu", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and " (fix: " in err and message in err, err


def test_delta_at_or_above_one_over_n_is_refused_with_the_ground_truth_before_the_run_directory(tiny_model_dir):
    """The ground truth (canaries, injection, pre-flight) runs before the run directory exists (audit.pipeline), and
    it is where the record count n is first known: 120 notes + about 32 coin-included canaries, 1/n about 0.0066."""
    from audit.core.keys import resolve_key
    from audit.data.ground_truth import ground_truth_for_model

    recipe = load_recipe("tiny/dp_lora_cpu", ["training.dp.delta=0.01"])
    with pytest.raises(AuditError, match=r"training.dp.delta=0.01 must lie in \(0, 1/n\)") as info:
        ground_truth_for_model(recipe, model_path=tiny_model_dir, fingerprint="", key=resolve_key(None))
    assert "\n" not in str(info.value) and "(fix: set training.dp.delta=" in str(info.value)
    truth = ground_truth_for_model(load_recipe("tiny/dp_lora_cpu"), model_path=tiny_model_dir, fingerprint="",
                                   key=resolve_key(None))
    assert 1e-5 < 1 / len(truth.training_texts)


def test_no_dp_section_leaves_recipe_and_train_json_as_before_the_field_existed():
    recipe = load_recipe("tiny/lora_cpu")
    assert "dp" not in recipe.model_dump(mode="json")["training"]
    assert "inclusion" not in recipe.model_dump(mode="json")["canaries"]
    assert "dp" not in json.loads(TrainSummary(**SUMMARY).model_dump_json())
    with_dp = TrainSummary(**SUMMARY, dp=ACCOUNTING)
    assert TrainSummary.model_validate_json(with_dp.model_dump_json()) == with_dp


def test_the_dp_recipes_say_what_the_bounds_assume():
    for name in ("tiny/dp_lora_cpu", "smollm2/dp_lora_cpu", "qwen2.5-0.5b/dp_lora_gpu"):
        recipe = load_recipe(name)
        assert recipe.training.dp is not None and recipe.training.dp.epsilon is not None
        assert recipe.canaries.inclusion == "coin" and recipe.canaries.tiers == [1], name  # single copies, fair coins
        assert any(g.metric == "privacy.tightness_max" and g.max == 1.0 for g in recipe.gates), name
    gpu = load_recipe("qwen2.5-0.5b/dp_lora_gpu").canaries
    assert gpu.members_per_tier + gpu.references == 1000


def test_tightness_is_each_bound_over_the_accountants_eps():
    cmp = compare_with_accountant(4.0, {"privacy.eps_lb/steinke": 1.0, "privacy.eps_lb/xiang_gdp": 2.0,
                                        "privacy.eps_lb": 1.0, "privacy.eps_ceiling": 3.5, "mia.auc/loss": 0.9})
    assert cmp.tightness == {"steinke": 0.25, "xiang_gdp": 0.5}  # only privacy.eps_lb/<method> keys
    assert cmp.tightness_max == 0.5 and cmp.sound
    assert not compare_with_accountant(1.0, {"privacy.eps_lb/xiang_gdp": 1.25}).sound
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive number"):
            compare_with_accountant(bad, {})


def test_the_report_metrics_hold_the_accountant_and_the_tightness_of_each_bound():
    from audit.report import accountant_metrics

    metrics = {"privacy.eps_lb": MetricEntry(value=1.0, n=64), "privacy.eps_lb/steinke": MetricEntry(value=1.0, n=64),
               "privacy.eps_lb/xiang_gdp": MetricEntry(value=3.0, n=64)}
    out, notes = accountant_metrics(ACCOUNTING, metrics, inclusion="coin")
    assert out["privacy.eps_accountant"].value == 4.0 and out["privacy.eps_accountant"].n == 30
    assert out["privacy.tightness/steinke"].value == 0.25 and out["privacy.tightness/xiang_gdp"].value == 0.75
    assert out["privacy.tightness_max"].value == 0.75 and out["privacy.tightness_max"].n == 64
    note = notes["privacy.eps_accountant"]
    assert "Poisson sampling" in note and "fair coin" in note and "delta=1e-05" in note and "sound" in note


def test_the_sampling_statement_says_whether_canaries_were_coin_included():
    assert "canaries.inclusion=coin), the independence" in sampling_statement("coin")
    split = sampling_statement("split")
    assert "not the independent fair coins" in split and "indicative" in split
    assert all("Poisson sampling of training records" in sampling_statement(x) for x in ("coin", "split"))


def test_coin_inclusion_draws_each_canary_by_its_own_fair_coin():
    from scipy import stats

    from audit.data.canaries import generate_canaries, load_spec

    spec = load_spec("dp_digits")
    sets = [generate_canaries(spec, seed=s, tiers=[1], members_per_tier=256, references=256, inclusion="coin") for s in range(4)]
    members = [len(c.members()) for c in sets]
    assert len(set(members)) > 1  # counts vary: not a fixed split
    assert all(len(c.canaries) == 512 and {x.repetitions for x in c.canaries} == {0, 1} for c in sets)
    assert stats.binomtest(sum(members), 4 * 512, 0.5).pvalue > 0.001
    again = generate_canaries(spec, seed=0, tiers=[1], members_per_tier=256, references=256, inclusion="coin")
    assert again == sets[0]  # seeded
    split = generate_canaries(spec, seed=0, tiers=[1], members_per_tier=256, references=256)
    assert len(split.members()) == 256 and split.sha256() != sets[0].sha256()
    outcomes = set()
    for seed in range(16):  # two canaries: both coins alike with probability 1/2, refused rather than a one-sided audit
        try:
            generate_canaries(spec, seed=seed, tiers=[1], members_per_tier=1, references=1, inclusion="coin")
            outcomes.add("drawn")
        except AuditError as exc:
            assert "the fair coins of 2 canaries made them all" in str(exc)
            outcomes.add("refused")
    assert outcomes == {"drawn", "refused"}
    with pytest.raises(AuditError, match="unknown canary inclusion"):
        generate_canaries(spec, seed=0, tiers=[1], members_per_tier=2, references=2, inclusion="bernoulli")


def test_the_dp_summary_line_prints_each_bound_beside_the_accountant():
    from audit.report import format_metrics

    class Report:
        metrics = {"privacy.eps_accountant": MetricEntry(value=4.0), "privacy.eps_lb/steinke": MetricEntry(value=1.0),
                   "privacy.eps_lb/xiang_gdp": MetricEntry(value=2.0)}
        metric_notes: dict = {}
        tiers: list = []
        space_bits = 20.0
        exposure_max = 8.0
        whole_works = None
        disclosure = None

    lines = [line for line in format_metrics(Report()) if line.startswith("privacy (DP-SGD)")]
    assert lines == ["privacy (DP-SGD): eps_accountant 4.00; eps_lb (tightness = eps_lb / eps_accountant): "
                     "steinke 1.00 (25%), xiang_gdp 2.00 (50%)"]


def test_lora_on_an_embedding_is_refused_before_the_first_step(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from audit.data.models import load_model_and_tokenizer
    from audit.train.dp import check_opacus_can_wrap

    pytest.importorskip("opacus")
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(AuditError, match="Opacus cannot compute per-record gradients .*embed_tokens") as info:
        check_opacus_can_wrap(get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens"])))
    assert "\n" not in str(info.value) and "(fix: " in str(info.value)
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    check_opacus_can_wrap(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))  # linear: fine


def test_the_train_stage_hands_a_dp_recipe_to_dp_sgd_with_its_section_and_refuses_several_processes(monkeypatch, tmp_path):
    """Sequencing only (the DP-SGD run itself is tests/test_train_dp.py and the slow soundness test)."""
    from types import SimpleNamespace

    from audit.train import distributed
    from audit.train import dp as dp_module
    from audit.train import stage as train_stage
    from audit.train.types import DeviceChoice, TrainPlan

    recipe = load_recipe("tiny/dp_lora_cpu", ["training.dp.epsilon=2"])
    seen = {}

    def fake_train_dp_lora(model, tokenizer, texts, **kwargs):
        seen.update(kwargs, texts=texts)
        summary = TrainSummary(**SUMMARY, dp=ACCOUNTING)
        return SimpleNamespace(model="tuned", summary=summary, loss_history=[(1, 2.0)])

    monkeypatch.setattr(dp_module, "train_dp_lora", fake_train_dp_lora)
    ctx = SimpleNamespace(recipe=recipe, device=DeviceChoice("cpu", "fp32", False), added_tokens=[])
    truth = SimpleNamespace(training_texts=["a", "b"], secret_spans=None)
    plan = TrainPlan(run_dir=tmp_path, train=True)
    losses = []
    tracker = SimpleNamespace(log_metrics=lambda m, step: losses.append((step, m)))
    result = train_stage.train(ctx, (), "model", "tok", truth, plan, tracker=tracker)
    assert result.model == "tuned" and result.summary.dp == ACCOUNTING
    assert seen["settings"] is recipe.training.dp and seen["settings"].epsilon == 2.0 and seen["texts"] == ["a", "b"]
    assert seen["weights_dir"] == tmp_path / "adapter" and seen["batch_size"] == recipe.training.batch_size
    assert seen["trainable_token_ids"] is None and seen["secret_spans"] is None  # dp_digits: no added rows, all tokens
    seen["on_loss"](3, 1.5)
    assert losses == [(3, {"train.loss": 1.5})]
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with pytest.raises(AuditError, match="training.dp runs in one process"):
        train_stage.train(ctx, (), "model", "tok", truth, plan, tracker=tracker)

