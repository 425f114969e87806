"""Scoring memory per model size, from parameter counts: the JSON behind docs/scale.md's table (standard library only).

    python benchmarks/scale_memory.py --json benchmarks/scale_memory.json   # rewrite the JSON (then tables.py --write)
    python benchmarks/scale_memory.py                                       # print it instead

Arithmetic, not a measurement: nothing here ran on a GPU (benchmarks/gpu_check.sh's ``shapes`` step measures). The
JSON says so (``computed_not_measured``) and carries the formulas; ``benchmarks/tables.py scale_memory`` renders the
table from it, and tests/test_scale_doc.py holds the JSON to what this script computes now.

Parameters are counted from each architecture's dimensions (the formula of :func:`param_count`, checked against
transformers' own count for the two shapes shipped in ``benchmarks/configs/``). Memory on one GPU while the HF engine
scores (``audit.score.engine``), for an 80 GB H100 (79.1 GiB visible):

* weights: 4 bytes per parameter in fp32 and in TF32 (TF32 is a matmul mode: the weights stay fp32), 2 in bf16;
* logits: the engine's token budget ``T = total // 8 // (vocab * 4 * 3)`` tokens per forward (clamped to 256..65536)
  keeps the fp32 logits and two reduction temporaries within an eighth of the device, ``T * vocab * 12`` bytes;
* candidate-row KV cache (the exposure ranking, ``candidate_nll_bits``): ``T // 4`` rows (4 tokens left per 6-digit
  candidate after the 2 shared trie levels) each holding the prefix and 2 levels, 18 positions, of keys and values:
  ``rows * 18 * layers * 2 * kv_heads * head_dim * bytes``. The token budget does not count it: a full
  multi-head-attention model in fp32 (the 7B shape: 1 MiB per cached position per row) spends ~30 GB here.

Training memory (the sharded route) is counted too: a full fine-tune in ``bf16-mixed`` keeps fp32 master weights,
fp32 gradients and AdamW's two fp32 moments, 16 bytes per parameter over all GPUs (8 when the moments are offloaded to
host RAM), before activations.

Activations of the teacher-forced pass (``T * hidden`` per layer, freed layer by layer) and the CUDA context are left
out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

GiB = 2**30
DEVICE = "H100 80GB"
DEVICE_GB = 80  # the device's name, as sold
DEVICE_GIB = 79.1
DEVICE_BYTES = int(DEVICE_GIB * GiB)  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB
CACHED_POSITIONS = 18  # a canary prefix of ~16 tokens plus the 2 shared trie levels
TOKENS_LEFT = 4
TRAIN_BYTES = {"full_bf16_mixed": 16, "full_bf16_mixed_moments_offloaded": 8}
"""Bytes per parameter a full fine-tune keeps on the GPUs: fp32 master weights, fp32 gradients, AdamW's two fp32
moments (4 each); the last two in host RAM when offloaded."""
FORMULAS = {
    "parameters": "vocab*hidden*(1 if tied else 2) + layers*(2*hidden^2 + 2*hidden*kv_heads*head_dim + qkv biases "
                  "+ 3*hidden*mlp + 2*hidden) + hidden",
    "token_budget": "clamp(device_bytes // 8 // (vocab*4*3), 256, 65536) (audit.score.engine.default_token_budget)",
    "logits": "token_budget * vocab * 4 bytes * 3 (the fp32 logits and two reduction temporaries)",
    "weights": "parameters * 4 bytes (fp32, TF32) or 2 (bf16)",
    "rows": "max(64, token_budget // 4): candidate rows per pass",
    "candidate_kv": "rows * 18 positions * layers * 2 * kv_heads * head_dim * bytes (4 fp32, 2 bf16)",
    "total": "weights + logits + candidate_kv; fits when total <= device_bytes; gpus = ceil(total / device_bytes)",
    "training": "parameters * bytes per parameter (16 full bf16-mixed, 8 with AdamW's moments offloaded); "
                "gpus = ceil(bytes / device_bytes), before activations",
}

SHAPES = {  # name: (vocab, hidden, layers, heads, kv_heads, mlp, tied embeddings, q/k/v bias)
    "Qwen2.5-0.5B": (151_936, 896, 24, 14, 2, 4_864, True, True),
    "TinyLlama-1.1B": (32_000, 2_048, 22, 32, 4, 5_632, False, False),
    "Llama 7B shape (vocab 128,256)": (128_256, 4_096, 32, 32, 32, 11_008, False, False),
    "Llama-3-8B": (128_256, 4_096, 32, 32, 8, 14_336, False, False),
    "Llama-2-13B": (32_000, 5_120, 40, 40, 40, 13_824, False, False),
    "Qwen2.5-32B": (152_064, 5_120, 64, 40, 8, 27_648, False, True),
    "Llama-3-70B": (128_256, 8_192, 80, 64, 8, 28_672, False, False),
}
SHIPPED = {"qwen2.5-0.5b": "Qwen2.5-0.5B", "llama-7b-shape": "Llama 7B shape (vocab 128,256)"}
"""benchmarks/configs/<file>.json: the shape it is."""


def param_count(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, tied: bool, qkv_bias: bool) -> int:
    """Embeddings (twice unless tied) + per layer: q and o (hidden x hidden), k and v (hidden x kv_heads * head_dim),
    their biases where the architecture has them, the gated MLP (3 x hidden x mlp), two RMSNorms; + the final norm."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    attention = 2 * hidden * hidden + 2 * hidden * kv + ((hidden + 2 * kv) if qkv_bias else 0)
    per_layer = attention + 3 * hidden * mlp + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def token_budget(vocab: int, device_bytes: int = DEVICE_BYTES) -> int:
    """``audit.score.engine.default_token_budget`` on a CUDA device of ``device_bytes``."""
    return int(max(256, min(65536, device_bytes // 8 // (vocab * 4 * 3))))


def scoring_memory(shape: tuple, bytes_per_param: int, device_bytes: int = DEVICE_BYTES) -> dict:
    vocab, hidden, layers, heads, kv_heads = shape[:5]
    budget = token_budget(vocab, device_bytes)
    rows = max(64, budget // TOKENS_LEFT)
    weights = param_count(*shape) * bytes_per_param
    logits = budget * vocab * 4 * 3
    kv = rows * CACHED_POSITIONS * layers * 2 * kv_heads * (hidden // heads) * bytes_per_param
    return {"weights": weights, "logits": logits, "kv": kv, "total": weights + logits + kv, "budget": budget, "rows": rows}


def _gib(n: int) -> float:
    return round(n / GiB, 1)


def models(device_bytes: int = DEVICE_BYTES) -> list[dict]:
    """Per shape: parameters, token budget, rows, and GiB (one decimal) of each term in fp32 and bf16, whether it fits
    one device and how many devices' memory it needs; and the training memory of a full fine-tune."""
    out = []
    for name, shape in SHAPES.items():
        params = param_count(*shape)
        row = {"model": name, "parameters": params, "parameters_b": round(params / 1e9, 2)}
        for dtype, size in (("fp32", 4), ("bf16", 2)):
            m = scoring_memory(shape, size, device_bytes)
            row["token_budget"], row["rows_per_pass"], row["logits_gib"] = m["budget"], m["rows"], _gib(m["logits"])
            row[dtype] = {"weights_gib": _gib(m["weights"]), "candidate_kv_gib": _gib(m["kv"]), "total_gib": _gib(m["total"]),
                          "fits_one_device": m["total"] <= device_bytes, "devices_needed": math.ceil(m["total"] / device_bytes)}
        row["training"] = {k: {"gib": _gib(params * b), "devices_at_least": math.ceil(params * b / device_bytes)}
                           for k, b in TRAIN_BYTES.items()}
        out.append(row)
    return out


def result(argv: list[str]) -> dict:
    """The JSON docs/scale.md cites: the computed rows with the device, formulas and constants they assume."""
    return {"schema_version": 1, "command": " ".join(["python benchmarks/scale_memory.py", *argv]),
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "computed_not_measured": True,
            "note": "Arithmetic from parameter counts (the formulas below), not a measurement: nothing here ran on a GPU. "
                    "The machine only ran the arithmetic; benchmarks/gpu_check.sh's shapes step measures on a GPU.",
            "device": {"name": DEVICE, "gb_as_sold": DEVICE_GB, "visible_gib": DEVICE_GIB, "bytes": DEVICE_BYTES},
            "constants": {"cached_positions": CACHED_POSITIONS, "tokens_left_per_candidate": TOKENS_LEFT,
                          "training_bytes_per_parameter": TRAIN_BYTES},
            "formulas": FORMULAS, "models": models()}


def table(data: dict) -> str:
    """docs/scale.md's memory table from the JSON :func:`result` wrote (``benchmarks/tables.py scale_memory``)."""
    lines = ["| model | parameters | token budget | logits (GiB) | weights fp32 = TF32 / bf16 (GiB) | candidate KV fp32 / bf16 "
             f"(GiB) | total fp32 = TF32 / bf16 (GiB) | on one {data['device']['gb_as_sold']} GB GPU (fp32 / bf16) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["models"]:
        pair = [" / ".join(f"{r[dtype][key]:,.1f}" for dtype in ("fp32", "bf16"))
                for key in ("weights_gib", "candidate_kv_gib", "total_gib")]
        fits = " / ".join("yes" if r[dtype]["fits_one_device"] else "no" for dtype in ("fp32", "bf16"))
        lines.append(f"| {r['model']} | {r['parameters_b']:,.2f} B | {r['token_budget']:,} | {r['logits_gib']:,.1f} | "
                     f"{' | '.join(pair)} | {fits} |")
    return "\n".join(lines) + "\n"


def shipped_config(name: str) -> dict:
    """``benchmarks/configs/<name>.json`` without its comment: what ``transformers.AutoConfig.for_model`` takes."""
    data = json.loads((Path(__file__).resolve().parent / "configs" / f"{name}.json").read_text())
    data.pop("_comment", None)
    return data


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the result here (benchmarks/scale_memory.json) instead of printing it")
    args = ap.parse_args(argv)
    text = json.dumps(result(argv), indent=1) + "\n"
    if args.json:
        args.json.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
