"""Benchmark: batched teacher-forced scoring against one-sequence-per-forward-pass loops, and against GEMM peak.

    HF_HUB_OFFLINE=1 python benchmarks/scoring.py                        # SmolLM2 + tiny-llama -> benchmarks/scoring.json
    HF_HUB_OFFLINE=1 python benchmarks/scoring.py --threads 1 2 --repeats 3

Every method computes the same signals for the same sequences (per-token log-probability plus the full-vocabulary mean
and variance of log p that Min-K%++ needs) and returns them on the host:

* ``engine``: :func:`audit.score.engine.score_token_sequences` (sorted, padded per batch, token budget 1024,
  vocabulary reduced in row chunks);
* ``loop_vectorized``: one ``[1, T]`` forward pass per sequence, full ``log_softmax`` and vectorized reductions (how
  memaudit's ``extract_token_signals`` scores);
* ``loop_item``: one ``[1, T]`` forward pass per sequence with ``labels`` (the loss too), then a Python loop of
  ``.item()`` per token, as mimir's ``get_probabilities`` does, with Min-K%++ reductions over the full tensors.

A second workload is the one that dominates an audit's scoring: exposure, where each canary's secret is ranked
among reference secrets placed after the same prefix (``--candidates`` per canary). ``engine`` is
:func:`audit.score.engine.candidate_nll_bits` (prefix KV cache computed once, candidates in batches); ``loop`` scores
each whole candidate sentence in its own forward pass and sums the secret tokens' log-probabilities, as a
per-sequence tool computes exposure.

Throughput is scored tokens per second (median of ``--repeats`` after a warm-up). Model FLOPs per scored sequence
are ``2 * (matmul weights) * T + 4 * layers * hidden * T(T+1)/2`` (attention scores and values), and the fraction of
peak divides the achieved FLOP/s by the best measured fp32 ``torch.matmul`` rate on this machine. The load average
is recorded before and after every measurement because the 2 cores are shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from audit.core.rng import SeededStream
from audit.data.canaries import generate_canaries, load_spec
from audit.data.canaries.base import random_secrets
from audit.data.corpus import load_records
from audit.data.models import load_model_and_tokenizer, resolve_model
from audit.score.engine import candidate_nll_bits, score_token_sequences, split_tokens, split_tokens_many, torch_threads

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {"cpu": cpu, "cpus": os.cpu_count(), "avx512": " avx512f" in flags, "avx2": " avx2" in flags,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": "none: no GPU is available to this task (CPU-only figures)",
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "2-core VM shared with other engineers' jobs; wall-clock timings include that contention"}


def texts_for_benchmark(n_notes: int, seed: int) -> list[str]:
    """Canary sentences (digits spec, every context) and built-in notes records: short, realistic audit inputs."""
    spec = load_spec("digits")
    canaries = generate_canaries(spec, seed=seed, tiers=[1], members_per_tier=16, references=16).canaries
    notes = [r["text"] for r in load_records("builtin:notes", text_column="text", max_records=None, builtin_n=n_notes, seed=seed)]
    return [c.text for c in canaries] + notes


def flops_per_sequence(model, length: int) -> float:
    """Forward FLOPs to score a sequence of ``length`` tokens: every matmul weight twice per token, plus attention."""
    weights = sum(m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    return 2.0 * weights * length + 4.0 * cfg.num_hidden_layers * cfg.hidden_size * length * (length + 1) / 2


def gemm_peak(threads: int) -> dict:
    """Best fp32 matmul rate over shapes that occur in the models (and a large square one)."""
    out = {}
    with torch_threads(threads):
        for m, k, n in [(1024, 576, 1536), (1024, 576, 576), (1024, 576, 49152 // 8), (2048, 2048, 2048)]:
            a, b = torch.randn(m, k), torch.randn(k, n)
            a @ b
            best = min(_time(lambda a=a, b=b: a @ b) for _ in range(5))
            out[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 2)
    return {"gflops_by_shape": out, "peak_gflops": max(out.values())}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.inference_mode()
def loop_vectorized(model, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for ids in seqs:
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float(), dim=-1)
        target = logp.gather(-1, x[0, 1:, None]).squeeze(-1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        var = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=0)
        out.append((target.double().numpy(), mu.double().numpy(), var.double().numpy()))
    return out


@torch.inference_mode()
def loop_item(model, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for ids in seqs:
        x = torch.tensor([ids])
        logits = model(input_ids=x, labels=x).logits
        logp = torch.log_softmax(logits[..., :-1, :].contiguous(), dim=-1)
        target = [logp[0, i, t].item() for i, t in enumerate(ids[1:])]
        probs = logp[0].exp()
        mu = (probs * logp[0]).sum(-1)
        var = (probs * logp[0].square()).sum(-1) - mu.square()
        out.append((np.array(target), mu.double().numpy(), var.double().numpy()))
    return out


def engine(model, seqs):
    return [(s.logprobs, s.vocab_mean, s.vocab_var) for s in score_token_sequences(model, seqs, vocab_stats=True)]


def timed_repeats(name: str, fn, *, repeats: int, threads: int) -> tuple[dict, object, float]:
    """One warm-up call (its result is returned), then ``repeats`` timed calls; the row every workload reports."""
    with torch_threads(threads):
        result = fn()
        load_before = os.getloadavg()[0]
        times = [_time(fn) for _ in range(repeats)]
        load_after = os.getloadavg()[0]
    wall = statistics.median(times)
    return {"method": name, "threads": threads, "median_s": round(wall, 4), "all_s": [round(t, 4) for t in times],
            "load_1min_before_after": [round(load_before, 2), round(load_after, 2)]}, result, wall


def measure(name: str, fn, model, seqs, *, repeats: int, threads: int, flops: float, peak: float) -> tuple[dict, list]:
    n_tokens = sum(len(s) - 1 for s in seqs)
    row, result, wall = timed_repeats(name, lambda: fn(model, seqs), repeats=repeats, threads=threads)
    row.update({"tokens_per_s": round(n_tokens / wall, 1), "gflops": round(flops / wall / 1e9, 2),
                "fraction_of_gemm_peak": round(flops / wall / 1e9 / peak, 3)})
    return row, result


def engine_speedups(rows: list[dict], threads: list[int], baselines: tuple[str, ...]) -> dict:
    """Median time of each baseline over the engine's, per thread count."""
    def median_s(method: str, n: int) -> float:
        return next(r["median_s"] for r in rows if r["method"] == method and r["threads"] == n)

    return {f"threads_{n}/engine_vs_{base}": round(median_s(base, n) / median_s("engine", n), 2)
            for n in threads for base in baselines}


def max_diff(a, b) -> dict:
    return {k: float(max(np.max(np.abs(x[i] - y[i])) if len(x[i]) else 0.0 for x, y in zip(a, b, strict=True)))
            for i, k in enumerate(("logprob", "vocab_mean", "vocab_var"))}


def run_model(source: str, seqs_text: list[str], *, threads: list[int], repeats: int) -> dict:
    model, tok = load_model_and_tokenizer(resolve_model(source, progress=False).path, dtype=torch.float32, device="cpu")
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in seqs_text]
    flops = sum(flops_per_sequence(model, len(s)) for s in seqs)
    rows, agreement = [], {}
    for n in threads:
        peak = gemm_peak(n)
        by_method = {}
        for name, fn in (("engine", engine), ("loop_vectorized", loop_vectorized), ("loop_item", loop_item)):
            row, by_method[name] = measure(name, fn, model, seqs, repeats=repeats, threads=n, flops=flops,
                                           peak=peak["peak_gflops"])
            row["gemm"] = peak
            rows.append(row)
            print(json.dumps(row), flush=True)
        agreement[f"threads_{n}"] = {"engine_vs_loop_vectorized": max_diff(by_method["engine"], by_method["loop_vectorized"]),
                                     "engine_vs_loop_item": max_diff(by_method["engine"], by_method["loop_item"])}
    speedups = engine_speedups(rows, threads, ("loop_vectorized", "loop_item"))
    lengths = [len(s) for s in seqs]
    return {"model": source, "params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size,
            "sequences": len(seqs), "scored_tokens": sum(n - 1 for n in lengths),
            "length_min_median_max": [min(lengths), int(statistics.median(lengths)), max(lengths)],
            "model_gflops_total": round(flops / 1e9, 2), "results": rows, "speedup": speedups, "max_abs_difference": agreement}


@torch.inference_mode()
def exposure_loop(model, prefix: list[int], candidates: list[list[int]]) -> list[float]:
    out = []
    for secret in candidates:
        x = torch.tensor([prefix + secret])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
        target = logp.gather(-1, x[0, 1:, None]).squeeze(-1)[len(prefix) - 1 :]
        out.append(float(-target.sum()) / np.log(2))
    return out


def run_exposure_workload(source: str, *, canaries: int, candidates: int, threads: list[int], repeats: int) -> dict:
    """Exposure scoring (canary + reference secrets after one shared prefix): engine vs one forward pass per candidate."""
    model, tok = load_model_and_tokenizer(resolve_model(source, progress=False).path, dtype=torch.float32, device="cpu")
    spec = load_spec("digits")
    drawn = generate_canaries(spec, seed=0, tiers=[1], members_per_tier=canaries, references=0)
    work = []
    for c in drawn.canaries[:canaries]:  # references=0 means "the spec default", so the pool holds more than asked
        refs = random_secrets(drawn.space, candidates - 1, SeededStream(0, "benchmark-references"), exclude={c.secret})
        split = split_tokens(tok, c.prefix, c.secret)
        work.append((split.prefix_ids, [split.secret_ids] + [r.secret_ids for r in split_tokens_many(tok, c.prefix, refs)]))
    n_seqs = sum(len(cands) for _, cands in work)
    rows, results = [], {}
    for n in threads:
        for name, fn in (("engine", lambda: [candidate_nll_bits(model, p, cs) for p, cs in work]),
                         ("loop", lambda: [exposure_loop(model, p, cs) for p, cs in work])):
            row, results[(name, n)], wall = timed_repeats(name, fn, repeats=repeats, threads=n)
            row["candidates_per_s"] = round(n_seqs / wall, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    diff = max(abs(a - b) for n in threads for x, y in zip(results[("engine", n)], results[("loop", n)], strict=True)
               for a, b in zip(x, y, strict=True))
    speedup = engine_speedups(rows, threads, ("loop",))
    return {"model": source, "canaries": len(work), "candidates_per_canary": candidates, "sequences": n_seqs,
            "prefix_tokens": [len(p) for p, _ in work], "secret_tokens_max": max(len(c) for _, cs in work for c in cs),
            "results": rows, "speedup": speedup, "max_abs_difference_bits": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny-llama"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--notes", type=int, default=64, help="built-in notes records added to the 32 canary sentences")
    ap.add_argument("--candidates", type=int, default=128, help="exposure workload: secrets ranked per canary (with it)")
    ap.add_argument("--exposure-canaries", type=int, default=2, help="exposure workload: canaries")
    ap.add_argument("--only-exposure", action="store_true", help="measure only the exposure workload and update --out in place")
    ap.add_argument("--out", default=str(HERE / "scoring.json"))
    args = ap.parse_args()
    exposure = {m: run_exposure_workload(m, canaries=args.exposure_canaries, candidates=args.candidates,
                                         threads=args.threads, repeats=args.repeats) for m in args.models}
    if args.only_exposure:
        report = json.loads(Path(args.out).read_text())
        report["exposure_workload"] = exposure
        report["exposure_workload_machine"] = machine()
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"updated {args.out}")
        return
    texts = texts_for_benchmark(args.notes, seed=0)
    report = {"benchmark": "scoring", "command": "python benchmarks/scoring.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"),
        "machine": machine(), "models": [run_model(m, texts, threads=args.threads, repeats=args.repeats) for m in args.models],
        "exposure_workload": exposure}
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
