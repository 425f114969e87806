"""Scoring memory per model size, from parameter counts: the table of docs/scale.md (standard library only).

    python benchmarks/scale_memory.py            # prints the Markdown table docs/scale.md shows (a test holds them equal)

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

Activations of the teacher-forced pass (``T * hidden`` per layer, freed layer by layer) and the CUDA context (~0.5 GB)
are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

GiB = 2**30
DEVICE_BYTES = int(79.1 * GiB)  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB
CACHED_POSITIONS = 18  # a canary prefix of ~16 tokens plus the 2 shared trie levels
TOKENS_LEFT = 4

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
    return {"weights": weights, "logits": logits, "kv": kv, "total": weights + logits + kv, "budget": budget}


def table(device_bytes: int = DEVICE_BYTES) -> str:
    gb = lambda b: f"{b / GiB:,.1f}"  # noqa: E731
    lines = ["| model | parameters | token budget | logits (GiB) | weights fp32 = TF32 / bf16 (GiB) | candidate KV fp32 / bf16 "
             "(GiB) | total fp32 = TF32 / bf16 (GiB) | on one 80 GB GPU (fp32 / bf16) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, shape in SHAPES.items():
        f, b = scoring_memory(shape, 4, device_bytes), scoring_memory(shape, 2, device_bytes)
        fits = " / ".join("yes" if m["total"] <= device_bytes else "no" for m in (f, b))
        lines.append(f"| {name} | {param_count(*shape) / 1e9:,.2f} B | {f['budget']:,} | {gb(f['logits'])} | "
                     f"{gb(f['weights'])} / {gb(b['weights'])} | {gb(f['kv'])} / {gb(b['kv'])} | "
                     f"{gb(f['total'])} / {gb(b['total'])} | {fits} |")
    return "\n".join(lines)


def shipped_config(name: str) -> dict:
    """``benchmarks/configs/<name>.json`` without its comment: what ``transformers.AutoConfig.for_model`` takes."""
    data = json.loads((Path(__file__).resolve().parent / "configs" / f"{name}.json").read_text())
    data.pop("_comment", None)
    return data


if __name__ == "__main__":
    print(table())
