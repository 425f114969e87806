"""benchmarks/gpu_check.sh: its dry run (GPU_CHECK_DRYRUN=1: the "cuda" variants on the CPU, tiny model) runs every
comparison and timing path of the GPU check, passes its own checks and writes the figures a GPU run would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _env(out: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(OUT=str(out), GPU_CHECK_DRYRUN="1", GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_MODEL="tiny-llama",
               GPU_CHECK_REFS="15", GPU_CHECK_NAIVE="256", GPU_CHECK_WALK_BUDGET="100", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def test_script_parses_and_refuses_to_run_outside_the_repository(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=_env(tmp_path / "out"), capture_output=True, text=True)
    assert proc.returncode == 2 and "repository root" in proc.stdout


@pytest.mark.slow  # ~1 min on the shared 2-core machine: two model loads per variant, three variants, two models
def test_dry_run_compares_base_and_tuned_weights_and_writes_its_figures(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    from audit.models import load_model_and_tokenizer

    out = tmp_path / "out"
    run = out / "runs_tiny_lora" / "tiny-run"  # where the dry run looks for weights when it has not trained any
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    lora.save_pretrained(str(run / "adapter"), safe_serialization=True)

    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=_env(out, GPU_CHECK_STEPS="compare"), capture_output=True,
                          text=True, timeout=600)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary[-3000:]
    assert "compare rc=0" in summary and "FAIL" not in summary
    figures = json.loads((out / "gpu.json").read_text())
    assert figures["dryrun"] is True and set(figures["differences"]) == {"base", "tuned"}
    assert all(ok for _, ok in figures["checks"]) and len(figures["checks"]) == 14
    # on one device fp32 is fp32: the "cuda" fp32 variant reproduces the CPU reference exactly
    same = figures["differences"]["tuned"]["cuda_fp32_vs_cpu_fp32"]
    assert same["token_lp_maxabs_nats"] == 0 and same["cand_bits_maxabs"] == 0 and same["rank_mismatches"] == 0
    # bf16 does move the scores (the reason scoring is fp32), and merging in fp32 keeps what was scored
    assert figures["differences"]["tuned"]["cuda_bf16_vs_cpu_fp32"]["cand_bits_maxabs"] > 1e-3
    assert figures["merge"]["fp32_merge_maxabs_bits"] < figures["merge"]["bf16_merge_maxabs_bits"]
    assert figures["timing"]["cuda_fp32"]["candidates_per_s"] > 0
    assert figures["timing"]["cuda_fp32"]["sampling_reproducible_same_seed"] is True
