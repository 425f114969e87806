"""What a memorization curve costs: the same audit with and without a curve point every quarter of training.

    python benchmarks/curves.py                                  # tiny/lora_cpu (~1 min idle, 2 CPU cores)
    python benchmarks/curves.py --recipe smollm2/lora_cpu        # the default SmolLM2 LoRA audit (~10+ min)

Runs ``audit run RECIPE`` once without a curve (``scoring.every_steps=0``, the default), reads its step count, then
once with ``scoring.every_steps=ceil(steps/4)`` (live points at 1/4, 2/4, 3/4; the 4th point is the final audit
itself). The tiny entry in curves.json was measured with ``steps // 4`` = 52 (four live points at 52..208, then 210). The
extra time is the difference of the train stages (each point scores every canary on the live model, base scores
reused) and of the totals. Updates this recipe's entry in ``benchmarks/curves.json`` with the machine, its load, the
commands, both runs' timings and the curve of the top tier; every number is read from the runs' report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "curves.json"


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg()),
            "note": "shared VM: wall times include the contention the load average shows"}


def audit_run(recipe: str, overrides: list[str], work: Path) -> Path:
    """``audit run`` in ``work`` (its runs/ and mlflow.db); the run directory it made."""
    before = set((work / "runs").iterdir()) if (work / "runs").is_dir() else set()
    cmd = [str(Path(sys.executable).with_name("audit")), "run", recipe, *overrides, "--no-fail-on-gates"]
    subprocess.run(cmd, cwd=work, check=True)
    [run_dir] = set((work / "runs").iterdir()) - before
    return run_dir


def mlflow_history(run_dir: Path, keys: list[str]) -> dict:
    """How many step points MLflow holds for each curve key of this run (its run id from report.json)."""
    import mlflow

    report = json.loads((run_dir / "report.json").read_text())
    tracking = report.get("tracking") or {}
    if not tracking.get("run_id"):
        return {}
    client = mlflow.MlflowClient(tracking_uri=tracking["uri"])
    return {k: [[m.step, m.value] for m in sorted(client.get_metric_history(tracking["run_id"], k), key=lambda m: m.step)]
            for k in keys}


def summary(run_dir: Path) -> dict:
    from audit.report import read_report

    r = read_report(run_dir / "report.json")
    top = max(t.repetitions for t in r.tiers)
    key = f"exposure.mean/rep_{top}/tuned"
    return {"run": run_dir.name, "steps": r.training.steps, "every_steps": r.recipe["scoring"].get("every_steps", 0),
            "timings_s": r.timings_s, "final": {key: r.flat_metrics()[key].value},
            "curve_points": {k: len(v) for k, v in sorted(r.curves.items())
                             if k.startswith(("exposure.mean/", "mia.auc/loss_diff"))},
            "curve": {key: r.curves.get(key, [])},
            "mlflow_step_points": mlflow_history(run_dir, sorted(k for k in r.curves if k.startswith("exposure.mean/")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny/lora_cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", type=Path, help="a folder to run in and keep (runs/, mlflow.db) instead of a temporary one")
    parser.add_argument("--plain", type=Path, help="a finished run directory of RECIPE without a curve (same machine, "
                        "e.g. one of benchmarks/default_audit.json's runs) to compare with, instead of running it again")
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="curves-bench-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        plain = summary(args.plain.resolve() if args.plain else audit_run(args.recipe, [], work))
        every = max(1, -(-plain["steps"] // 4))  # ceil: live points at 1/4, 2/4, 3/4, the final audit the 4th
        curved = summary(audit_run(args.recipe, [f"scoring.every_steps={every}"], work))
    extra_train = curved["timings_s"]["train"] - plain["timings_s"]["train"]
    points = max(curved["curve_points"].values(), default=1) - 1  # the last point is the final audit
    entry = {
        "machine": info,
        "commands": [f"audit run {args.recipe}", f"audit run {args.recipe} scoring.every_steps={every}"],
        "without_curve": plain, "with_curve": curved,
        "live_points": points,
        "extra_train_s": round(extra_train, 3),
        "extra_train_s_per_point": round(extra_train / points, 3) if points else None,
        "extra_total_s": round(curved["timings_s"]["total"] - plain["timings_s"]["total"], 3),
        "score_tuned_s": plain["timings_s"].get("score_tuned"),
        "note": "a point costs about one tuned scoring pass (score_tuned_s); on a loaded machine the timing noise between "
                "the two runs is of the same size (compare score_tuned_s of both)",
    }
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "curves", "recipes": {}}
    data["recipes"][args.recipe] = entry
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({k: entry[k] for k in ("live_points", "extra_train_s", "extra_train_s_per_point", "extra_total_s",
                                            "score_tuned_s")}, indent=2))


if __name__ == "__main__":
    main()
