"""What is shipped, measured: the tuned weights, the merged model and GGUF files side by side on one audit.

    python benchmarks/release.py                                   # the default SmolLM2 audit + release: merged, q8_0, q4_0
    python benchmarks/release.py --recipe tiny/release_cpu         # the same on tiny-llama (a check that it works)
    python benchmarks/release.py --from-run runs/<run>             # summarize a run made with a release section

Runs ``audit run RECIPE release.merged=true release.gguf=[q8_0,q4_0]`` (the recipe's own release section when it has
one) and writes ``benchmarks/release.json``: the command, the machine with its load, and per format (tuned, then each
release) the exposure per tier (both scales), greedy extraction, bits of the secret and their drift from the tuned
model, file size and time. docs/release.md's table is generated from it (``python benchmarks/tables.py --write``).
Every number is read from the run's report.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chain import machine  # noqa: E402

DEFAULT_RECIPE = "smollm2/lora_cpu"
RELEASE_OVERRIDES = ["release.merged=true", "release.gguf=[q8_0,q4_0]"]


def summarize(run_dir: Path) -> dict:
    """Per format: the tier numbers the docs table shows, from ``report.json``."""
    from audit.report import read_report

    r = read_report(run_dir / "report.json")
    if r.release is None:
        raise SystemExit(f"{run_dir} has no release section: run it with {' '.join(RELEASE_OVERRIDES)}")
    m = r.flat_metrics()

    def tiers(label: str) -> dict:
        return {f"rep_{t.repetitions}": {
            "n": t.n, "exposure": t.exposure_mean.get(label),
            "exposure_space": m[f"exposure.space_mean/rep_{t.repetitions}/{label}"].value
            if f"exposure.space_mean/rep_{t.repetitions}/{label}" in m else None,
            "extracted": t.extracted.get(label),
            "bits": m[f"information.bits/rep_{t.repetitions}/{label}"].value
            if f"information.bits/rep_{t.repetitions}/{label}" in m else None} for t in r.tiers}

    formats = [{"label": "tuned", "kind": r.training.method, "quantization": r.training.weights_dtype or "fp32",
                "bytes": r.release.tuned_bytes,
                "seconds": round(r.timings_s.get("train", 0) + r.timings_s.get("score_tuned", 0), 1),
                "tiers": tiers("tuned")}]
    for row in r.release.releases:
        t = tiers(row.label)
        for tier in row.tiers:
            t[f"rep_{tier.repetitions}"].update(bits_drift=tier.bits_drift, rank_changes=tier.rank_changes)
        formats.append({"label": row.label, "kind": row.kind, "quantization": row.quantization, "bytes": row.bytes,
                        "seconds": row.seconds, "fingerprint": row.fingerprint, "tiers": t})
    return {"run": run_dir.name, "recipe": r.recipe["name"], "model": r.model.source, "total_s": r.timings_s.get("total"),
            "formats": formats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--from-run", default=None, metavar="RUN_DIR")
    parser.add_argument("--out", default=str(HERE / "release.json"))
    args = parser.parse_args()
    info = machine()
    if args.from_run:
        command, run_dir = None, Path(args.from_run)
    else:
        from audit.core.config import load_recipe

        overrides = [] if load_recipe(args.recipe).release else RELEASE_OVERRIDES
        command = ["audit", "run", args.recipe, *overrides, "--no-tracking", "--quiet", "--no-fail-on-gates"]
        started = time.time()
        done = subprocess.run(command)
        if done.returncode != 0:
            return done.returncode
        run_dir = max((p for p in Path("runs").iterdir() if p.stat().st_mtime >= started - 1), key=lambda p: p.stat().st_mtime)
    result = {"command": " ".join(command) if command else f"summarized from {run_dir}", "machine": info, **summarize(run_dir)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
