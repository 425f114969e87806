"""The project's GGUF files, checked against llama.cpp itself (not only transformers' GGUF reader).

    npm i -E --prefix /tmp/llamacpp node-llama-cpp@3.21.1     # once: prebuilt llama.cpp binaries (no build, no model)
    python benchmarks/gguf_llamacpp.py --prefix /tmp/llamacpp  # SmolLM2-135M, f32 and q8_0: benchmarks/gguf_llamacpp.json
    python benchmarks/gguf_llamacpp.py --prefix /tmp/llamacpp --model tiny-llama --out /tmp/tiny.json

Writes the model with ``write_gguf`` (the writer a recipe's ``release`` section uses) at each type into a temporary
folder; ``benchmarks/gguf_llamacpp.mjs`` loads every file with node-llama-cpp's prebuilt llama.cpp (CPU), tokenizes
the prompts, scores every prompt token given the ones before it and continues each prompt greedily. transformers
computes the same in fp32 on the weights the project's reader gives back from the same file (``read_gguf``: the file
dequantized as the format defines). Compared, per file and prompt:

- token ids: llama.cpp's ``tokenize(text, special=true)`` against the model's HF tokenizer with
  ``add_special_tokens=False`` (the files say ``add_bos_token = false``; llama.cpp adds nothing), exact; recorded
  beside it: whether HF's ``add_special_tokens=True`` adds anything, and the tokenizer the reader builds from the file;
- the greedy continuation (``--n-new`` tokens, stopping after a control token): exact, and where it differs, HF's
  log-probability margin between its token and llama.cpp's at the first difference (a near tie, or not);
- log-probabilities (natural log, softmax over the whole vocabulary) of every prompt token and of llama.cpp's greedy
  tokens, transformers scoring llama.cpp's ids: |log p_llama.cpp - log p_HF|, median and max.

Two llama.cpp settings: ``exact`` (F32 KV cache, no flash attention: only the file's weights and llama.cpp's matmuls
differ from the reference) and ``default`` (node-llama-cpp's defaults: F16 KV cache, flash attention auto, what a
user runs). The tolerance is checked on ``exact``: an F32 file within :data:`F32_TOLERANCE` per token. On quantized
weights llama.cpp's CPU matmul rounds the activations too (to Q8_0 blocks for Q8_0 weights: ggml's
``vec_dot_type``), and a rounding is discontinuous, so no fp32 reference reproduces it token for token; the control
is transformers with that rounding applied before every matmul of a quantized weight against transformers without,
and llama.cpp's median |difference| must be at most :data:`CONTROL_FACTOR` times the control's.

Exit 0 when every file loads and agrees, 1 when something disagrees (the JSON says what), 2 when node or
node-llama-cpp is missing (one line saying how to install it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NODE_LLAMA_CPP = "node-llama-cpp@3.21.1"
PREFIX_ENV = "NODE_LLAMA_CPP_PREFIX"
PROMPTS = [
    {"name": "canary", "text": "My PIN is 123456"},
    {"name": "english_fox", "text": "The quick brown fox jumps over the lazy dog."},
    {"name": "english_paris", "text": "Paris is the capital of France, and it is famous for"},
    {"name": "chat", "text": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"},
]
SETTINGS = [{"name": "exact", "kv_cache": "F32", "flash_attention": False},
            {"name": "default", "kv_cache": None, "flash_attention": None}]
F32_TOLERANCE = 1e-3
"""Largest |log p_llama.cpp - log p_HF| (nats) per token for an F32 file: the same weights and fp32 arithmetic,
summed in another order."""
CONTROL_FACTOR = 2.0
ACTIVATIONS = {"f16": "f16", "bf16": "bf16", "q8_0": "q8", "q4_0": "q8", "q5_0": "q8", "q4_1": "q8", "q5_1": "q8"}
"""What ggml's CPU matmul rounds the activations to for weights of each type (``vec_dot_type``: F16, BF16, Q8_0 or
Q8_1 blocks of 32, which hold the same rounded values)."""


def node_llama_cpp_dir(prefix: str | os.PathLike | None) -> Path | None:
    """The folder holding ``node_modules/node-llama-cpp``: ``prefix``, else ``$NODE_LLAMA_CPP_PREFIX``, else beside
    this script or at the repository root; None if none has it."""
    for base in (Path(c).expanduser() for c in (prefix, os.environ.get(PREFIX_ENV), HERE, ROOT) if c):
        if (base / "node_modules" / "node-llama-cpp" / "package.json").is_file():
            return base
    return None


def missing(prefix: str | os.PathLike | None = None) -> str | None:
    """One line saying what is missing to run the check (node, node-llama-cpp) and how to install it; None if nothing."""
    where = prefix or os.environ.get(PREFIX_ENV) or "DIR"
    install = f"`npm i -E --prefix {where} {NODE_LLAMA_CPP}` and pass --prefix {where} (or set {PREFIX_ENV})"
    if shutil.which("node") is None:
        return f"node is not installed: install Node.js >= 20, then {install}"
    if node_llama_cpp_dir(prefix) is None:
        return f"node-llama-cpp is not installed{'' if where == 'DIR' else f' under {where}'}: run {install}"
    return None


def llama_cpp_source_commit(prefix: Path) -> str | None:
    """The llama.cpp commit node-llama-cpp ships as source (``llama/gitRelease.bundle``, its binaries' source)."""
    bundle = prefix / "node_modules" / "node-llama-cpp" / "llama" / "gitRelease.bundle"
    if not bundle.is_file() or shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "bundle", "list-heads", str(bundle)], capture_output=True, text=True)
    heads = proc.stdout.split()
    return heads[0] if proc.returncode == 0 and heads else None


def run_node(prefix: Path, files: list[dict], *, n_new: int, threads: int, work: Path) -> dict:
    """``gguf_llamacpp.mjs`` on ``files``: its JSON, or one line and exit 2 when node-llama-cpp cannot run."""
    request = {"files": files, "prompts": PROMPTS, "settings": SETTINGS, "n_new": n_new, "threads": threads,
               "context": 256}
    (work / "request.json").write_text(json.dumps(request))
    proc = subprocess.run(["node", str(HERE / "gguf_llamacpp.mjs"), str(prefix), str(work / "request.json"),
                           str(work / "result.json")], capture_output=True, text=True)
    if proc.returncode != 0 or not (work / "result.json").is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"node-llama-cpp ({NODE_LLAMA_CPP} under {prefix}) failed: {last[0][:300]}", file=sys.stderr)
        sys.exit(2)
    return json.loads((work / "result.json").read_text())


def round_activations(x, kind: str):
    """``x`` rounded as ggml's CPU matmul rounds its activations (:data:`ACTIVATIONS`): Q8 blocks of 32 values,
    ``d = max|x| / 127`` stored as fp16, ``q = round(x / d)``; or a cast to fp16 / bf16 and back."""
    import torch

    if kind in ("f16", "bf16"):
        return x.to(torch.float16 if kind == "f16" else torch.bfloat16).to(x.dtype)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127).half().float()).reshape(x.shape)


def rounding_hooks(model, tensor_types: dict[str, str], qtype: str) -> list:
    """Forward pre-hooks rounding the input of every linear layer whose GGUF weight is of ``qtype`` (the tied output
    layer reads ``token_embd``); the handles, to remove."""
    import gguf
    import torch

    kind = ACTIVATIONS.get(qtype)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or kind is None:
            continue
        gname = "token_embd.weight" if name == "lm_head" and "output.weight" not in tensor_types else \
            names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if tensor_types.get(gname, "F32").lower() == qtype and module.in_features % 32 == 0:
            handles.append(module.register_forward_pre_hook(lambda _m, args: (round_activations(args[0], kind),)))
    return handles


def token_logprobs(model, ids: list[int]) -> list[list[float]]:
    """Per position, the natural-log next-token distribution after ``ids[: i + 1]`` (one forward pass, fp32 model)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    return torch.log_softmax(logits, dim=-1).tolist()


def greedy(model, ids: list[int], n_new: int, stop: set[int]) -> list[int]:
    """``n_new`` argmax tokens after ``ids``, stopping after a control token, as the node script does."""
    out: list[int] = []
    while len(out) < n_new and not (out and out[-1] in stop):
        last = token_logprobs(model, ids + out)[-1]
        out.append(max(range(len(last)), key=last.__getitem__))
    return out


def _stats(diffs: list[float]) -> dict:
    return {"median": round(statistics.median(diffs), 6), "max": round(max(diffs), 6)} if diffs else {}


def compare_prompt(got: dict, model, hf_greedy: list[int], control) -> dict:
    """llama.cpp's answers for one prompt (``got``) against transformers on the file's dequantized weights; ``control``
    is a context manager that turns the activation rounding on (None for an F32 file). The per-token differences are
    returned under ``_diffs`` / ``_control`` for the file's summary."""
    ids, cont = got["ids_special"], got["greedy"]
    seq = ids + cont
    rows = token_logprobs(model, seq)
    hf = [rows[i][seq[i + 1]] for i in range(len(seq) - 1)]
    llama = got["prompt_logprobs"] + got["greedy_logprobs"]
    diffs = [abs(a - b) if a is not None else float("inf") for a, b in zip(llama, hf, strict=True)]
    controls: list[float] = []
    if control is not None:
        with control():
            rounded = token_logprobs(model, seq)
        controls = [abs(rounded[i][seq[i + 1]] - hf[i]) for i in range(len(hf))]
    first = next((j for j, (a, b) in enumerate(zip(cont, hf_greedy, strict=False)) if a != b), None)
    if first is None and len(cont) != len(hf_greedy):
        first = min(len(cont), len(hf_greedy))
    margin = None
    if first is not None and first < min(len(cont), len(hf_greedy)):
        at = rows[len(ids) - 1 + first]  # the same prefix on both sides up to here
        margin = round(at[hf_greedy[first]] - at[cont[first]], 6)
    out = {"greedy_llama_cpp": cont, "greedy_text": got["greedy_text"], "greedy_equal": cont == hf_greedy,
           "greedy_first_difference": first, "hf_margin_at_first_difference_nats": margin,
           "logprobs_compared": len(diffs), "logprob_abs_diff_nats": _stats(diffs)}
    if controls:
        out["control_abs_diff_nats"] = _stats(controls)
    return {**out, "_diffs": diffs, "_control": controls}


def check_file(qtype: str, info, got: dict, source_tok, n_new: int, stop: set[int]) -> dict:
    """One file: loaded or refused; per llama.cpp setting, per prompt, the comparisons, and the verdict."""
    import contextlib

    from audit.pipeline.release.gguf_file import read_gguf

    row = {"type": qtype, "bytes": info.bytes, "sha256": info.sha256, "loaded": got["loaded"], "llama_cpp_log": got["log"]}
    if not got["loaded"]:
        return {**row, "error": got["error"], "agrees": False}
    back = read_gguf(info.path)
    model = back.model

    @contextlib.contextmanager
    def rounded():
        handles = rounding_hooks(model, back.tensor_types, qtype)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    control = None if qtype == "f32" else rounded
    tokens = []
    hf_greedy = {}
    for prompt, g in zip(PROMPTS, got["settings"][SETTINGS[0]["name"]]["prompts"], strict=True):
        hf_ids = source_tok(prompt["text"], add_special_tokens=False)["input_ids"]
        hf_greedy[prompt["name"]] = greedy(model, hf_ids, n_new, stop)
        tokens.append({"name": prompt["name"], "text": prompt["text"], "ids_llama_cpp": g["ids_special"], "ids_hf": hf_ids,
                       "ids_equal": g["ids_special"] == hf_ids, "ids_llama_cpp_parse_special_false": g["ids"],
                       "hf_add_special_tokens_true_adds_nothing": source_tok(prompt["text"])["input_ids"] == hf_ids,
                       "gguf_reader_tokenizer_equal":
                           back.tokenizer(prompt["text"], add_special_tokens=False)["input_ids"] == g["ids_special"]})
    runs = {}
    for setting in SETTINGS:
        ran = got["settings"][setting["name"]]
        prompts = [{"name": p["name"], **compare_prompt(g, model, hf_greedy[p["name"]], control)}
                   for p, g in zip(PROMPTS, ran["prompts"], strict=True)]
        diffs = [d for p in prompts for d in p.pop("_diffs")]
        controls = [d for p in prompts for d in p.pop("_control")]
        summary = {"greedy_equal": sum(p["greedy_equal"] for p in prompts), "prompts": len(prompts),
                   "logprobs_compared": len(diffs), "logprob_abs_diff_nats": _stats(diffs)}
        if controls:
            summary["control_abs_diff_nats"] = _stats(controls)
            summary["tolerance"] = f"median <= {CONTROL_FACTOR} x the control's median"
            summary["within_tolerance"] = statistics.median(diffs) <= CONTROL_FACTOR * statistics.median(controls)
            near = max(controls)  # HF's own rounding moves a token's log-probability by up to this much
        else:
            summary["tolerance"] = f"max <= {F32_TOLERANCE} nats"
            summary["within_tolerance"] = max(diffs) <= F32_TOLERANCE
            near = F32_TOLERANCE
        margins = [p["hf_margin_at_first_difference_nats"] for p in prompts]
        summary["greedy_equal_or_near_tie"] = sum(p["greedy_equal"] or (m is not None and m <= near)
                                                  for p, m in zip(prompts, margins, strict=True))
        if setting is not SETTINGS[0]:  # what a user's llama.cpp gives, shown; the tolerance is checked on `exact`
            summary = {k: v for k, v in summary.items() if k not in ("tolerance", "within_tolerance")}
        runs[setting["name"]] = {"llama_cpp_context": {k: v for k, v in ran.items() if k != "prompts"},
                                 "summary": summary, "prompts": prompts}
    exact = runs[SETTINGS[0]["name"]]["summary"]
    agrees = (all(t["ids_equal"] for t in tokens) and exact["within_tolerance"]
              and exact["greedy_equal_or_near_tie"] == exact["prompts"])
    return {**row, "metadata": got["metadata"], "tokens": tokens, "runs": runs, "agrees": agrees}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", help=f"folder holding node_modules/node-llama-cpp (else ${PREFIX_ENV})")
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model or a local llama model directory")
    parser.add_argument("--types", default="f32,q8_0", help="GGUF types to write and check, comma-separated")
    parser.add_argument("--n-new", type=int, default=16, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and llama.cpp")
    parser.add_argument("--out", default=str(HERE / "gguf_llamacpp.json"))
    args = parser.parse_args(argv)
    problem = missing(args.prefix)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    prefix = node_llama_cpp_dir(args.prefix)

    import torch

    sys.path.insert(0, str(HERE))
    from scoring import machine

    from audit.data.models import load_tokenizer, resolve_model
    from audit.pipeline.release.gguf_file import check_qtype, write_gguf

    torch.set_num_threads(args.threads)
    types = [check_qtype(t) for t in args.types.split(",") if t.strip()]
    resolved = resolve_model(args.model, progress=False)
    source_tok = load_tokenizer(resolved.path)
    stop = {i for i, t in source_tok.added_tokens_decoder.items() if t.special}
    with tempfile.TemporaryDirectory(prefix="gguf-llamacpp-") as tmp:
        work = Path(tmp)
        infos = {t: write_gguf(resolved.path, source_tok, work / f"model.{t}.gguf", t) for t in types}
        result = run_node(prefix, [{"label": t, "path": str(i.path)} for t, i in infos.items()],
                          n_new=args.n_new, threads=args.threads, work=work)
        files = [check_file(t, infos[t], got, source_tok, args.n_new, stop)
                 for t, got in zip(types, result["files"], strict=True)]
    out = {
        "command": "python benchmarks/gguf_llamacpp.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "model": {"source": args.model, "name": resolved.provenance.get("name", args.model)},
        "node_llama_cpp": result["node_llama_cpp"], "node": result["node"], "llama_cpp": result["llama_cpp"],
        "llama_cpp_source_commit": llama_cpp_source_commit(prefix), "llama_cpp_build": result["build_type"],
        "llama_cpp_system_info": result["system_info"], "n_new": args.n_new, "threads": args.threads,
        "all_agree": all(f["agrees"] for f in files), "files": files,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for f in files:
        if not f["loaded"]:
            print(f"{f['type']}: llama.cpp refused the file: {f['error']}")
            continue
        ids = sum(t["ids_equal"] for t in f["tokens"])
        for name, run in f["runs"].items():
            s = run["summary"]
            control = f", control median {s['control_abs_diff_nats']['median']}" if "control_abs_diff_nats" in s else ""
            print(f"{f['type']} [{name}]: token ids equal {ids}/{len(f['tokens'])}, greedy equal {s['greedy_equal']}/"
                  f"{s['prompts']}, |dlogp| median {s['logprob_abs_diff_nats']['median']} max "
                  f"{s['logprob_abs_diff_nats']['max']} nats over {s['logprobs_compared']} tokens{control}")
    print(f"wrote {args.out}: {'all agree' if out['all_agree'] else 'DISAGREEMENT (see the JSON)'}")
    return 0 if out["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
