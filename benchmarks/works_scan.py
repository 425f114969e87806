"""Benchmark: the whole-work window scan against a plain per-window loop, and the cost of a book.

    HF_HUB_OFFLINE=1 python benchmarks/works_scan.py                       # tiny-llama -> benchmarks/works_scan.json
    HF_HUB_OFFLINE=1 python benchmarks/works_scan.py --model smollm2-135m  # where a 135M model may run

Both methods compute the same numbers for the same windows of one work (``--tokens`` token ids, 50 + 50-token windows
at ``--strides``): per suffix token ``ln p`` and whether it is the argmax, hence ``ln p_z`` and the greedy flag.

* ``engine``: :func:`audit.score.works_scan.scan_works` through :func:`~audit.score.works_scan.engine_scorer`
  (equal-length windows batched by the engine's token budget, the vocabulary reduced on the device: only the chosen
  token's log-probability and the argmax flag come back);
* ``loop``: one ``[1, 100]`` forward pass per window, full ``log_softmax`` on the host side, gather and argmax (how a
  per-window script computes Cooper et al.'s p_z).

Throughput is windows/s and window tokens/s (median of ``--repeats``). The fraction of peak divides the model FLOP/s
(:func:`scoring.flops_per_sequence`) by the best fp32 ``torch.matmul`` rate measured here (:func:`scoring.gemm_peak`).
The projection for a 100,000-token book is for SmolLM2-135M (its shapes, counted on the meta device): FLOPs per
window divided by an effective rate, stated in the JSON: on this CPU, the GEMM peak measured now times the fraction
of peak the engine reached on SmolLM2 in ``benchmarks/scoring.json``; on one GPU, an assumed H100 fp32 rate (no TF32:
the audit scores in fp32) times an assumed efficiency. The load average is recorded: the 2 cores are shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scoring import flops_per_sequence, gemm_peak, machine  # noqa: E402  (the scoring benchmark's helpers)

from audit.data.models import load_model_and_tokenizer, resolve_model  # noqa: E402
from audit.score.engine import torch_threads  # noqa: E402
from audit.score.works_scan import ScanSettings, engine_scorer, scan_works  # noqa: E402

BOOK_TOKENS = 100_000
GPU_FP32_TFLOPS = 67.0
"""NVIDIA H100 SXM fp32 (non-tensor-core) peak, TFLOP/s: the audit scores in fp32 and torch keeps TF32 off by default."""
GPU_EFFICIENCY = 0.5
"""Assumed share of that peak a batched forward pass reaches (100-token windows, batches of thousands of rows)."""
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192)
"""SmolLM2-135M's shapes (config.json of HuggingFaceTB/SmolLM2-135M-Instruct)."""


@torch.inference_mode()
def loop(model, ids: list[int], starts: np.ndarray, width: int, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    logp, greedy = [], []
    for s in starts:
        x = torch.tensor([ids[s : s + width]])
        lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
        targets = x[0, 1:]
        steps = lp[prefix - 1 :]
        logp.append(float(steps.gather(-1, targets[prefix - 1 :, None]).sum()))
        greedy.append(bool((steps.argmax(-1) == targets[prefix - 1 :]).all()))
    return np.array(logp), np.array(greedy)


def smollm2_flops_per_window(width: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
    return flops_per_sequence(model, width)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--tokens", type=int, default=2000, help="length of the benchmark work in tokens")
    ap.add_argument("--strides", type=int, nargs="+", default=[50, 10])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "works_scan.json"))
    args = ap.parse_args()

    prefix = suffix = 50
    width = prefix + suffix
    model, tokenizer = load_model_and_tokenizer(resolve_model(args.model, progress=False).path, dtype=torch.float32, device="cpu")
    ids = np.random.default_rng(0).integers(3, len(tokenizer), size=args.tokens).tolist()
    flops_window = flops_per_sequence(model, width)
    results = []
    with torch_threads(args.threads):
        peak = gemm_peak(args.threads)
        for stride in args.strides:
            settings = ScanSettings(prefix=prefix, suffix=suffix, stride=stride)
            rows: list = []
            timings: dict[str, list[float]] = {"engine": [], "loop": []}
            loads = []
            for _ in range(args.repeats):
                load = os.getloadavg()[0]
                t = time.perf_counter()
                rows = scan_works([("w", ids)], score=engine_scorer(model), model="m", settings=settings)
                timings["engine"].append(time.perf_counter() - t)
                starts = np.array([r.start for r in rows])
                t = time.perf_counter()
                logp, greedy = loop(model, ids, starts, width, prefix)
                timings["loop"].append(time.perf_counter() - t)
                loads.append([round(load, 2), round(os.getloadavg()[0], 2)])
            agree = float(np.max(np.abs(logp - np.array([r.logp_z for r in rows]))))
            assert agree < 1e-3 and (greedy == np.array([r.greedy for r in rows])).all()
            n = len(rows)
            for method, ts in timings.items():
                s = statistics.median(ts)
                results.append({"method": method, "stride": stride, "windows": n, "median_s": round(s, 4),
                                "all_s": [round(x, 4) for x in ts], "windows_per_s": round(n / s, 1),
                                "window_tokens_per_s": round(n * width / s, 1),
                                "fraction_of_gemm_peak": round(n * flops_window / s / 1e9 / peak["peak_gflops"], 4),
                                "load_1min_before_after": loads})
            results.append({"stride": stride, "max_abs_logp_z_difference_engine_vs_loop": agree})

    book = {}
    smollm2_flops = smollm2_flops_per_window(width)
    scoring = json.loads((HERE / "scoring.json").read_text())
    fractions = {r["threads"]: r["fraction_of_gemm_peak"] for m in scoring["models"] if m["model"] == "smollm2-135m"
                 for r in m["results"] if r["method"] == "engine"}
    fraction = fractions.get(args.threads, min(fractions.values()))
    cpu_rate = peak["peak_gflops"] * 1e9 * fraction
    gpu_rate = GPU_FP32_TFLOPS * 1e12 * GPU_EFFICIENCY
    for stride in (50, 10):
        windows = math.ceil((BOOK_TOKENS - width) / stride) + 1
        total = windows * smollm2_flops
        book[f"stride_{stride}"] = {"windows": windows, "tflops_per_model": round(total / 1e12, 2),
                                    "cpu_s_per_model": round(total / cpu_rate), "gpu_s_per_model": round(total / gpu_rate, 1),
                                    "note": "per model: base and tuned double it"}
    out = {
        "benchmark": "whole-work window scan (audit.score.works_scan) vs a per-window loop",
        "command": "HF_HUB_OFFLINE=1 python benchmarks/works_scan.py " + " ".join(sys.argv[1:]),
        "machine": {**machine(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "model": args.model, "params": sum(p.numel() for p in model.parameters()), "threads": args.threads,
        "work_tokens": args.tokens, "window": {"prefix": prefix, "suffix": suffix}, "gemm": peak,
        "flops_per_window": flops_window, "results": results,
        "book_100k_tokens_smollm2": {
            "flops_per_window": smollm2_flops, **book,
            "cpu_assumption": f"this CPU's fp32 GEMM peak measured now ({peak['peak_gflops']} GFLOP/s at {args.threads} "
                              f"thread(s)) x the engine's fraction of peak on SmolLM2 in benchmarks/scoring.json ({fraction})",
            "gpu_assumption": f"one NVIDIA H100 SXM at fp32 without TF32 ({GPU_FP32_TFLOPS} TFLOP/s) x {GPU_EFFICIENCY} "
                              "efficiency; not measured (no GPU on this machine)"},
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("results", "book_100k_tokens_smollm2")}, indent=1))


if __name__ == "__main__":
    main()
