"""The default chain's persistence, and the shipped comparison: LoRA vs full fine-tuning of SmolLM2 on this CPU.

    python benchmarks/chain.py    # runs `audit chain`, `audit run smollm2/quick_cpu`, `audit run smollm2/full_cpu`, in turn
    python benchmarks/chain.py --from-runs LORA_RUN CLEAN_RUN QUICK_RUN FULL_RUN   # summarize runs made by those commands
    python benchmarks/chain.py --from-runs LORA_RUN CLEAN_RUN --comparison-from OLD.json   # the comparison kept, dated

The LoRA-vs-full comparison is `smollm2/quick_cpu` against `smollm2/full_cpu`: the same corpus, canaries and epochs,
only the method differs (the default `smollm2/lora_cpu` plants 124 canaries in another corpus size).

Writes ``benchmarks/chain.json``: the machine (with its load average: the 2 cores are shared), the commands, and per
run the numbers docs/chain.md shows (exposure by tier, extraction, MIA AUC, epsilon lower bound, final loss, wall time),
plus the persistence of the LoRA run's canaries through the further clean tune. Every number is read from the runs'
report.json; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = ["audit chain", "audit run smollm2/quick_cpu", "audit run smollm2/full_cpu"]


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg()),
            "note": "2-core VM shared with other jobs; wall times are wall clock and include that contention"}


def run_summary(run_dir: Path) -> dict:
    from audit.report import read_report

    r = read_report(run_dir / "report.json")
    m = {k: v.value for k, v in r.metrics.items()}
    tiers = {t.repetitions: t for t in r.tiers}
    return {
        "run": run_dir.name, "recipe": r.recipe["name"], "method": r.training.method,
        "trainable_params": r.training.trainable_params, "steps": r.training.steps,
        "final_train_loss": r.training.final_loss, "train_s": r.training.wall_s, "total_s": r.timings_s.get("total"),
        "exposure_sampled_tuned": {f"rep_{k}": t.exposure_mean.get("tuned") for k, t in sorted(tiers.items())},
        "exposure_space_tuned": {f"rep_{k}": m.get(f"exposure.space_mean/rep_{k}/tuned") for k in sorted(tiers)},
        "extracted_greedy_tuned": {f"rep_{k}": f"{t.extracted.get('tuned')}/{t.n}" for k, t in sorted(tiers.items())},
        "mia_auc_loss_diff": m.get("mia.auc/loss_diff"), "privacy_eps_lb": m.get("privacy.eps_lb"),
        # every attack's AUC per tier (members of the tier vs all references), and the attacks the report flags as
        # inverted (``mia.inverted/<attack>`` notes: far below 0.5 where another attack separates)
        "mia_auc_by_tier": {attack: {f"rep_{k}": m.get(f"mia.auc/{attack}/rep_{k}") for k in sorted(tiers) if k}
                            for attack in ("loss_diff", "min_k_pp", "ez_mia", "ez_mia_secret", "zlib")},
        "mia_inverted": sorted(k.split("/", 1)[1] for k in r.metric_notes if k.startswith("mia.inverted/")),
        "outputs": None if r.outputs is None else {"statement": r.outputs.statement,
                                                    "samples_with_member_secret": r.outputs.samples_with_member_secret},
        "persistence": None if r.persistence is None else r.persistence.model_dump(mode="json"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-runs", nargs="+", metavar="RUN", default=None,
                        help="LORA_RUN CLEAN_RUN [QUICK_RUN FULL_RUN]: summarize finished runs instead of running")
    parser.add_argument("--comparison-from", default=None, metavar="JSON",
                        help="an earlier chain.json whose LoRA-vs-full runs are kept, marked dated, with its machine")
    parser.add_argument("--out", default=str(HERE / "chain.json"))
    parser.add_argument("--note", default="", help="how the runs were made (the load they shared the machine with, ...)")
    parser.add_argument("--load-during", nargs=2, type=float, metavar=("MIN", "MAX"), default=None,
                        help="the 1-minute load range `uptime` showed while the runs ran (for runs summarized later)")
    args = parser.parse_args()
    info = machine()
    if args.note:
        info["note"] += "; " + args.note
    if args.load_during:
        info["load_1min_during"] = {"min": args.load_during[0], "max": args.load_during[1], "how": "uptime, read by hand"}
    if args.from_runs:
        if len(args.from_runs) != (2 if args.comparison_from else 4):
            parser.error("--from-runs takes LORA_RUN CLEAN_RUN QUICK_RUN FULL_RUN (or the first two with --comparison-from)")
        lora, clean, *compared = (Path(p) for p in args.from_runs)
    else:
        audit = str(Path(sys.executable).parent / "audit")
        root = Path("runs")
        root.mkdir(exist_ok=True)
        runs = []
        for cmd in COMMANDS:
            before = set(root.iterdir())
            t = time.perf_counter()
            subprocess.run([audit, *cmd.split()[1:], "--quiet"], check=True)
            print(f"{cmd}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
            runs.append(sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime))
        (lora, clean), *compared = runs
    out = {"benchmark": "chain", "machine": info, "commands": COMMANDS,
           "lora": run_summary(lora), "clean_further_tune": run_summary(clean)}
    if args.comparison_from:  # runs of an earlier day, kept as they were measured, with that day's machine and load
        old = json.loads(Path(args.comparison_from).read_text())
        quick = old.get("quick", old["lora"])  # before this script ran quick_cpu, its LoRA run had quick_cpu's canaries
        out["comparison"] = {"dated": f"runs {quick['run']} and {old['full']['run']}, kept from an earlier chain.json",
                             "machine": old["machine"]}
        out |= {"quick": quick, "full": old["full"]}
    else:
        out |= {"quick": run_summary(compared[0]), "full": run_summary(compared[1])}
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
