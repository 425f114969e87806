"""Benchmark: the whole-works audit of `tiny/works_cpu` at seed 0, its wall time and the numbers docs/works.md quotes.

    HF_HUB_OFFLINE=1 python benchmarks/works_tiny.py                  # runs the audit in a temp dir (minutes)
    python benchmarks/works_tiny.py --run-dir RUN_DIR                  # or reads a finished run of the same command
    python benchmarks/works_tiny.py --recipe smollm2/works_cpu         # the same on SmolLM2 -> works_smollm2.json
    # -> benchmarks/works_tiny.json; then `python benchmarks/tables.py --write` regenerates the doc's table

Runs ``audit run tiny/works_cpu --no-tracking`` under the test key (``CANARY_AUDIT_KEY`` = "5a" x 32, so the works
drawn and their roles are the ones the doc shows) and keeps from the run's ``report.json``: ``report.whole_works``
(per work, its numbers under base and tuned; base numbers of secret works stay withheld, as in the shared report),
every ``works.*`` metric, and the stage times. Wall time on the shared 2-core machine measures its contention too,
so the machine and its ``uptime`` load averages before, during (sampled every 10 s) and after go with it. Nothing is
estimated: a number the report does not hold is not written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = "tiny/works_cpu"
TEST_KEY = "5a" * 32


def command(recipe: str) -> str:
    return f'CANARY_AUDIT_KEY=5a5a...5a ("5a" x 32) audit run {recipe} --no-tracking  (seed 0: the recipe\'s)'


def default_out(recipe: str) -> Path:
    """``works_tiny.json`` for ``tiny/works_cpu``, ``works_smollm2.json`` for ``smollm2/works_cpu``."""
    return HERE / f"works_{recipe.split('/')[0]}.json"


def uptime() -> str:
    """The ``uptime`` line (load averages over 1, 5 and 15 minutes)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def audit_executable() -> str:
    """The ``audit`` entry point next to this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "audit"
    return str(beside) if beside.exists() else (shutil.which("audit") or "audit")


def run_audit(workdir: Path, recipe: str) -> dict:
    """Run the audit in ``workdir``; its run directory, wall time and load averages (1-minute, every 10 s)."""
    env = {**os.environ, "CANARY_AUDIT_KEY": TEST_KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(10):
            samples.append(round(os.getloadavg()[0], 2))

    before = uptime()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run([audit_executable(), "run", recipe, "--no-tracking"], cwd=workdir, env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    done.set()
    after = uptime()
    reports = sorted(workdir.glob("runs/*/report.json"))
    if not reports:
        sys.exit(f"audit run wrote no report.json (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return {"run_dir": reports[-1].parent, "exit_code": proc.returncode, "wall_s": round(wall, 1),
            "uptime_before": before, "uptime_after": after,
            "load_1min_during": {"n": len(samples), "min": min(samples, default=None), "max": max(samples, default=None),
                                 "samples": samples}}


def work_rows(whole: dict) -> list[dict]:
    """Per work: provenance, role and each model's numbers (None where the report withholds a base number)."""
    rows = []
    for w in whole["works"]:
        base, tuned = w["models"].get("base"), w["models"]["tuned"]
        rows.append({"title": w["title"], "kind": w["kind"], "role": w["role"], "copies": w["copies"],
                     "n_tokens": w["n_tokens"], "windows": w["windows"],
                     "bits_per_byte": {"base": base and round(base["bits_per_byte"], 4),
                                       "tuned": round(tuned["bits_per_byte"], 4)},
                     "stored_bits": None if w["stored_bits"] is None else round(w["stored_bits"], 1),
                     "extractable_share": {"base": base and round(base["extractable_share"], 4),
                                           "tuned": round(tuned["extractable_share"], 4)},
                     "greedy_share": round(tuned["greedy_share"], 4),
                     "longest_greedy_run": tuned["longest_greedy_run"]})
    return rows


def figures(run_dir: Path) -> dict:
    """What the doc quotes, read from the run's report.json."""
    report = json.loads((run_dir / "report.json").read_text())
    whole = report["whole_works"]
    return {"run": run_dir.name, "seed": report.get("seed", report.get("recipe", {}).get("seed")),
            "timings_s": report["timings_s"],
            "whole_works": {"prefix_tokens": whole["prefix_tokens"], "suffix_tokens": whole["suffix_tokens"],
                            "stride": whole["stride"], "n_queries": whole["n_queries"], "p": whole["p"],
                            "trainable_params": whole["trainable_params"],
                            "stored_bits_member_total": whole["stored_bits_member_total"],
                            "stored_bits_held_out_total": whole["stored_bits_held_out_total"],
                            "stored_bits_per_param": whole["stored_bits_per_param"],
                            "morris_bits_per_param": whole["morris_bits_per_param"],
                            "works": work_rows(whole)},
            "metrics": {k: v for k, v in sorted(report["metrics"].items()) if k.startswith("works.")},
            "withheld": sorted(k for k in report.get("disclosure", {}).get("withheld", []) if k.startswith("works."))}


def main() -> None:
    from scoring import machine  # benchmarks/scoring.py: the same machine description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, help="read this finished run of the same command instead of running it")
    ap.add_argument("--note", default="", help="how the run was made (other jobs on the machine, ...)")
    ap.add_argument("--recipe", default=RECIPE, help="a recipe with a works section (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/works_<model>.json")
    args = ap.parse_args()
    args.out = args.out or default_out(args.recipe)
    if args.run_dir is not None:
        run = {"run_dir": args.run_dir, "wall_s": None, "uptime_before": None, "uptime_after": None,
               "note": "read from an existing run directory: wall time is the report's timings_s.total"}
        out_run = {k: v for k, v in run.items() if k != "run_dir"}
        found = figures(args.run_dir)
    else:
        # kept, not deleted: a run of minutes can be read again with --run-dir
        run = run_audit(Path(tempfile.mkdtemp(prefix="works-")), args.recipe)
        print(f"run directory: {run['run_dir']}", file=sys.stderr)
        found = figures(run["run_dir"])
        out_run = {k: v for k, v in run.items() if k != "run_dir"}
    out = {"benchmark": args.out.stem, "recipe": args.recipe, "command": command(args.recipe),
           "machine": {**machine(), "load_average_at_write": [round(x, 2) for x in os.getloadavg()]},
           "note": args.note, **out_run, **found}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("wall_s", "uptime_before", "uptime_after")} | {"totals": {
        k: v for k, v in out["whole_works"].items() if k.startswith("stored") or k == "trainable_params"}}, indent=1))


if __name__ == "__main__":
    main()
