"""Benchmark: wall time of the default audit (recipes/smollm2/lora_cpu.yaml), total and per stage, from finished runs.

    cd $(mktemp -d) && audit run && audit run           # twice, warm model cache (the first run of a machine adds ~40 s)
    python /path/to/benchmarks/default_audit.py runs/smollm2-lora-cpu-*  # writes benchmarks/default_audit.json

Reads each run's ``report.json`` (``timings_s``: the stage times also logged to MLflow as ``time.<stage>_s``) and
records the median over the runs, every run's own figures, the sample sizes the run scored (canaries ranked per
model: the cost driver), and the machine with its load average now (the 2 cores are shared; a run's own load is
in ``load_average`` when given with ``--load``). Nothing is estimated: a stage missing from a run is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_figures(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    scores = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines() if line.strip()]
    ranked = {m: sum(1 for s in scores if s["model"] == m and s.get("rank") is not None) for m in {s["model"] for s in scores}}
    walks = {m: sum(1 for s in scores if s["model"] == m and s.get("exact_status") == "exact") for m in ranked}
    return {"run": run_dir.name, "timings_s": report["timings_s"], "training_steps": report["training"]["steps"],
            "canaries": {"members": report["canaries"]["members"], "references": report["canaries"]["references"],
                         "ranked_per_model": ranked, "exact_walks_finished_per_model": walks,
                         "exposure_references": report["canaries"]["exposure_references"]}}


def main() -> None:
    from scoring import machine  # benchmarks/scoring.py: the same machine description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of `audit run` (smollm2/lora_cpu)")
    ap.add_argument("--load", nargs="*", type=float, default=None, help="1-minute load averages seen during the runs")
    ap.add_argument("--note", default="", help="how the runs were made (idle machine, other jobs, ...)")
    ap.add_argument("--out", type=Path, default=HERE / "default_audit.json")
    args = ap.parse_args()
    runs = [run_figures(r) for r in args.runs]
    stages = sorted({k for r in runs for k in r["timings_s"]})
    median = {k: round(statistics.median(r["timings_s"][k] for r in runs if k in r["timings_s"]), 1) for k in stages}
    out = {"benchmark": "default_audit", "recipe": "smollm2/lora_cpu",
           "command": "audit run  (twice, warm model cache); python benchmarks/default_audit.py RUN_DIR RUN_DIR",
           "machine": {**machine(), "load_average_at_write": [round(x, 2) for x in os.getloadavg()]},
           "load_average_during_runs": args.load, "note": args.note,
           "median_s": median, "runs": runs}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"median_s": median}, indent=1))


if __name__ == "__main__":
    main()
