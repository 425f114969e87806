"""Benchmark: exact exposure of 6-digit canaries (10^6 candidates) on SmolLM2 by pruned trie walk, vs naive enumeration.

    HF_HUB_OFFLINE=1 python benchmarks/exposure.py                 # writes benchmarks/exposure.json (~10 min on 2 cores)

1. Make memorized canaries: a LoRA fine-tune of SmolLM2-135M (the harness's own ``train_sft``; r=8 on q/v, lr 1e-3)
   on 32 built-in notes records plus three digits canaries inserted 16, 4 and 1 times, 10 epochs. The adapter is cached under
   the canary-audit cache, keyed by these settings, so a re-run times only the scoring.
2. Exact rank of each canary among all 10^6 secrets under the tuned model with :func:`audit.score.exposure_search.exact_rank`
   (node budget ``--budget`` rows; past it the walk stops and says so).
3. The naive method for comparison: score every candidate. Timed on ``--sample`` random candidates and extrapolated to
   10^6, both with the shared-prefix KV cache (:func:`audit.score.engine.candidate_nll_bits`, batch 256) and without it
   (whole sequence per candidate, batched, as a plain implementation would). Exhaustive trie enumeration costs
   111,111 rows (10^0 + ... + 10^5), extrapolated from the cost per row of the widest walk measured.

Every timing records the 1-minute load average before and after: the 2 cores are shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from audit.canaries import generate_canaries, load_spec
from audit.canaries.generate import random_secrets
from audit.corpus import load_records
from audit.models import cache_dir, load_model_and_tokenizer, resolve_model
from audit.rng import SeededStream
from audit.schema import TrainingSection
from audit.score.engine import candidate_nll_bits, score_token_sequences, split_tokens, split_tokens_many, torch_threads
from audit.score.exposure_search import exact_rank, parse_secret, symbol_tokens

HERE = Path(__file__).resolve().parent
REPEATS = {16: "16x", 4: "4x", 1: "1x"}


def tuned_adapter(model_dir: Path, texts: list[str], *, epochs: float, seed: int) -> Path:
    """Train (once) and cache a LoRA adapter on ``texts``; the key covers data and settings."""
    import hashlib

    from audit.train.sft import DeviceChoice, train_sft

    key = hashlib.sha256(json.dumps([texts, epochs, seed]).encode()).hexdigest()[:16]
    out = cache_dir() / "bench" / f"exposure-lora-{key}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    model, tok = load_model_and_tokenizer(model_dir, dtype=torch.float32, device="cpu")
    section = TrainingSection(method="lora", epochs=epochs, learning_rate=1e-3, batch_size=8, max_length=64)
    train_sft(model, tok, texts, section=section, seed=seed, work_dir=out.parent / f".work-{key}", weights_dir=out,
              device=DeviceChoice("cpu", "fp32", False), progress=False)
    return out


def timed(fn):
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t, [round(load_before, 2), round(os.getloadavg()[0], 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=2_000, help="trie rows a walk may expand (the harness default)")
    ap.add_argument("--sample", type=int, default=1024, help="candidates timed for the naive extrapolation")
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--notes", type=int, default=32, help="built-in notes records trained beside the canaries")
    ap.add_argument("--out", default=str(HERE / "exposure.json"))
    args = ap.parse_args()
    from scoring import machine  # benchmarks/scoring.py: the same machine description

    info = machine()
    torch.manual_seed(0)
    spec = load_spec("digits")
    pool = generate_canaries(spec, seed=0, tiers=[16, 4, 1], members_per_tier=1, references=1)
    members = sorted(pool.members(), key=lambda c: -c.repetitions)
    notes = [r["text"] for r in load_records("builtin:notes", text_column="text", max_records=None, builtin_n=args.notes, seed=0)]
    texts = notes + [c.text for c in members for _ in range(c.repetitions)]
    base_dir = resolve_model("smollm2-135m", progress=False).path

    with torch_threads(args.threads):
        adapter, train_s, train_load = timed(lambda: tuned_adapter(base_dir, texts, epochs=args.epochs, seed=0))
        from peft import PeftModel

        base, tok = load_model_and_tokenizer(base_dir, dtype=torch.float32, device="cpu")
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        space = pool.space
        walks = []
        for c in members + pool.references():
            table = symbol_tokens(tok, c.prefix, space, c.secret)
            canary = parse_secret(space, c.secret)
            result, wall, load = timed(lambda table=table, canary=canary: exact_rank(model, table, canary, node_budget=args.budget))
            row = {"canary": f"{c.repetitions}x inserted" if c.repetitions else "reference (never inserted)",
                   "status": result.status, "rank": result.rank, "exposure_bits": None if result.exposure is None else round(result.exposure, 4),
                   "canary_nll_bits": round(result.canary_nll_bits, 4), "rows_expanded": result.nodes_evaluated,
                   "tokens_run": result.tokens_evaluated, "frontier_per_level": result.frontier, "wall_s": round(wall, 3),
                   "load_1min_before_after": load}
            walks.append(row)
            print(json.dumps(row), flush=True)
        widest = max(walks, key=lambda w: w["rows_expanded"])  # the cost of one row, for the exhaustive-trie figure
        per_row = widest["wall_s"] / widest["rows_expanded"]

        # naive enumeration on a random sample of the space, after the 16x canary's prefix
        c = members[0]
        split = split_tokens(tok, c.prefix, c.secret)
        sample = random_secrets(space, args.sample, SeededStream(0, "bench:naive"), exclude={c.secret})
        cand = [s.secret_ids for s in split_tokens_many(tok, c.prefix, sample)]
        bits, kv_s, kv_load = timed(lambda: candidate_nll_bits(model, split.prefix_ids, cand, batch_size=256))
        full_seqs = [split.prefix_ids + ids for ids in cand[: args.sample // 4]]
        _, full_s, full_load = timed(lambda: score_token_sequences(model, full_seqs, vocab_stats=False))
        canary_bits = candidate_nll_bits(model, split.prefix_ids, [split.secret_ids])[0]

    size = space.size
    naive = {
        "kv_cached_prefix": {"candidates_timed": len(cand), "wall_s": round(kv_s, 3), "per_candidate_ms": round(1e3 * kv_s / len(cand), 3),
                             "extrapolated_10e6_s": round(kv_s / len(cand) * size, 1), "load_1min_before_after": kv_load},
        "full_sequence": {"candidates_timed": len(full_seqs), "wall_s": round(full_s, 3),
                          "per_candidate_ms": round(1e3 * full_s / len(full_seqs), 3),
                          "extrapolated_10e6_s": round(full_s / len(full_seqs) * size, 1), "load_1min_before_after": full_load},
        "exhaustive_trie_rows": 111_111,
        "exhaustive_trie_extrapolated_s": round(per_row * 111_111, 1),
        "exhaustive_trie_cost_per_row_from": f"{widest['canary']} walk, {widest['rows_expanded']} rows in {widest['wall_s']} s",
        "sampled_candidates_beating_16x_canary": sum(b <= canary_bits for b in bits),
    }
    top = walks[0]
    report = {
        "benchmark": "exposure", "command": "python benchmarks/exposure.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": info, "model": "smollm2-135m + LoRA r=8 (q_proj, v_proj)", "space": "6 digits, |R| = 10^6 (19.93 bits)",
        "training": {"records": len(texts), "epochs": args.epochs, "wall_s": round(train_s, 1), "cached": train_s < 5,
                     "load_1min_before_after": train_load},
        "pruned_walks": walks, "naive": naive,
        "summary": {
            "memorized_16x_exact_s": top["wall_s"], "memorized_16x_rank": top["rank"],
            "speedup_vs_naive_kv": round(naive["kv_cached_prefix"]["extrapolated_10e6_s"] / top["wall_s"], 1),
            "speedup_vs_naive_full": round(naive["full_sequence"]["extrapolated_10e6_s"] / top["wall_s"], 1),
            "median_walk_s": round(statistics.median(w["wall_s"] for w in walks), 3),
        },
    }
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
