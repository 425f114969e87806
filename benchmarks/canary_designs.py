"""Canary designs side by side on one budget: TPR at 1% FPR and the one-run eps lower bounds per design and method.

    python benchmarks/canary_designs.py                                      # 10 SmolLM2 audits, one at a time (~2 h on 2 cores)
    python benchmarks/canary_designs.py --from-runs lora:digits:RUN_DIR ...  # rows from finished run directories
    python benchmarks/canary_designs.py --markdown benchmarks/canary_designs.json   # the table in docs/metrics.md

Every row is ``audit run smollm2/lora_cpu canaries.spec=DESIGN`` (the default audit: 8 canaries at each of 1/4/16
copies and 100 never-inserted references, 120 notes records, 72 steps), and for ``full`` the same with
``training.method=full training.learning_rate=5e-5``: the designs differ only in how the secret is made (Panda et
al. 2025: ``rare_tokens``, ``bigram``, ``new_tokens``; ``digits`` the Secret Sharer's; ``dp_digits`` digits spelled
apart). Every number is read from the run's report.json: TPR at 1% FPR of the loss-vs-base attack over all 24
members and over the 8 single-copy ones (Clopper-Pearson 95%), its AUC, EZ-MIA's TPR, the tiers' tuned exposure,
and ``privacy.eps_lb/<method>`` (p = 0.05, delta 1e-5) from the same guesses.
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
RECIPE = "smollm2/lora_cpu"
DESIGNS = ("digits", "dp_digits", "rare_tokens", "bigram", "new_tokens")
METHODS = {"lora": [], "full": ["training.method=full", "training.learning_rate=5.0e-5"]}
BOUNDS = ("steinke", "steinke_best_k", "xiang_gdp_best_k", "mahloujifar_fdp_best_k")


def _rate(m: dict, key: str) -> dict | None:
    x = m.get(key)
    return None if x is None else {"value": round(x["value"], 4), "n": x["n"], "low": round(x["low"], 4),
                                   "high": round(x["high"], 4)}


def design_row(report: dict, *, design: str, method: str) -> dict:
    """One table row from a run's ``report.json`` (a dict)."""
    m = report["metrics"]
    tiers = {t["repetitions"]: t for t in report["tiers"]}
    row = {"design": design, "method": method, "run_id": report["run_id"], "git_revision": report.get("git_revision"),
           "space_bits": report["space_bits"],
           "members": sum(t["n"] for r, t in tiers.items() if r > 0), "references": tiers[0]["n"],
           "tpr_at_1pct/loss_diff": _rate(m, "mia.tpr_at_1pct/loss_diff"),
           "tpr_at_1pct/loss_diff/rep_1": _rate(m, "mia.tpr_at_1pct/loss_diff/rep_1"),
           "tpr_at_1pct/ez_mia": _rate(m, "mia.tpr_at_1pct/ez_mia"),
           "tpr_at_1pct/min_k_pp_diff": _rate(m, "mia.tpr_at_1pct/min_k_pp_diff"),
           "auc/loss_diff": round(m["mia.auc/loss_diff"]["value"], 4),
           "exposure_tuned": {str(r): round(t["exposure_mean"]["tuned"], 3) for r, t in sorted(tiers.items())},
           "guesses": int(m["privacy.guesses"]["value"]), "correct": int(m["privacy.correct"]["value"]),
           "trainable_params": report["training"]["trainable_params"], "steps": report["training"]["steps"],
           "train_s": report["training"]["wall_s"], "total_s": report["timings_s"].get("total")}
    for b in BOUNDS:
        key = f"privacy.eps_lb/{b}"
        row[f"eps_lb/{b}"] = round(m[key]["value"], 4) if key in m else None
    return row


def _pct(rate: dict | None) -> str:
    if rate is None:
        return "n/a"
    return f"{100 * rate['value']:.0f}% [{100 * rate['low']:.0f}, {100 * rate['high']:.0f}] (n={rate['n']})"


def markdown_table(result: dict) -> str:
    """The docs table (docs/metrics.md, via benchmarks/tables.py) from a ``canary_designs.json``."""
    head = ["method", "design", "TPR@1%FPR loss_diff, all members", "TPR@1%FPR loss_diff, 1x", "AUC loss_diff",
            "TPR@1%FPR EZ-MIA", "exposure tuned 0x/1x/4x/16x", *[f"eps_lb {b}" for b in BOUNDS], "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        e = r["exposure_tuned"]
        cells = [r["method"], r["design"], _pct(r["tpr_at_1pct/loss_diff"]), _pct(r["tpr_at_1pct/loss_diff/rep_1"]),
                 f"{r['auc/loss_diff']:.2f}", _pct(r["tpr_at_1pct/ez_mia"]),
                 "/".join(f"{e[k]:.2f}" for k in ("0", "1", "4", "16")),
                 *["n/a" if r[f"eps_lb/{b}"] is None else f"{r[f'eps_lb/{b}']:.2f}" for b in BOUNDS],
                 f"{r['trainable_params']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", metavar="JSON", help="print the docs table of an existing result and exit")
    parser.add_argument("--from-runs", nargs="+", metavar="METHOD:DESIGN:RUN_DIR",
                        help="build the rows from finished run directories instead of running the audits")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=str(HERE / "canary_designs.json"))
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text(encoding="utf-8"))))
        return 0
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
            "note": "2-core VM; the audits ran one at a time, other work alongside, so wall times are not benchmarks"}
    rows = []
    start = time.perf_counter()
    if args.from_runs:
        for item in args.from_runs:
            method, design, run_dir = item.split(":", 2)
            report = json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
            rows.append(design_row(report, design=design, method=method))
        command = "audit run smollm2/lora_cpu canaries.spec=DESIGN [training.method=full training.learning_rate=5.0e-5] " \
                  "(one at a time, test key), then python benchmarks/canary_designs.py --from-runs ..."
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from audit.core.config import load_recipe
        from audit.pipeline import run_audit

        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods:
                for design in args.designs:
                    recipe = load_recipe(RECIPE, [f"canaries.spec={design}", *METHODS[method], f"output.root={tmp}"])
                    result = run_audit(recipe, tracking=False, progress=False)
                    row = design_row(json.loads(result.report.model_dump_json()), design=design, method=method)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
        command = f"python benchmarks/canary_designs.py --designs {' '.join(args.designs)} --methods {' '.join(args.methods)}"
    out = {"command": command, "recipe": RECIPE, "machine": info, "wall_s": round(time.perf_counter() - start, 1),
           "p_value": 0.05, "bounds": list(BOUNDS), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(markdown_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
