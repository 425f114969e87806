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

With ``--model tiny-llama`` it measures the two exact methods instead (and writes them under ``"tiny_llama"`` in the
same file, beside the SmolLM2 figures, which it keeps): for each canary, the pruned walk to the end (no budget) and the
whole-trie enumeration (:func:`audit.score.exposure_search.enumerate_rank`), their ranks (which must agree), rows and
seconds, and what :func:`~audit.score.exposure_search.choose_exact_method` picks from the sampled rank estimate at the
default budget and at ``--budget``, with its predicted seconds from the measured cost of a row. It also states the
chooser's predicted costs for SmolLM2 from the SmolLM2 figures already in the file (it does not run SmolLM2):

    HF_HUB_OFFLINE=1 python benchmarks/exposure.py --model tiny-llama --budget 200000   # ~2 min on 2 cores

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

from audit.core.rng import SeededStream
from audit.core.schema import TrainingSection
from audit.data.canaries import generate_canaries, load_spec
from audit.data.canaries.generate import random_secrets
from audit.data.corpus import load_records
from audit.data.models import cache_dir, load_model_and_tokenizer, resolve_model
from audit.metrics.exposure import rank_against_references
from audit.score.engine import candidate_nll_bits, score_token_sequences, split_tokens, split_tokens_many, torch_threads
from audit.score.exposure_search import (
    choose_exact_method,
    enumerate_rank,
    exact_rank,
    expected_walk_rows,
    parse_secret,
    symbol_tokens,
    trie_rows,
)

HERE = Path(__file__).resolve().parent
REPEATS = {16: "16x", 4: "4x", 1: "1x"}


DEFAULT_BUDGET = 2_000  # scoring.exact_exposure_budget's default
LEARNING_RATE = {"smollm2-135m": 1e-3, "tiny-llama": 2e-2}  # tiny: the tiny/lora_cpu recipe's rate (a random model)


def tuned_adapter(model_dir: Path, texts: list[str], *, epochs: float, seed: int, model_name: str = "smollm2-135m",
                  learning_rate: float | None = None) -> Path:
    """Train (once) and cache a LoRA adapter on ``texts``; the key covers data, settings and (but SmolLM2's) model."""
    import hashlib

    from audit.train.sft import DeviceChoice, train_sft

    lr = learning_rate or LEARNING_RATE[model_name]
    keyed = [texts, epochs, seed] if model_name == "smollm2-135m" else [texts, epochs, seed, model_name, lr]
    key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:16]
    out = cache_dir() / "bench" / f"exposure-lora-{key}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    model, tok = load_model_and_tokenizer(model_dir, dtype=torch.float32, device="cpu")
    section = TrainingSection(method="lora", epochs=epochs, learning_rate=lr, batch_size=8, max_length=64)
    train_sft(model, tok, texts, section=section, seed=seed, work_dir=out.parent / f".work-{key}", weights_dir=out,
              device=DeviceChoice("cpu", "fp32", False), progress=False)
    return out


def timed(fn):
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t, [round(load_before, 2), round(os.getloadavg()[0], 2)]


def label(c) -> str:
    return f"{c.repetitions}x inserted" if c.repetitions else "reference (never inserted)"


def rank_estimate(model, tok, c, space, n_refs: int) -> tuple[int, float, list[float]]:
    """The audit's sampled rank against ``n_refs`` random secrets, the whole-space rank it implies (as ``_exact``), and
    the bits (canary first)."""
    refs = random_secrets(space, n_refs, SeededStream(0, "bench:refs"), exclude={c.secret})
    split = split_tokens(tok, c.prefix, c.secret)
    bits = candidate_nll_bits(model, split.prefix_ids,
                              [split.secret_ids] + [r.secret_ids for r in split_tokens_many(tok, c.prefix, refs)])
    rank = rank_against_references(bits[0], bits[1:])
    return rank, 1 + (rank - 1) / n_refs * (space.size - 1), bits


def compare_methods(model, tok, canaries, space, *, budget: int, n_refs: int, sample: int) -> dict:
    """Walk (unbudgeted) and enumeration on each canary; the chooser's pick and predicted seconds; the naive scorer."""
    rows, whole = [], trie_rows(len(space.alphabet), space.length)
    for c in canaries:
        table, canary = symbol_tokens(tok, c.prefix, space, c.secret), parse_secret(space, c.secret)
        sampled_rank, estimate, bits = rank_estimate(model, tok, c, space, n_refs)
        from_losses = expected_walk_rows(bits[0], bits[1:], len(space.alphabet), space.length)
        walk, walk_s, walk_load = timed(lambda table=table, canary=canary: exact_rank(model, table, canary, node_budget=None))
        enum, enum_s, enum_load = timed(lambda table=table, canary=canary: enumerate_rank(model, table, canary))
        rows.append({
            "canary": label(c), "sampled_rank": f"{sampled_rank}/{n_refs + 1}", "rank_estimate": round(estimate, 1),
            "canary_nll_bits": round(bits[0], 4),
            "walk_rows_predicted_from_rank": round(min(whole, len(space.alphabet) * estimate)),
            "walk_rows_predicted_from_losses": round(from_losses),
            "walk": {"status": walk.status, "rank": walk.rank, "rows": walk.nodes_evaluated, "walks": walk.walks,
                     "frontier_per_level": walk.frontier, "wall_s": round(walk_s, 3), "load_1min_before_after": walk_load},
            "enumeration": {"status": enum.status, "rank": enum.rank, "rows": enum.nodes_evaluated, "wall_s": round(enum_s, 3),
                            "load_1min_before_after": enum_load},
            "ranks_agree": walk.rank == enum.rank,
            "exposure_bits": None if enum.exposure is None else round(enum.exposure, 4),
        })
        print(json.dumps(rows[-1]), flush=True)
    # one row's cost, from the enumerations (the same rows as an unpruned walk): the chooser's seconds per row
    row_s = sum(r["enumeration"]["wall_s"] for r in rows) / sum(r["enumeration"]["rows"] for r in rows)
    for r in rows:
        r["chooser"] = {}
        for b in (DEFAULT_BUDGET, budget):
            for basis, rows_hint in (("rank", None), ("losses", r["walk_rows_predicted_from_losses"])):
                pick = choose_exact_method(rank_estimate=r["rank_estimate"], alphabet_size=len(space.alphabet),
                                           length=space.length,
                                           budget=b, walk_row_s=row_s, enumeration_row_s=row_s, walk_rows=rows_hint)
                ran = {"walk": r["walk"], "enumeration": r["enumeration"]}.get(pick.method)
                r["chooser"][f"budget_{b}_from_{basis}"] = {
                    "method": pick.method, "predicted_walk_rows": round(pick.walk_rows),
                    "predicted_walk_s": round(pick.walk_s, 2),
                    "predicted_enumeration_s": round(pick.enumeration_s, 2),
                    "measured_s_of_the_pick": None if ran is None else ran["wall_s"]}
    c = canaries[0]
    split = split_tokens(tok, c.prefix, c.secret)
    cand = [x.secret_ids for x in split_tokens_many(
        tok, c.prefix, random_secrets(space, sample, SeededStream(0, "bench:naive"), exclude={c.secret}))]
    _, kv_s, kv_load = timed(lambda: candidate_nll_bits(model, split.prefix_ids, cand, batch_size=256))
    return {
        "trie_rows": whole, "cost_per_row_ms": round(1e3 * row_s, 4), "walks_and_enumerations": rows,
        "naive_candidates_kv_cached_prefix": {"candidates_timed": len(cand), "wall_s": round(kv_s, 3),
                                              "per_candidate_ms": round(1e3 * kv_s / len(cand), 4),
                                              "extrapolated_10e6_s": round(kv_s / len(cand) * space.size, 1),
                                              "load_1min_before_after": kv_load},
    }


def smollm2_prediction(smollm2: dict) -> dict:
    """The chooser's predicted costs on SmolLM2 from the SmolLM2 walks in the file (not a run): one row's cost from the
    widest walk, the walk's rows from each canary's exact rank (or |R|/2 for the unlearned reference)."""
    widest = max(smollm2["pruned_walks"], key=lambda w: w["rows_expanded"])
    row_s = widest["wall_s"] / widest["rows_expanded"]
    out = {"cost_per_row_ms": round(1e3 * row_s, 3),
           "cost_per_row_from": f"{widest['canary']} walk, {widest['rows_expanded']} rows in {widest['wall_s']} s",
           "trie_rows": trie_rows(10, 6), "enumeration_predicted_s": round(row_s * trie_rows(10, 6), 1), "canaries": []}
    for w in smollm2["pruned_walks"]:
        estimate = w["rank"] if w["rank"] is not None else 500_000
        picks = {}
        for b in (DEFAULT_BUDGET, trie_rows(10, 6)):
            pick = choose_exact_method(rank_estimate=estimate, alphabet_size=10, length=6, budget=b, walk_row_s=row_s,
                                       enumeration_row_s=row_s)
            picks[f"budget_{b}"] = {"method": pick.method,
                                    "predicted_s": {"walk": round(pick.walk_s, 2), "enumeration": round(pick.enumeration_s, 1),
                                                    "skip": 0.0}[pick.method]}
        out["canaries"].append({"canary": w["canary"], "rank_estimate": estimate,
                                "measured_walk_s": w["wall_s"] if w["status"] == "exact" else None,
                                "chooser": picks})
    return out


def tiny_llama_report(args) -> None:
    """``--model tiny-llama``: walk against enumeration (module docstring), merged into the existing file."""
    from scoring import machine

    info = machine()
    torch.manual_seed(0)
    spec = load_spec("digits")
    pool = generate_canaries(spec, seed=0, tiers=[16, 4, 1], members_per_tier=1, references=1)
    members = sorted(pool.members(), key=lambda c: -c.repetitions)
    notes = [r["text"] for r in load_records("builtin:notes", text_column="text", max_records=None, builtin_n=args.notes, seed=0)]
    texts = notes + [c.text for c in members for _ in range(c.repetitions)]
    base_dir = resolve_model("tiny-llama", progress=False).path
    with torch_threads(args.threads):
        adapter, train_s, train_load = timed(lambda: tuned_adapter(base_dir, texts, epochs=args.epochs, seed=0,
                                                                 model_name="tiny-llama", learning_rate=args.learning_rate))
        from peft import PeftModel

        base, tok = load_model_and_tokenizer(base_dir, dtype=torch.float32, device="cpu")
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        figures = compare_methods(model, tok, members + pool.references(), pool.space, budget=args.budget,
                                  n_refs=args.references, sample=args.sample)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["tiny_llama"] = {
        "command": "python benchmarks/exposure.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": info,
        "model": f"tiny-llama + LoRA r=8 (q_proj, v_proj), lr {args.learning_rate or LEARNING_RATE['tiny-llama']}",
        "space": "6 digits, |R| = 10^6 (19.93 bits)",
        "training": {"records": len(texts), "epochs": args.epochs, "wall_s": round(train_s, 1), "cached": train_s < 1,
                     "load_1min_before_after": train_load},
        **figures,
    }
    if "pruned_walks" in report:
        report["smollm2_chooser_prediction"] = smollm2_prediction(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=2_000, help="trie rows a walk may expand (the harness default)")
    ap.add_argument("--sample", type=int, default=1024, help="candidates timed for the naive extrapolation")
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--notes", type=int, default=32, help="built-in notes records trained beside the canaries")
    ap.add_argument("--out", default=str(HERE / "exposure.json"))
    ap.add_argument("--model", choices=sorted(LEARNING_RATE), default="smollm2-135m",
                    help="tiny-llama: walk against whole-trie enumeration (module docstring)")
    ap.add_argument("--learning-rate", type=float, default=None, help="LoRA learning rate (default: per model, LEARNING_RATE)")
    ap.add_argument("--references", type=int, default=255, help="sampled references for the rank estimate (tiny-llama)")
    args = ap.parse_args()
    if args.model == "tiny-llama":
        return tiny_llama_report(args)
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
            result, wall, load = timed(
                lambda table=table, canary=canary: exact_rank(model, table, canary, node_budget=args.budget))
            row = {"canary": f"{c.repetitions}x inserted" if c.repetitions else "reference (never inserted)",
                   "status": result.status, "rank": result.rank,
                   "exposure_bits": None if result.exposure is None else round(result.exposure, 4),
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
        "kv_cached_prefix": {"candidates_timed": len(cand), "wall_s": round(kv_s, 3),
                             "per_candidate_ms": round(1e3 * kv_s / len(cand), 3),
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
        "benchmark": "exposure",
        "command": "python benchmarks/exposure.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
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
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if "tiny_llama" in previous:  # the tiny-llama figures stay; the SmolLM2 prediction follows the new walks
        report["tiny_llama"] = previous["tiny_llama"]
        report["smollm2_chooser_prediction"] = smollm2_prediction(report)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
