"""CPU fp32 (the reference) vs CUDA fp32 vs CUDA bf16 on the same weights, then CUDA timing and memory.

Steps 4-5 of ``benchmarks/gpu_check.sh``, which runs it as:

    python benchmarks/gpu_compare.py OUT_DIR [RUN_DIR]     # RUN_DIR: an `audit run` directory (its canaries, adapter)
    GPU_CHECK_DRYRUN=1 GPU_CHECK_MODEL=tiny-llama python benchmarks/gpu_compare.py OUT_DIR   # every path on the CPU

Environment: GPU_CHECK_MODEL (default smollm2-135m), GPU_CHECK_REFS (reference secrets per canary, default 1023),
GPU_CHECK_NAIVE (candidates timed for the exhaustive-enumeration estimate, default 100000), GPU_CHECK_WALK_BUDGET
(node budget of the timed exact walks, default 20000), GPU_CHECK_DRYRUN=1
(the "cuda" variants run on the CPU: a test of this script, not a measurement).

Writes OUT_DIR/compare.json (everything) and OUT_DIR/gpu.json (the figures for benchmarks/gpu.json); prints one
PASS/FAIL line per check and exits 3 if any fails. What is checked, and against what:

* CUDA fp32 must reproduce CPU fp32 (TF32 is off by default): per-token ln p within 1e-3 nats, Min-K%++ within 1e-3,
  candidate bits within 5e-3 bits, ranks among the references identical except where the canary and a reference
  are closer than that tolerance (a near-tie), exact walks identical, walk-vs-threshold gap within 1e-4 nats.
* CUDA bf16 is measured against both (the audit scores in fp32, ``scoring.precision``): the same differences, and
  one hard requirement, that the exact walk never raises (it re-walks, or reports ``unstable``).
* LoRA merges: the adapter folded into bf16 weights (the old way) vs in fp32 (``merged_copy``), against the
  adapter model scored in fp32.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from audit.canaries import generate_canaries, load_spec
from audit.canaries.base import random_secrets
from audit.metrics.mia import min_k_plus_plus_score
from audit.models import load_model_and_tokenizer, resolve_model
from audit.rng import SeededStream
from audit.schema import Canary
from audit.score.canaries import _text_tokens
from audit.score.engine import (
    candidate_nll_bits,
    continuation_logprobs,
    default_token_budget,
    greedy_continuations,
    in_scoring_precision,
    output_cache,
    pad_id_of,
    sampled_continuations,
    score_token_sequences,
    split_tokens,
    split_tokens_many,
    with_cache,
)
from audit.score.exposure_search import exact_rank, parse_secret, symbol_tokens

DRY = os.environ.get("GPU_CHECK_DRYRUN") == "1"
CUDA = "cpu" if DRY else "cuda"
N_REFS = int(os.environ.get("GPU_CHECK_REFS", "1023"))
NAIVE = int(os.environ.get("GPU_CHECK_NAIVE", "100000"))
WALK_BUDGET = int(os.environ.get("GPU_CHECK_WALK_BUDGET", "20000"))
TOL = {"token_lp_nats": 1e-3, "minkpp": 1e-3, "cand_bits": 5e-3, "walk_gap_fp32_nats": 1e-4}
VARIANTS = {"cpu_fp32": ("cpu", torch.float32), "cuda_fp32": (CUDA, torch.float32), "cuda_bf16": (CUDA, torch.bfloat16)}


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def memory() -> dict:
    if DRY:
        return {"peak_alloc_gib": None}
    return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def reset_peak() -> None:
    if not DRY:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def load(base_path: Path, adapter: Path | None, device: str, dtype: torch.dtype, tuned: bool):
    model, tok = load_model_and_tokenizer(base_path, dtype=dtype, device=device)
    if tuned:
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
    bits = [np.array(candidate_nll_bits(model, s.prefix_ids, [s.secret_ids] + [r.secret_ids for r in split_tokens_many(tok, c.prefix, refs)],
                                        batch_size=256)) for c, s in zip(canaries, splits, strict=True)]
    tables = [symbol_tokens(tok, c.prefix, space, c.secret) for c in canaries]
    ranks = [int(1 + np.sum(b[1:] <= b[0])) for b in bits]
    if plan is None:  # as the pipeline: walk where the sampled rank puts the canary within the budget
        plan = [i for i, r in enumerate(ranks) if 1 + (r - 1) / len(refs) * (space.size - 1) <= 2000 / len(space.alphabet)]
        plan = plan or [int(np.argmin([b[0] for b in bits]))]
    walks = {i: walk(model, tables[i], parse_secret(space, canaries[i].secret)) for i in plan}
    gaps = np.array([walk_gap(model, tables[i], parse_secret(space, canaries[i].secret), space) for i in range(len(canaries))])
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
        "walk_gap_max_nats": float(np.max(got["gaps"])), "walk_gap_min_nats": float(np.min(got["gaps"])),
        "walk_gap_over_1e-3": int(np.sum(got["gaps"] > 1e-3)),
        "token_lp_maxabs_nats": float(np.max(np.abs(got["lp"] - ref["lp"]))),
        "token_lp_meanabs_nats": float(np.mean(np.abs(got["lp"] - ref["lp"]))),
        "minkpp_maxabs": float(np.max(np.abs(got["minkpp"] - ref["minkpp"]))),
        "cand_bits_maxabs": float(max(np.max(np.abs(g - r)) for g, r in zip(got["bits"], ref["bits"], strict=True))),
        "cand_bits_sd": float(np.std(np.concatenate([g - r for g, r in zip(got["bits"], ref["bits"], strict=True)]))),
        "ranks": got["ranks"], "ranks_ref": ref["ranks"],
        "rank_mismatches": int(sum(a != b for a, b in zip(got["ranks"], ref["ranks"], strict=True))),
        "rank_mismatches_beyond_near_ties": int(unexplained),
        "walks": walks, "walks_ref": walks_ref,
        "walks_raised": int(sum(w[0] == "raised" for w in walks)),
        "walks_rewalked": int(sum(w[0] != "raised" and w[2] > 1 for w in walks)),
        "walk_mismatches": int(sum(a[:2] != b[:2] for a, b in zip(walks, walks_ref, strict=True))),
        "greedy_identical": int(sum(a == b for a, b in zip(got["greedy"], ref["greedy"], strict=True))),
        "n_canaries": len(got["ranks"]),
    }


def timing(model, tok, canaries, refs, space) -> dict:
    reset_peak()
    t: dict = {"default_token_budget": default_token_budget(model)}
    if not DRY:
        t["total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    c = canaries[0]
    s = split_tokens(tok, c.prefix, c.secret)
    cand = [r.secret_ids for r in split_tokens_many(tok, c.prefix, refs)]
    t0 = time.perf_counter()
    candidate_nll_bits(model, s.prefix_ids, cand, batch_size=256)
    sync()
    t[f"refs{len(refs)}_batch256_s"] = round(time.perf_counter() - t0, 3)
    many = random_secrets(space, NAIVE, SeededStream(1, "gpu-check:naive"), exclude={c.secret})
    mcand = [r.secret_ids for r in split_tokens_many(tok, c.prefix, many)]
    t0 = time.perf_counter()
    a = np.array(candidate_nll_bits(model, s.prefix_ids, mcand, batch_size=4096))
    sync()
    wall = time.perf_counter() - t0
    t.update({f"naive_{NAIVE}_batch4096_s": round(wall, 2), "candidates_per_s": int(NAIVE / wall),
              "exhaustive_1e6_extrapolated_s": round(wall * 1e6 / NAIVE, 1)})
    small = np.array(candidate_nll_bits(model, s.prefix_ids, mcand[:4096], batch_size=256))
    t["batch4096_vs_256_maxabs_bits"] = float(np.max(np.abs(small - a[:4096])))  # batch-composition noise
    walks = []
    for c in sorted(canaries, key=lambda c: -c.repetitions)[:4]:
        table = symbol_tokens(tok, c.prefix, space, c.secret)
        t0 = time.perf_counter()
        r = walk(model, table, parse_secret(space, c.secret), budget=WALK_BUDGET)
        walks.append({"reps": c.repetitions, "result": r, "wall_s": round(time.perf_counter() - t0, 3)})
    t[f"exact_walks_budget{WALK_BUDGET}"] = walks
    nseq = 64 if DRY else 4096
    seqs = torch.randint(0, len(tok), (nseq, 64), generator=torch.Generator().manual_seed(0)).tolist()
    sync()
    t0 = time.perf_counter()
    score_token_sequences(model, seqs, vocab_stats=True, pad_token_id=pad_id_of(tok))
    sync()
    t["teacher_forced_tokens_per_s"] = int(nseq * 64 / (time.perf_counter() - t0))
    pre = [tok("Note: the code is", add_special_tokens=False)["input_ids"]] * 4
    s1 = sampled_continuations(model, tok, pre, num_samples=4, max_new_tokens=16, seed=3)
    s2 = sampled_continuations(model, tok, pre, num_samples=4, max_new_tokens=16, seed=3)
    t["sampling_reproducible_same_seed"] = s1 == s2
    t.update(memory())
    return t


def vocab_stress() -> dict:
    """Qwen2.5's 152k vocabulary (random 2-layer model, fp32 as the audit scores): does the default budget fit?"""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096 if DRY else 151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    big = LlamaForCausalLM(cfg).to(CUDA).eval()
    reset_peak()
    budget = default_token_budget(big)
    rows = max(2, budget // 64 * 2) if not DRY else 8
    seqs = torch.randint(0, cfg.vocab_size, (rows, 64), generator=torch.Generator().manual_seed(1)).tolist()
    t0 = time.perf_counter()
    try:
        score_token_sequences(big, seqs, vocab_stats=True)
        sync()
        return {"budget": budget, "tokens": rows * 64, "wall_s": round(time.perf_counter() - t0, 2), **memory()}
    except torch.OutOfMemoryError as e:
        return {"budget": budget, "OOM": str(e)[:200]}


def main(out_dir: Path, run_dir: Path | None) -> int:
    res: dict = {"dryrun": DRY, "tolerances": TOL, "torch": torch.__version__,
                 "device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(0)}
    base_path = resolve_model(os.environ.get("GPU_CHECK_MODEL", "smollm2-135m"), progress=False).path
    space = generate_canaries(load_spec("digits"), seed=0, tiers=[1], members_per_tier=1, references=0).space
    adapter = run_dir / "adapter" if run_dir and (run_dir / "adapter" / "adapter_config.json").is_file() else None
    if run_dir and (run_dir / "canaries.jsonl").is_file():
        canaries = [Canary.model_validate_json(x) for x in (run_dir / "canaries.jsonl").read_text().splitlines() if x]
    else:
        canaries = generate_canaries(load_spec("digits"), seed=0, tiers=[1, 4, 16], members_per_tier=2, references=6).canaries
    refs = random_secrets(space, N_REFS, SeededStream(0, "gpu-check:refs"), exclude={c.secret for c in canaries})
    res.update(model=str(base_path), adapter=str(adapter), n_canaries=len(canaries), n_refs=len(refs))

    res["compare"], res["measure_s"] = {}, {}
    for tuned in ([False, True] if adapter else [False]):
        label, plan, got = ("tuned" if tuned else "base"), None, {}
        for name, (dev, dt) in VARIANTS.items():
            t = time.perf_counter()
            m, tok = load(base_path, adapter, dev, dt, tuned)
            plan, got[name] = measure(m, tok, canaries, refs, space, plan)
            res["measure_s"][f"{label}/{name}"] = round(time.perf_counter() - t, 2)
            del m
        res["compare"][label] = {"cuda_fp32_vs_cpu_fp32": diff(got["cpu_fp32"], got["cuda_fp32"]),
                                 "cuda_bf16_vs_cpu_fp32": diff(got["cpu_fp32"], got["cuda_bf16"]),
                                 "cuda_bf16_vs_cuda_fp32": diff(got["cuda_fp32"], got["cuda_bf16"])}
        print(label, json.dumps(res["compare"][label], default=str)[:3000], flush=True)

    checks = []
    for label, c in res["compare"].items():
        f, b = c["cuda_fp32_vs_cpu_fp32"], c["cuda_bf16_vs_cpu_fp32"]
        checks += [(f"{label}: cuda fp32 per-token |d ln p| <= {TOL['token_lp_nats']} nats", f["token_lp_maxabs_nats"] <= TOL["token_lp_nats"]),
                   (f"{label}: cuda fp32 Min-K%++ |d| <= {TOL['minkpp']}", f["minkpp_maxabs"] <= TOL["minkpp"]),
                   (f"{label}: cuda fp32 candidate bits |d| <= {TOL['cand_bits']}", f["cand_bits_maxabs"] <= TOL["cand_bits"]),
                   (f"{label}: cuda fp32 ranks identical up to near-ties", f["rank_mismatches_beyond_near_ties"] == 0),
                   (f"{label}: cuda fp32 exact walks identical", f["walk_mismatches"] == 0 and f["walks_raised"] == 0),
                   (f"{label}: cuda fp32 walk-vs-threshold gap <= {TOL['walk_gap_fp32_nats']} nats",
                    abs(f["walk_gap_max_nats"]) <= TOL["walk_gap_fp32_nats"]),
                   (f"{label}: cuda bf16 exact walks never raise", b["walks_raised"] == 0)]
    res["checks"] = [[n, bool(ok)] for n, ok in checks]

    if adapter:  # LoRA merged into bf16 weights (before) vs in fp32 (merged_copy), against the adapter scored in fp32
        from audit.train.sft import merged_copy

        m, tok = load(base_path, None, CUDA, torch.bfloat16, False)
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, str(adapter)).eval()  # bf16 base + fp32 adapter: how LoRA trains in pure bf16
        splits = [split_tokens(tok, c.prefix, c.secret) for c in canaries]

        def secret_bits(model):
            return np.array([candidate_nll_bits(model, s.prefix_ids, [s.secret_ids])[0] for s in splits])

        with in_scoring_precision(m, torch.float32) as scored:
            reference = secret_bits(scored)
        res["merge"] = {"bf16_merge_maxabs_bits": float(np.max(np.abs(secret_bits(copy.deepcopy(m).merge_and_unload().float()) - reference))),
                        "fp32_merge_maxabs_bits": float(np.max(np.abs(secret_bits(merged_copy(m)) - reference)))}
        print("merge", json.dumps(res["merge"]), flush=True)
    (out_dir / "compare.json").write_text(json.dumps(res, indent=1, default=str))

    res["timing"] = {}
    for name in ("cuda_fp32", "cuda_bf16"):
        dev, dt = VARIANTS[name]
        m, tok = load(base_path, adapter, dev, dt, bool(adapter))
        res["timing"][name] = timing(m, tok, canaries, refs, space)
        print(name, json.dumps(res["timing"][name], default=str), flush=True)
        del m
    res["timing"]["vocab152k_fp32"] = vocab_stress()
    print("vocab152k", json.dumps(res["timing"]["vocab152k_fp32"]), flush=True)
    (out_dir / "compare.json").write_text(json.dumps(res, indent=1, default=str))
    figures = {"schema_version": 1, "dryrun": DRY, "device": res["device"], "torch": res["torch"], "model": res["model"],
               "checks": res["checks"], "tolerances": TOL,
               "differences": {lab: {k: {q: v[q] for q in ("token_lp_maxabs_nats", "minkpp_maxabs", "cand_bits_maxabs",
                                                            "cand_bits_sd", "rank_mismatches", "walk_gap_max_nats",
                                                            "walks_raised", "walks_rewalked")}
                                     for k, v in c.items()} for lab, c in res["compare"].items()},
               "merge": res.get("merge"), "timing": res["timing"]}
    (out_dir / "gpu.json").write_text(json.dumps(figures, indent=1, default=str))
    for n, ok in checks:
        print("PASS" if ok else "FAIL", n, flush=True)
    return 0 if all(ok for _, ok in checks) else 3


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    sys.exit(main(out, Path(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] else None))
