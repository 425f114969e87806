"""Soundness of the one-run eps lower bounds on DP-SGD runs: tiny-llama over seeds x eps.

    python benchmarks/dp_soundness.py                              # tiny/dp_lora_cpu, 9 audits in this process (~5 min)
    python benchmarks/dp_soundness.py --recipe tiny/dp_new_tokens_cpu --seeds 0 1 2 --eps 4 8 --control \
        --out benchmarks/dp_soundness_new_tokens.json                # Panda et al.'s design, and a non-DP control per seed
    python benchmarks/dp_soundness.py --recipe smollm2/dp_lora_cpu --seeds 0 --eps 4    # one SmolLM2 row (the lead's)
    python benchmarks/dp_soundness.py --markdown benchmarks/dp_soundness.json          # the README table

Each row is one ``audit run RECIPE seed=S training.dp.epsilon=E`` (tracking off, runs under a temporary folder):
the accountant's eps (Opacus PRV, at the recipe's delta, for the steps taken), every ``privacy.eps_lb/<method>`` the
report holds (computed at the same delta, p = 0.05), and tightness = eps_lb / eps_accountant. A sound audit never has
tightness above 1. ``--control`` adds, per seed, the same audit with ``training.dp=null``: the same canaries and
records trained without DP, whose bounds show what the canaries can reveal at all (no accountant, no tightness).
Writes the JSON with the machine, its load (``uptime`` before and after), the package versions, the command and the
rows; every number is read from the runs' report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = {"panda_2025": "Panda et al. 2025 (ICLR), new-token canaries with the loss on the secret span: eps lower "
                           "bound about 1 for a model trained at eps 4, tightness about 0.25 (1000 canaries, LLM "
                           "fine-tuning; the figure audit.metrics.privacy.AccountantComparison cites)",
             "not_run_here": "SmolLM2 (smollm2/dp_lora_cpu) with this design: SmolLM2 audits are not run on the "
                             "shared 2-core machine; benchmarks/dp_soundness_smollm2.json holds its dp_digits rows"}
METHODS = ("steinke", "steinke_best_k", "xiang_eps_delta", "xiang_gdp", "xiang_gdp_best_k", "mahloujifar_fdp",
           "mahloujifar_fdp_best_k")


def soundness_row(report, *, seed: int, eps: float | None) -> dict:
    """One table row from an :class:`audit.core.schema.AuditReport` of a DP run (``eps`` None: a non-DP control)."""
    m = report.metrics
    acc = m["privacy.eps_accountant"].value if "privacy.eps_accountant" in m else None
    dp = report.training.dp
    row = {"seed": seed, "eps_target": eps, "eps_accountant": None if acc is None else round(acc, 4),
           "canaries": m["privacy.eps_lb"].n, "members": sum(t.n for t in report.tiers if t.repetitions > 0),
           "guesses": int(m["privacy.guesses"].value), "correct": int(m["privacy.correct"].value),
           "mia_auc_loss_diff": round(m["mia.auc/loss_diff"].value, 4) if "mia.auc/loss_diff" in m else None,
           "steps": report.training.steps, "noise_multiplier": None if dp is None else round(dp.noise_multiplier, 4),
           "sample_rate": None if dp is None else round(dp.sample_rate, 6), "records": None if dp is None else dp.records,
           "train_s": report.training.wall_s}
    for method in METHODS:
        key = f"privacy.eps_lb/{method}"
        row[f"eps_lb/{method}"] = round(m[key].value, 4) if key in m else None
        row[f"tightness/{method}"] = round(m[key].value / acc, 4) if key in m and acc else None
    row["sound"] = None if acc is None else all(row[f"eps_lb/{k}"] is None or row[f"eps_lb/{k}"] <= acc for k in METHODS)
    return row


def markdown_table(result: dict) -> str:
    """The README table from a ``dp_soundness.json``: one row per run, each bound with its tightness."""
    head = ["seed", "eps target", "eps_accountant", "members/canaries", "correct/guesses", "AUC loss_diff",
            *[f"eps_lb {k} (tightness)" for k in METHODS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        control = r["eps_accountant"] is None
        cells = [str(r["seed"]), "none (no DP)" if control else f"{r['eps_target']:g}",
                 "-" if control else f"{r['eps_accountant']:.3f}", f"{r['members']}/{r['canaries']}",
                 f"{r['correct']}/{r['guesses']}", "" if r["mia_auc_loss_diff"] is None else f"{r['mia_auc_loss_diff']:.2f}"]
        cells += ["n/a" if r[f"eps_lb/{k}"] is None else f"{r[f'eps_lb/{k}']:.3f}" if control
                  else f"{r[f'eps_lb/{k}']:.3f} ({r[f'tightness/{k}']:.2f})" for k in METHODS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _uptime() -> str:
    """``uptime`` as printed (the load the other jobs on a shared machine put on it)."""
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", metavar="JSON", help="print the README table of an existing result and exit")
    parser.add_argument("--recipe", default="tiny/dp_lora_cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eps", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--control", action="store_true", help="per seed, the same audit without DP (training.dp=null)")
    parser.add_argument("--out", default=str(HERE / "dp_soundness.json"))
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text(encoding="utf-8"))))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from importlib.metadata import version

    from audit.core.config import load_recipe
    from audit.pipeline import run_audit
    from audit.train.dp import NOISE_NORMALIZATION

    key = os.environ.get("CANARY_AUDIT_KEY", "")
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "packages": {p: version(p) for p in ("torch", "opacus", "peft", "transformers", "trl")},
            "uptime_at_start": _uptime(), "load_average_at_start": list(os.getloadavg()),
            "note": "2-core VM shared with other engineers' jobs; wall times include that contention",
            "key": "CANARY_AUDIT_KEY=5a*32 (the test key)" if key == "5a" * 32 else "another audit key"}
    runs = [(seed, eps) for eps in args.eps for seed in args.seeds] + [(seed, None) for seed in args.seeds if args.control]
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed, eps in runs:
            dp = f"training.dp.epsilon={eps:g}" if eps is not None else "training.dp=null"
            recipe = load_recipe(args.recipe, [f"seed={seed}", dp, f"output.root={tmp}"])
            t = time.perf_counter()
            result = run_audit(recipe, tracking=False, progress=False)
            row = {**soundness_row(result.report, seed=seed, eps=eps), "wall_s": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    info.update(uptime_at_end=_uptime(), load_average_at_end=list(os.getloadavg()))
    dp_rows = [r for r in rows if r["eps_accountant"] is not None]
    command = (f"python benchmarks/dp_soundness.py --recipe {args.recipe} --seeds {' '.join(map(str, args.seeds))} "
               f"--eps {' '.join(f'{e:g}' for e in args.eps)}" + (" --control" if args.control else ""))
    if Path(args.out).resolve() != HERE / "dp_soundness.json":
        command += f" --out {os.path.relpath(Path(args.out).resolve(), HERE.parent)}"
    out = {"command": command,
           "machine": info, "wall_s": round(time.perf_counter() - start, 1), "p_value": 0.05,
           "methods": list(METHODS), "noise_normalization": NOISE_NORMALIZATION, **REFERENCE,
           "all_sound": all(r["sound"] for r in dp_rows),
           "max_tightness": max(((r[f"tightness/{k}"] or 0.0) for r in dp_rows for k in METHODS), default=0.0), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"{len(rows)} runs, all sound: {out['all_sound']}, max tightness {out['max_tightness']:.3f} -> {args.out}")
    return 0 if out["all_sound"] else 1


if __name__ == "__main__":
    sys.exit(main())
