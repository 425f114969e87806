"""Speed and peak memory of the HF engine on models of real shapes with random weights: step ``shapes`` of gpu_check.sh.

    python benchmarks/gpu_shapes.py OUT.json

For each shape of ``benchmarks/configs/`` (Qwen2.5-0.5B, vocabulary 151,936; a Llama 7B shape, vocabulary 128,256),
built on the GPU from its config with random weights (nothing is downloaded), in fp32, TF32 (fp32 weights, TF32
matmuls) and bf16, as the audit scores: exposure candidates per second (``candidate_nll_bits``, 6-digit secrets after
a 16-token prefix) and the time an exhaustive 10^6-candidate space would take at that rate; teacher-forced tokens
per second (``score_token_sequences`` with the full-vocabulary statistics, rows of 64 tokens, each batch filling the
engine's token budget); whether those budgets run without running out of memory; peak memory. ``OUT.json`` is
rewritten after every measurement, so a timeout keeps the finished ones.

``GPU_CHECK_DRYRUN=1``: the same code on the CPU with each shape cut to 1 layer, hidden size 64 and a 4,096-token
vocabulary: a test of this script, not a measurement.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_steps import write_json  # noqa: E402
from scale_memory import SHIPPED, shipped_config  # noqa: E402

DRY = os.environ.get("GPU_CHECK_DRYRUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
CANDIDATES = {"qwen2.5-0.5b": 8192, "llama-7b-shape": 2048} if not DRY else {"qwen2.5-0.5b": 64, "llama-7b-shape": 64}
TF_BATCHES = 2 if not DRY else 1


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return None if DRY else round(torch.cuda.max_memory_allocated() / 2**30, 2)


def reset_peak() -> None:
    if not DRY:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(name: str):
    """The shape's model with random weights, initialized on the device itself (no host copy of a 30 GB model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = shipped_config(name)
    if DRY:
        data.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=4096)
        data.pop("bos_token_id", None), data.pop("eos_token_id", None)  # ids of the real vocabulary
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**data), dtype=torch.float32)
    return model.eval(), data


def measure(model, vocab: int, n_candidates: int) -> dict:
    from audit.score.engine import candidate_nll_bits, default_token_budget, score_token_sequences

    out: dict = {"token_budget": default_token_budget(model)}
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (16,), generator=g).tolist()
    digits = torch.randint(0, vocab, (10,), generator=g).tolist()  # ten "digit" tokens: a trie like the real one
    cands = [[digits[int(d)] for d in torch.randint(0, 10, (6,), generator=g)] for _ in range(n_candidates)]
    try:
        candidate_nll_bits(model, prefix, cands[:64])  # warm-up: kernels, allocator
        sync()
        reset_peak()
        t0 = time.perf_counter()
        candidate_nll_bits(model, prefix, cands)
        sync()
        wall = time.perf_counter() - t0
        out.update(candidates=n_candidates, candidates_per_s=round(n_candidates / wall, 1),
                   exhaustive_1e6_extrapolated_s=round(wall * 1e6 / n_candidates, 1), candidates_peak_gib=peak_gib())
    except torch.OutOfMemoryError as e:
        out["candidates_OOM"] = str(e)[:300]
    rows = max(2, out["token_budget"] // 64) * TF_BATCHES
    seqs = torch.randint(0, vocab, (rows, 64), generator=g).tolist()
    try:
        reset_peak()
        t0 = time.perf_counter()
        score_token_sequences(model, seqs, vocab_stats=True)
        sync()
        wall = time.perf_counter() - t0
        out.update(teacher_forced_tokens=rows * 64, teacher_forced_tokens_per_s=round(rows * 64 / wall, 1),
                   teacher_forced_peak_gib=peak_gib())
    except torch.OutOfMemoryError as e:
        out["teacher_forced_OOM"] = str(e)[:300]
    out["budget_avoids_oom"] = not any(k.endswith("OOM") for k in out)
    return out


def main(path: Path) -> int:
    res: dict = {"dryrun": DRY, "device": "cpu (DRY RUN: cut-down shapes, not a measurement)" if DRY
                 else torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    for name, label in SHIPPED.items():
        t0 = time.perf_counter()
        reset_peak()
        model, config = build(name)
        params = sum(p.numel() for p in model.parameters())
        entry = res["shapes"][name] = {"shape": label, "parameters": params, "vocab": config["vocab_size"],
                                       "layers": config["num_hidden_layers"], "build_s": round(time.perf_counter() - t0, 1),
                                       "weights_gib_fp32": round(params * 4 / 2**30, 2)}
        write_json(path, res)
        for mode in ("fp32", "tf32", "bf16"):
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            torch.backends.cudnn.allow_tf32 = mode == "tf32"
            if mode == "bf16":
                model.to(torch.bfloat16)  # last: a cast in place, no second copy of the weights
            entry[mode] = measure(model, config["vocab_size"], CANDIDATES[name])
            write_json(path, res)
        torch.backends.cuda.matmul.allow_tf32 = False
        del model
        reset_peak()
    ok = all(e[m].get("budget_avoids_oom") for e in res["shapes"].values() for m in ("fp32", "tf32", "bf16"))
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
