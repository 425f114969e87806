"""CPU fp32 (the reference) vs CUDA fp32 vs CUDA bf16 on the same weights: step ``compare`` of benchmarks/gpu_check.sh.

    python benchmarks/gpu_compare.py OUT.json MODEL [RUN_DIR]   # MODEL: tiny-llama | smollm2-135m; RUN_DIR: an
                                                                # `audit run` directory (its canaries and adapter)

At most ``GPU_CHECK_CANARIES`` (16) canaries of the run, the learned tiers first, each ranked against
``GPU_CHECK_REFS`` (255) reference secrets, exact walks for at most ``GPU_CHECK_WALKS`` (4) of them: the CPU reference
is the slow side (16 x 256 candidates; a walk is up to 2,000 more), and it must fit the step's limit. ``OUT.json`` is
rewritten after every variant and every comparison, so a timeout keeps what was measured.

With ``GPU_CHECK_DRYRUN=1`` the accelerator is the CPU: the variants are named ``dryrun_cpu_fp32``/``_bf16`` (never
``cuda``), and the comparison of ``dryrun_cpu_fp32`` with ``cpu_fp32`` tests this script, not a GPU.

Checked, for the accelerator in fp32 against the CPU in fp32 (TF32 off, the default): per-token ln p within 1e-3
nats, Min-K%++ within 1e-3, candidate bits within 5e-3 bits, ranks identical except near-ties (a reference within
that tolerance of the canary), exact walks identical, the walk-vs-threshold gap within 1e-4 nats. bf16 is measured
against both (the audit scores in fp32; ``scoring.calibration_*`` records the gap of a bf16-scored audit), and must
never make the exact walk raise. LoRA merges: folded into bf16 weights vs in fp32 (``merged_copy``).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from audit.core.rng import SeededStream
from audit.core.schema import Canary
from audit.data.canaries import generate_canaries, load_spec
from audit.data.canaries.base import random_secrets
from audit.data.models import load_model_and_tokenizer, resolve_model
from audit.metrics.mia import min_k_plus_plus_score
from audit.score.canaries import _text_tokens
from audit.score.engine import (
    candidate_nll_bits,
    continuation_logprobs,
    greedy_continuations,
    in_scoring_precision,
    output_cache,
    pad_id_of,
    score_token_sequences,
    split_tokens,
    split_tokens_many,
    with_cache,
)
from audit.score.exposure_search import exact_rank, parse_secret, symbol_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_steps import write_json  # noqa: E402

DRY = os.environ.get("GPU_CHECK_DRYRUN") == "1"
ACCEL = "cpu" if DRY else "cuda"
TAG = "dryrun_cpu" if DRY else "cuda"
N_CANARIES = int(os.environ.get("GPU_CHECK_CANARIES", "16"))
N_REFS = int(os.environ.get("GPU_CHECK_REFS", "255"))
N_WALKS = int(os.environ.get("GPU_CHECK_WALKS", "4"))
TOL = {"token_lp_nats": 1e-3, "minkpp": 1e-3, "cand_bits": 5e-3, "walk_gap_fp32_nats": 1e-4}
VARIANTS = {"cpu_fp32": ("cpu", torch.float32), f"{TAG}_fp32": (ACCEL, torch.float32), f"{TAG}_bf16": (ACCEL, torch.bfloat16)}


def load(base_path: Path, adapter: Path | None, device: str, dtype: torch.dtype):
    model, tok = load_model_and_tokenizer(base_path, dtype=dtype, device=device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
        if dtype != torch.float32:  # the adapter loads in fp32 (PEFT); bf16 here means bf16 throughout
            model = model.to(dtype)
    return model, tok


def walk(model, table, symbols, budget: int = 2000) -> list:
    try:
        r = exact_rank(model, table, symbols, node_budget=budget)
        return [r.status, r.rank, r.walks]
    except Exception as e:  # noqa: BLE001 - any exception here is a finding, recorded as such
        return ["raised", f"{type(e).__name__}: {e}"[:200], 0]


@torch.inference_mode()
def walk_gap(model, table, symbols, space, batch: int = 64) -> float:
    """Teacher-forced loss of a secret (the walk's first pruning threshold) minus its loss decoded one token at a time
    from a shared prefix cache in row 0 of a ``batch``-row batch (how the walk scores it), in nats."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    toks = table.tokens(symbols)
    out = model(input_ids=torch.tensor([table.prefix_ids], device=dev), use_cache=True)
    prefix = output_cache(out)
    first = torch.log_softmax(out.logits[0, -1].float(), -1).double()
    thr = -float(first[toks[0]]) - float(continuation_logprobs(model, prefix, len(table.prefix_ids), [toks]).sum())
    g = np.random.default_rng(0)
    rows = [toks] + [table.tokens([int(a) for a in g.integers(0, len(space.alphabet), len(symbols))]) for _ in range(batch - 1)]
    ids = torch.tensor(rows, device=dev)
    cache = DynamicCache()
    for layer, kv in enumerate(prefix.layers):
        cache.update(kv.keys.expand(batch, -1, -1, -1).contiguous(), kv.values.expand(batch, -1, -1, -1).contiguous(), layer)
    total = -float(first[toks[0]])
    for j in range(len(toks) - 1):
        o = model(input_ids=ids[:, j:j + 1], use_cache=True, logits_to_keep=1, **with_cache(model, cache),
                  attention_mask=torch.ones((batch, cache.get_seq_length() + 1), dtype=torch.long, device=dev))
        lg = o.logits[0, -1].float()
        total -= float(lg[toks[j + 1]] - torch.logsumexp(lg, -1))
        cache = output_cache(o)
    return total - thr


def measure(model, tok, canaries, refs, space, plan=None):
    """Every score the audit reads, for all canaries; ``plan`` (which walks) comes from the CPU reference."""
    splits = [split_tokens(tok, c.prefix, c.secret) for c in canaries]
    texts = [_text_tokens(tok, c, s) for c, s in zip(canaries, splits, strict=True)]
    passes = score_token_sequences(model, texts, vocab_stats=True, pad_token_id=pad_id_of(tok))
    spans = [p.span(len(s.prefix_ids), len(s.prefix_ids) + len(s.secret_ids)) for p, s in zip(passes, splits, strict=True)]
    bits = [np.array(candidate_nll_bits(model, s.prefix_ids,
                                        [s.secret_ids] + [r.secret_ids for r in split_tokens_many(tok, c.prefix, refs)],
                                        batch_size=256)) for c, s in zip(canaries, splits, strict=True)]
    tables = [symbol_tokens(tok, c.prefix, space, c.secret) for c in canaries]
    ranks = [int(1 + np.sum(b[1:] <= b[0])) for b in bits]
    if plan is None:  # as the pipeline: walk where the sampled rank puts the canary within the budget; the best first
        plan = [i for i, r in enumerate(ranks) if 1 + (r - 1) / len(refs) * (space.size - 1) <= 2000 / len(space.alphabet)]
        plan = sorted(plan or [int(np.argmin([b[0] for b in bits]))], key=lambda i: ranks[i])[:N_WALKS]
    walks = {i: walk(model, tables[i], parse_secret(space, canaries[i].secret)) for i in plan}
    gaps = np.array([walk_gap(model, tables[i], parse_secret(space, canaries[i].secret), space) for i in plan])
    greedy = greedy_continuations(model, tok, [s.prefix_ids for s in splits], max_new_tokens=8, batch_size=64)
    return plan, {"gaps": gaps, "lp": np.concatenate([p.logprobs for p in passes]),
                  "minkpp": np.array([min_k_plus_plus_score(s.logprobs, s.vocab_mean, s.vocab_var, k=0.2) for s in spans]),
                  "bits": bits, "ranks": ranks, "walks": walks, "greedy": greedy}


def diff(ref, got) -> dict:
    tie = TOL["cand_bits"]
    unexplained = 0
    for r, rank_g, rank_r in zip(ref["bits"], got["ranks"], ref["ranks"], strict=True):
        near = int(np.sum(np.abs(r[1:] - r[0]) <= 2 * tie))  # references within the tolerance of the canary
        unexplained += abs(rank_g - rank_r) > near
    walks = [got["walks"][i] for i in sorted(ref["walks"])]
    walks_ref = [ref["walks"][i] for i in sorted(ref["walks"])]
    return {
        "walk_gap_max_nats": float(np.max(np.abs(got["gaps"]))) if len(got["gaps"]) else 0.0,
        "token_lp_maxabs_nats": float(np.max(np.abs(got["lp"] - ref["lp"]))),
        "token_lp_meanabs_nats": float(np.mean(np.abs(got["lp"] - ref["lp"]))),
        "minkpp_maxabs": float(np.max(np.abs(got["minkpp"] - ref["minkpp"]))),
        "cand_bits_maxabs": float(max(np.max(np.abs(g - r)) for g, r in zip(got["bits"], ref["bits"], strict=True))),
        "cand_bits_sd": float(np.std(np.concatenate([g - r for g, r in zip(got["bits"], ref["bits"], strict=True)]))),
        "rank_mismatches": int(sum(a != b for a, b in zip(got["ranks"], ref["ranks"], strict=True))),
        "rank_mismatches_beyond_near_ties": int(unexplained),
        "walks": walks, "walks_ref": walks_ref,
        "walks_raised": int(sum(w[0] == "raised" for w in walks)),
        "walks_rewalked": int(sum(w[0] != "raised" and w[2] > 1 for w in walks)),
        "walk_mismatches": int(sum(a[:2] != b[:2] for a, b in zip(walks, walks_ref, strict=True))),
        "greedy_identical": int(sum(a == b for a, b in zip(got["greedy"], ref["greedy"], strict=True))),
        "n_canaries": len(got["ranks"]),
    }


def checks_of(label: str, f: dict, b: dict) -> list[list]:
    """PASS/FAIL lines for the accelerator's fp32 (``f``) and bf16 (``b``) against the CPU reference."""
    acc = TAG
    return [[f"{label}: {acc} fp32 per-token |d ln p| <= {TOL['token_lp_nats']} nats",
             f["token_lp_maxabs_nats"] <= TOL["token_lp_nats"]],
            [f"{label}: {acc} fp32 Min-K%++ |d| <= {TOL['minkpp']}", f["minkpp_maxabs"] <= TOL["minkpp"]],
            [f"{label}: {acc} fp32 candidate bits |d| <= {TOL['cand_bits']}", f["cand_bits_maxabs"] <= TOL["cand_bits"]],
            [f"{label}: {acc} fp32 ranks identical up to near-ties", f["rank_mismatches_beyond_near_ties"] == 0],
            [f"{label}: {acc} fp32 exact walks identical", f["walk_mismatches"] == 0 and f["walks_raised"] == 0],
            [f"{label}: {acc} fp32 walk-vs-threshold gap <= {TOL['walk_gap_fp32_nats']} nats",
             f["walk_gap_max_nats"] <= TOL["walk_gap_fp32_nats"]],
            [f"{label}: {acc} bf16 exact walks never raise", b["walks_raised"] == 0]]


def main(out: Path, model_name: str, run_dir: Path | None) -> int:
    res: dict = {"dryrun": DRY, "accelerator": "cpu (DRY RUN: the CPU stands in for the GPU; not a GPU comparison)"
                 if DRY else torch.cuda.get_device_name(0), "reference": "cpu_fp32", "variants": list(VARIANTS),
                 "tolerances": TOL, "torch": torch.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    base_path = resolve_model(model_name, progress=False).path
    space = generate_canaries(load_spec("digits"), seed=0, tiers=[1], members_per_tier=1, references=0).space
    adapter = run_dir / "adapter" if run_dir and (run_dir / "adapter" / "adapter_config.json").is_file() else None
    full = run_dir / "model" if run_dir and (run_dir / "model" / "config.json").is_file() else None
    if run_dir and (run_dir / "canaries.jsonl").is_file():
        canaries = [Canary.model_validate_json(x) for x in (run_dir / "canaries.jsonl").read_text().splitlines() if x]
    else:
        canaries = generate_canaries(load_spec("digits"), seed=0, tiers=[1, 4, 16], members_per_tier=2, references=6).canaries
    canaries = sorted(canaries, key=lambda c: (-c.repetitions, c.id))[:N_CANARIES]
    refs = random_secrets(space, N_REFS, SeededStream(0, "gpu-check:refs"), exclude={c.secret for c in canaries})
    res.update(model=str(full or base_path), adapter=str(adapter), n_canaries=len(canaries), n_refs=len(refs),
               compare={}, measure_s={}, checks=[])
    write_json(out, res)

    weights = [("tuned", full or base_path, adapter)] if (adapter or full) else [("base", base_path, None)]
    for label, path, lora in weights:
        plan, got = None, {}
        for name, (dev, dt) in VARIANTS.items():
            t = time.perf_counter()
            m, tok = load(Path(path), lora, dev, dt)
            plan, got[name] = measure(m, tok, canaries, refs, space, plan)
            res["measure_s"][f"{label}/{name}"] = round(time.perf_counter() - t, 2)
            del m
            write_json(out, res)
        f, b = diff(got["cpu_fp32"], got[f"{TAG}_fp32"]), diff(got["cpu_fp32"], got[f"{TAG}_bf16"])
        res["compare"][label] = {f"{TAG}_fp32_vs_cpu_fp32": f, f"{TAG}_bf16_vs_cpu_fp32": b,
                                 f"{TAG}_bf16_vs_{TAG}_fp32": diff(got[f"{TAG}_fp32"], got[f"{TAG}_bf16"])}
        res["checks"] += checks_of(label, f, b)
        write_json(out, res)

    if adapter:  # LoRA merged into bf16 weights (before) vs in fp32 (merged_copy), against the adapter scored in fp32
        from peft import PeftModel

        from audit.train.sft import merged_copy

        m, tok = load(base_path, None, ACCEL, torch.bfloat16)
        m = PeftModel.from_pretrained(m, str(adapter)).eval()  # bf16 base + fp32 adapter: how LoRA trains in pure bf16
        splits = [split_tokens(tok, c.prefix, c.secret) for c in canaries]

        def secret_bits(model):
            return np.array([candidate_nll_bits(model, s.prefix_ids, [s.secret_ids])[0] for s in splits])

        with in_scoring_precision(m, torch.float32) as scored:
            reference = secret_bits(scored)
        res["merge"] = {
            "bf16_merge_maxabs_bits": float(np.max(np.abs(secret_bits(copy.deepcopy(m).merge_and_unload().float()) - reference))),
            "fp32_merge_maxabs_bits": float(np.max(np.abs(secret_bits(merged_copy(m)) - reference)))}
        write_json(out, res)
    for name, ok in res["checks"]:
        print("PASS" if ok else "FAIL", name, flush=True)
    return 0 if all(ok for _, ok in res["checks"]) else 3


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None))
