"""`audit validate` refuses what would fail the run: a corpus or model that does not exist, a gate no run of the
recipe can meet (thresholds past the recipe's maximum exposure or its sample sizes), all before any model work."""

from __future__ import annotations

import math

import pytest

from audit.cli import main
from audit.core.config import load_recipe
from audit.data.validate import Plan, gate_problems, metric_ranges, validate_only

POSITIVE_CONTROL = "gates=[{name: positive control, metric: exposure.mean/rep_16/tuned, min: 5}]"


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "(fix: " in err, err
    return err


def test_a_missing_corpus_source_is_refused(in_tmp, capsys):
    err = _refused(["validate", "tiny/lora_cpu", "corpus.source=data/mine.jsonl"], capsys)
    assert "corpus.source data/mine.jsonl does not exist" in err


def test_a_missing_model_source_is_refused(in_tmp, capsys):
    err = _refused(["validate", "tiny/lora_cpu", "model.source=./models/mine"], capsys)
    assert "model.source ./models/mine does not exist" in err


def test_a_model_directory_without_weights_is_refused(in_tmp, capsys):
    (in_tmp / "m").mkdir()
    (in_tmp / "m" / "config.json").write_text("{}")
    assert "has no *.safetensors weights" in _refused(["validate", "tiny/lora_cpu", f"model.source={in_tmp / 'm'}"], capsys)


def test_a_gate_above_the_maximum_exposure_is_refused(in_tmp, capsys):
    """15 sampled references: rank 1 of 16 at best, 4.00 bits, so `min: 5` can never pass."""
    err = _refused(["validate", "tiny/lora_cpu", "scoring.exposure_references=15", POSITIVE_CONTROL], capsys)
    assert "gate 'positive control' needs exposure.mean/rep_16/tuned >= 5" in err
    assert "at most log2(16) = 4.00 bits" in err


def test_every_problem_is_reported_at_once(in_tmp, capsys):
    err = _refused(["validate", "tiny/lora_cpu", "corpus.source=nowhere.jsonl", "model.source=/no/model",
                    "scoring.exposure_references=15", POSITIVE_CONTROL], capsys)
    assert "3 problems: (1) corpus.source nowhere.jsonl does not exist" in err
    assert "(2) model.source /no/model does not exist" in err and "(3) gate 'positive control'" in err


def test_the_same_gate_passes_validation_with_enough_references(in_tmp, capsys):
    """log2(256) = 8 bits >= 5: reachable, so the check above is about the references, not the gate."""
    assert main(["validate", "tiny/lora_cpu", "scoring.exposure_references=255", POSITIVE_CONTROL]) == 0
    out = capsys.readouterr().out
    assert "# exposure: at most 8.00 bits against 255 sampled references" in out and "# ok:" in out


def test_shipped_cpu_recipes_validate_with_their_sources(in_tmp):
    for name in ("tiny/lora_cpu", "tiny/full_cpu", "smollm2/lora_cpu"):
        notes = validate_only(load_recipe(name))
        assert any(n.startswith("corpus: built-in") for n in notes) and any(n.startswith("model: built-in") for n in notes)


PLAN = Plan(tiers=[1, 4, 16], members_per_tier=2, references=6, exposure_references=15, space_bits=19.93)


def test_metric_ranges_follow_the_references_the_tiers_and_the_space():
    r = metric_ranges(PLAN)
    assert r["exposure.mean/rep_16/tuned"].high == math.log2(16) == 4.0
    assert r["exposure.space_mean/rep_1/base"].high == 19.93
    assert r["extraction.exact/rep_4/tuned"].high == 2 and r["extraction.exact/rep_0/tuned"].high == 6


@pytest.mark.parametrize(("gate", "expect"), [
    ({"metric": "extraction.exact/rep_16/tuned", "min": 3}, "the tier holds 2 canaries"),
    ({"metric": "exposure.mean/rep_64/tuned", "min": 1}, "matches no metric this recipe reports"),
    ({"metric": "exposure.mean/rep_1/tuned", "max": 0.5}, "average more than that with probability"),
    ({"metric": "mia.tpr_at_1pct/loss_diff", "min": 0.1}, "refused with 6 references"),
    ({"metric": "mia.auc/loss_diff", "min": 1.2}, "a rate between 0 and 1"),
    ({"metric": "exposure.mean", "tier": 16, "model": "tuned", "min": 4.5}, "exposure.mean/rep_16/tuned >= 4.5"),
])
def test_unreachable_gates(gate, expect):
    from audit.core.schema import GateSpec

    problems, _ = gate_problems([GateSpec(**gate)], PLAN)
    assert len(problems) == 1 and expect in problems[0]


def test_reachable_gates_raise_nothing():
    from audit.core.schema import GateSpec

    gates = [GateSpec(metric="exposure.mean/rep_16/tuned", min=3.9), GateSpec(metric="exposure.mean/rep_1/tuned", max=3.0),
             GateSpec(metric="extraction.exact/rep_1/tuned", max=0), GateSpec(metric="mia.auc/loss_diff", max=0.9)]
    problems, notes = gate_problems(gates, PLAN)
    assert problems == []
    # 2 unlearned canaries average >= 3 bits with probability e^-x (1 + x), x = 2 * 3 ln 2: said, not refused
    assert notes == ["gate 'exposure.mean/rep_1/tuned': a model that memorized nothing fails it with probability 0.08 "
                     "(2 canaries, max 3)"]


def test_audit_run_refuses_a_gate_no_run_can_pass_before_any_work(in_tmp, capsys):
    err = _refused(["run", "tiny/lora_cpu", "--no-tracking", "scoring.exposure_references=15", POSITIVE_CONTROL], capsys)
    assert "has a gate no run can pass: gate 'positive control' needs exposure.mean/rep_16/tuned >= 5" in err
    assert not (in_tmp / "runs").exists()
