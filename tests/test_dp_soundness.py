"""Soundness on real DP-SGD runs through the whole harness: tiny-llama at eps 4 and 8, 256 single-copy canaries each
included by a fair coin, in Panda et al.'s strongest design (one added token per secret, loss on the secret alone:
recipes/tiny/dp_new_tokens_cpu.yaml). No one-run lower bound (every ``privacy.eps_lb/<method>``, at the accountant's
delta, p = 0.05) may exceed the accountant's eps; the run records the accountant in train.json and the report.

The configuration is chosen so that the check can fail: its bounds are not all 0 (benchmarks/dp_soundness_new_tokens.json,
seed 0 under the test key), and the test says so first. tiny/dp_lora_cpu's six-digit canaries stay at chance under
DP (benchmarks/dp_soundness.json: 8 of 9 audits with every bound 0), where "sound" would be true whatever the audit did."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("opacus")


# CI runs seed 0 at each eps (2 audits); CANARY_AUDIT_DP_SEEDS=3 runs seeds 0-2, as `python benchmarks/dp_soundness.py
# --recipe tiny/dp_new_tokens_cpu --seeds 0 1 2 --eps 4 8 --control` does for benchmarks/dp_soundness_new_tokens.json.
SEEDS = list(range(int(os.environ.get("CANARY_AUDIT_DP_SEEDS", "1"))))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("epsilon", [4.0, 8.0])
def test_no_one_run_bound_exceeds_the_accountants_eps(epsilon, seed, in_tmp):
    from audit.core.config import load_recipe
    from audit.pipeline import run_audit

    recipe = load_recipe("tiny/dp_new_tokens_cpu", [f"seed={seed}", f"training.dp.epsilon={epsilon:g}"])
    assert recipe.canaries.spec == "new_tokens" and recipe.training.loss == "secret"
    result = run_audit(recipe, tracking=False, progress=False)
    report, m = result.report, result.report.metrics
    dp = report.training.dp
    assert dp is not None and dp.target_epsilon == epsilon and dp.delta == recipe.training.dp.delta
    assert 0 < dp.eps_accountant <= epsilon * 1.01 and dp.lora_delta_max > 0
    assert json.loads((result.run_dir / "train.json").read_text())["dp"]["eps_accountant"] == dp.eps_accountant
    assert m["privacy.eps_accountant"].value == dp.eps_accountant
    bounds = {k: v.value for k, v in m.items() if k.startswith("privacy.eps_lb/")}
    assert {"privacy.eps_lb/steinke", "privacy.eps_lb/xiang_gdp", "privacy.eps_lb/xiang_gdp_best_k"} <= set(bounds)
    assert max(bounds.values()) > 0, f"every bound is 0: this audit cannot fail soundness ({bounds})"
    for key, value in bounds.items():
        assert 0 <= value <= dp.eps_accountant, (key, value, dp.eps_accountant)
        assert m[key.replace("eps_lb", "tightness")].value == pytest.approx(value / dp.eps_accountant)
    assert all(g.passed for g in report.gates if g.metric == "privacy.tightness_max")
    assert "fair coin" in report.metric_notes["privacy.eps_accountant"]
