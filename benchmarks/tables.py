"""The measured tables of README.md and docs/*.md, generated from the JSON in benchmarks/: nothing is typed by hand.

    python benchmarks/tables.py chain        # print one table (names: python benchmarks/tables.py --list)
    python benchmarks/tables.py --write      # rewrite every generated block in README.md and docs/*.md
    python benchmarks/tables.py --check      # exit 1 when a block differs from what its JSON gives

A generated block in a Markdown file names its sources and its generator, so a reader knows where each number
comes from and tests/test_docs.py can regenerate it and compare:

    <!-- table: benchmarks/chain.json via benchmarks/tables.py chain -->
    | ... the generated table ... |
    <!-- /table -->

After a new measurement: write the JSON (each ``benchmarks/<name>.py`` does), then ``--write``. Every generator
prints the load its JSON recorded beside the timings, because the machine so far is a shared 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling scripts own their own table formats

import canary_designs  # noqa: E402
import dp_soundness  # noqa: E402
import scale_memory  # noqa: E402

BLOCK = re.compile(r"<!-- table: (?P<sources>[^>]*?) via benchmarks/tables\.py (?P<name>\w+) -->\n(?P<body>.*?)<!-- /table -->",
                   re.S)
DESIGN_TIERS = ("1", "4", "16")


@dataclass(frozen=True)
class Table:
    """A generator and the JSON files (under benchmarks/) it reads, in the order it takes them."""

    sources: tuple[str, ...]
    make: Callable[..., str]


def _json(name: str) -> dict:
    return json.loads((HERE / name).read_text(encoding="utf-8"))


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list]) -> str:
    return "\n".join([_row(head), "|" + "---|" * len(head), *(_row(r) for r in rows)])


def _load(values) -> str:
    """A 1-minute load average as the JSON recorded it (two cores: about 2 means the audit's own threads)."""
    return "/".join(f"{v:.1f}" for v in values)


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:05.2f}"


def default_result(designs: dict, default: dict) -> str:
    """README's short result table: the default audit's tiers (the ``lora``/``digits`` row of canary_designs.json,
    which is one of default_audit.json's two runs) and its headline attack."""
    runs = {r["run"]: r for r in default["runs"]}
    (row,) = [r for r in designs["rows"] if r["method"] == "lora" and r["design"] == "digits" and r["run_id"] in runs]
    run = runs[row["run_id"]]
    canaries = run["canaries"]
    per_tier = canaries["members"] // len(DESIGN_TIERS)
    ranked_refs = canaries["ranked_per_model"]["tuned"] - canaries["members"]
    top = canaries["exposure_references"] + 1
    e = row["exposure_tuned"]
    rows = [["reference (never inserted)", f"{canaries['references']} ({ranked_refs} ranked)", f"{e['0']:.2f}"]]
    rows += [[f"{t}x inserted", per_tier, f"{e[t]:.2f}"] for t in DESIGN_TIERS]
    table = _table(["tier", "canaries", f"exposure, tuned model (bits; max log2 {top} = {math.log2(top):.2f})"], rows)
    tpr = row["tpr_at_1pct/loss_diff"]
    median = default["median_s"]["total"]
    return (f"{table}\n\nMembership inference (`loss_diff`, {row['members']} members against {row['references']} "
            f"references): AUC {row['auc/loss_diff']:.2f}, TPR at 1% FPR {canary_designs._pct(tpr)}. One-run epsilon lower "
            f"bound {row['eps_lb/steinke']:.2f} ({row['correct']}/{row['guesses']} guesses right). Run "
            f"`{row['run_id']}`; the default audit took {median:.0f} s (median of {len(default['runs'])} runs, 1-min load "
            f"{_load(default['load_average_during_runs'])} at their starts).\n")


def default_timing(default: dict) -> str:
    """Seconds per stage of each default audit run, their median, and the wall clock /usr/bin/time saw."""
    stages = list(default["median_s"])
    stages = [s for s in default["runs"][0]["timings_s"] if s in stages]
    rows = []
    for i, run in enumerate(default["runs"]):
        t = run["timings_s"]
        rows.append([f"`{run['run']}`", *[f"{t[s]:.1f}" for s in stages], _mmss(default["wall_clock_s"]["runs"][i]),
                     f"{default['load_average_during_runs'][i]:.2f}"])
    rows.append(["median", *[f"{default['median_s'][s]:.1f}" for s in stages], "", ""])
    head = ["run", *[s.replace("_", " ") for s in stages], "wall clock", "1-min load at start"]
    m = default["machine"]
    return _table(head, rows) + f"\n\n{m['cpus']}-core {m['cpu']}, torch {m['torch']}.\n"


def recipe_times(default: dict, chain: dict, dp: dict, dp_smollm2: dict) -> str:
    """Wall time per recipe, from whichever JSON measured that recipe; the run and its load beside it."""
    rows = [["`smollm2/lora_cpu`", f"{default['median_s']['total']:.0f} s (median of {len(default['runs'])} runs)",
             ", ".join(f"`{r['run']}`" for r in default["runs"]), _load(default["load_average_during_runs"]),
             "`benchmarks/default_audit.json`"]]
    compared = chain.get("comparison", {})
    for recipe, key in (("smollm2/clean_lora_cpu", "clean_further_tune"), ("smollm2/quick_cpu", "quick"),
                        ("smollm2/full_cpu", "full")):
        run, dated = chain[key], key != "clean_further_tune" and "dated" in compared
        during = chain["machine"].get("load_1min_during")
        load = (_load(compared["machine"]["load_average_at_start"][:1]) if dated
                else f"{during['min']:.0f}-{during['max']:.0f} during" if during
                else _load(chain["machine"]["load_average_at_start"][:1]))
        rows.append([f"`{recipe}`", f"{run['total_s']:.0f} s", f"`{run['run']}`" + (" (dated)" if dated else ""), load,
                     "`benchmarks/chain.json`"])
    rows.append(["`tiny/dp_lora_cpu`", f"{dp['wall_s'] / len(dp['rows']):.0f} s a run ({len(dp['rows'])} runs in "
                 f"{dp['wall_s']:.1f} s)", "`" + dp["command"] + "`", _load(dp["machine"]["load_average_at_start"][:1]),
                 "`benchmarks/dp_soundness.json`"])
    for r in dp_smollm2["rows"]:
        rows.append([f"`smollm2/dp_lora_cpu` at eps {r['eps_target']:g}", f"{r['timings_s']['total']:.0f} s "
                     f"(wall clock {r['wall_clock']})", f"`{r['run']}`", _load(dp_smollm2["machine"]["load_average_at_write"][:1])
                     + " (at write)", "`benchmarks/dp_soundness_smollm2.json`"])
    return _table(["recipe", "total", "run", "1-min load", "source"], rows) + "\n"


def _span(values, fmt: str) -> str:
    """``lo-hi`` of ``values`` as ``fmt`` shows them, or one value when both ends look the same."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def _teacher_forced_row(model: dict) -> list[str]:
    """One model's engine against its per-sequence loops (two loop variants), per thread count."""
    by = {(r["method"], r["threads"]): r for r in model["results"]}
    threads = sorted({t for _, t in by})
    loops = sorted({m for m, _ in by if m != "engine"})
    big = model["params"] > 10**7  # SmolLM2: tokens/s in units, and the share of the GEMM peak; tiny-llama: thousands
    rate, scale = ("{:.0f}", 1) if big else ("{:.1f}k", 1000)
    engine = " / ".join(rate.format(by["engine", t]["tokens_per_s"] / scale) for t in threads) + " tok/s"
    loop = " / ".join(_span([by[m, t]["tokens_per_s"] / scale for m in loops], rate) for t in threads) + " tok/s"
    if big:
        peak = [f"{100 * by['engine', t]['fraction_of_gemm_peak']:.0f}%" for t in threads]
        engine += ", " + " / ".join(peak) + " of GEMM peak"
        loop += ", " + " / ".join(_span([100 * by[m, t]["fraction_of_gemm_peak"] for m in loops], "{:.0f}%") for t in threads)
    speed = " / ".join(_span([model["speedup"][f"threads_{t}/engine_vs_{m}"] for m in loops], "{:g}x") for t in threads)
    lo, _, hi = model["length_min_median_max"]
    what = (f"teacher-forced scoring, {model['model']}, {model['sequences']} sentences ({lo}-{hi} tokens), "
            f"{' / '.join(map(str, threads))} threads")
    return [what, engine, loop, speed, _load(model["results"][0]["load_1min_before_after"][:1])]


def _workload_row(name: str, work: dict, machine: dict) -> list[str]:
    """Candidates per second after a shared prefix: the exposure ranking's own workload."""
    by = {(r["method"], r["threads"]): r for r in work["results"]}
    threads = sorted({t for _, t in by})
    what = (f"exposure workload: {work['canaries']} canaries x {work['candidates_per_canary']} secrets after a shared "
            f"prefix, {name}, {' / '.join(map(str, threads))} threads")
    return [what, " / ".join(f"{by['engine', t]['candidates_per_s']:g}" for t in threads) + " candidates/s",
            " / ".join(f"{by['loop', t]['candidates_per_s']:g}" for t in threads) + " candidates/s",
            " / ".join(f"{work['speedup'][f'threads_{t}/engine_vs_loop']:g}x" for t in threads),
            _load(machine["load_average_at_start"][:1])]


def scoring_table(scoring: dict, exposure: dict) -> str:
    """The engine against a per-sequence loop: teacher-forced scoring, the exposure workload, the exact walk."""
    rows = [_teacher_forced_row(model) for model in scoring["models"]]
    rows += [_workload_row(name, work, scoring["exposure_workload_machine"])
             for name, work in scoring["exposure_workload"].items()]
    walk, naive = exposure["pruned_walks"][0], exposure["naive"]
    kv, full = naive["kv_cached_prefix"]["extrapolated_10e6_s"], naive["full_sequence"]["extrapolated_10e6_s"]
    space = exposure["space"].replace("|", "&#124;")  # a pipe would end the table cell
    rows.append([f"exact exposure of a memorized 6-digit canary ({space}), {exposure['model']}",
                 f"{walk['wall_s']:.2f} s (pruned trie, {walk['rows_expanded']} rows)",
                 f"{kv:,.0f} s ({kv / 3600:.1f} h) enumerating with a KV cache, {full:,.0f} s whole sequences (extrapolated)",
                 f"{exposure['summary']['speedup_vs_naive_kv']:,.0f}x", _load(walk["load_1min_before_after"][:1])])
    m = scoring["machine"]
    return (_table(["what", "engine", "per-sequence loop", "speedup", "1-min load"], rows)
            + f"\n\n{m['cpus']}-core {m['cpu']} (AVX2 {m['avx2']}, AVX-512 {m['avx512']}), torch {m['torch']}, fp32.\n")


def curve_smollm2(curves: dict) -> str:
    """The default audit's tuned exposure per tier at each live point, as MLflow logged it."""
    points = curves["recipes"]["smollm2/lora_cpu"]["with_curve"]["mlflow_step_points"]
    steps = [s for s, _ in points["exposure.mean/rep_16/tuned"]]
    head = ["tier", *[str(s) for s in steps[:-1]], f"{steps[-1]} (final)"]
    names = {"16": "16x inserted", "4": "4x inserted", "1": "1x inserted", "0": "references"}
    rows = [[label, *[f"{v:.2f}" for _, v in points[f"exposure.mean/rep_{r}/tuned"]]] for r, label in names.items()]
    run = curves["recipes"]["smollm2/lora_cpu"]["with_curve"]["run"]
    return _table(head, rows) + f"\n\nRun `{run}` (`benchmarks/curves.json`, `mlflow_step_points`).\n"


def curve_cost(curves: dict) -> str:
    """Train and total time without and with the live points, per point, against one tuned scoring pass."""
    rows = []
    for recipe in ("tiny/lora_cpu", "smollm2/lora_cpu"):
        r = curves["recipes"][recipe]
        plain, curve = r["without_curve"]["timings_s"], r["with_curve"]["timings_s"]
        rows.append([f"`{recipe}`", r["with_curve"]["every_steps"], r["live_points"],
                     f"{plain['train']:.0f} / {curve['train']:.0f}", f"{plain['total']:.0f} / {curve['total']:.0f}",
                     f"{r['extra_train_s_per_point']:.0f}",
                     f"{r['score_tuned_s']:.0f}", _load(r["machine"]["load_average_at_start"][:1])])
    return _table(["recipe", "every_steps", "live points", "train s without / with", "total s without / with",
                   "extra train s per point", "one tuned scoring pass, s", "1-min load at start"], rows) + "\n"


def chain_table(chain: dict) -> str:
    """Persistence of the LoRA run's canaries through the further clean tune (bits and whole-space exposure)."""
    rows = []
    for t in chain["clean_further_tune"]["persistence"]["tiers"]:
        r = t["repetitions"]
        label = "references" if r == 0 else f"{r}x"
        b, e, x = t["bits"], t["exposure_space"], t["extracted"]
        keep = ["-" if t[k] is None else f"{t[k]:.2f}" for k in ("retained_bits", "retained_exposure")]
        rows.append([label, t["n"], f"{b['base']:.1f}", f"{b['before']:.1f}", f"{b['after']:.1f}", f"{e['before']:.2f}",
                     f"{e['after']:.2f}", f"{x['before']}/{t['n']}", f"{x['after']}/{t['n']}", *keep])
    head = ["tier", "n", "bits base", "bits before", "bits after", "exposure before", "exposure after", "extracted before",
            "extracted after", "retained bits", "retained exposure"]
    lora, clean = chain["lora"], chain["clean_further_tune"]
    during = chain["machine"].get("load_1min_during")
    load = (f"1-min load {during['min']:.0f}-{during['max']:.0f} during them (a shared machine: not a benchmark)" if during
            else f"1-min load {_load(chain['machine']['load_average_at_start'][:1])} at the start")
    return (_table(head, rows) + f"\n\nBoth runs: {lora['total_s'] + clean['total_s']:.1f} s ({lora['total_s']:.1f} s + "
            f"{clean['total_s']:.1f} s; `{lora['run']}`, `{clean['run']}`), {load}.\n")


def compare_table(chain: dict) -> str:
    """LoRA (``smollm2/quick_cpu``) against full fine-tuning (``smollm2/full_cpu``) on the same data and canaries
    (whole-space exposure)."""
    rows = []
    for key in ("quick", "full"):
        r = chain[key]
        params = r["trainable_params"] / 1e6
        rows.append([f"`{r['run']}`", r["method"], f"{params:.2f} M" if params < 1 else f"{params:.1f} M",
                     *[f"{r['exposure_space_tuned'][f'rep_{t}']:.2f}" for t in (0, 1, 4, 16)],
                     *[r["extracted_greedy_tuned"][f"rep_{t}"] for t in (1, 4, 16)], f"{r['mia_auc_loss_diff']:.2f}",
                     f"{r['privacy_eps_lb']:.2f}", f"{r['final_train_loss']:.3f}", f"{r['train_s']:.1f}", f"{r['total_s']:.1f}"])
    head = ["run", "method", "trainable params", *[f"whole-space exposure {t}" for t in ("refs", "1x", "4x", "16x")],
            *[f"extracted {t}" for t in ("1x", "4x", "16x")], "MIA AUC", "eps LB", "final loss", "train s", "total s"]
    machine = chain.get("comparison", {}).get("machine", chain["machine"])
    dated = f" Dated: {chain['comparison']['dated']}." if "comparison" in chain else ""
    return _table(head, rows) + f"\n\n1-min load {_load(machine['load_average_at_start'][:1])} at the start.{dated}\n"


def designs_table(designs: dict) -> str:
    return canary_designs.markdown_table(designs) + "\n"


def dp_table(result: dict) -> str:
    return dp_soundness.markdown_table(result) + "\n"


def dp_smollm2_table(result: dict) -> str:
    """The soundness table, then each run's wall clock and stage times."""
    rows = [[f"{r['eps_target']:g}", r["wall_clock"], r["steps"], f"{r['timings_s']['train']:.1f}",
             f"{r['timings_s']['total']:.1f}", f"`{r['run']}`"] for r in result["rows"]]
    timing = _table(["eps target", "wall clock", "steps", "train s", "total s", "run"], rows)
    return (dp_soundness.markdown_table(result) + "\n\n" + timing + f"\n\n1-min load "
            f"{_load(result['machine']['load_average_at_write'][:1])} when the JSON was written.\n")


def _min_s(seconds: float) -> str:
    total = round(seconds)
    return f"{total // 60} min {total % 60:02d} s"


def works_tiny_table(works: dict) -> str:
    """A works recipe (``tiny/works_cpu``, ``smollm2/works_cpu``) at seed 0, per work: base -> tuned ("withheld" where
    the shared report withholds a secret work's base number or stored bits), then the run, its wall clock and the load
    the machine was under."""

    def pair(d: dict) -> str:
        return f"{'withheld' if d['base'] is None else format(d['base'], '.2f')} -> {d['tuned']:.2f}"

    rows = [[w["title"], w["kind"].replace("_", " "), w["role"].replace("_", " "), pair(w["bits_per_byte"]),
             "withheld" if w["stored_bits"] is None else f"{w['stored_bits']:.1f}", pair(w["extractable_share"]),
             f"{w['greedy_share']:.2f}", w["longest_greedy_run"]] for w in works["whole_works"]["works"]]
    head = ["work", "kind", "role", "bits/byte base -> tuned", "stored bits", "extractable share base -> tuned",
            "greedy share", "longest greedy run"]
    m, load = works["machine"], works.get("load_1min_during")
    if works.get("wall_s") is not None:
        when = f"{_min_s(works['wall_s'])} wall clock (stage times total {works['timings_s']['total']:.0f} s)"
    else:
        when = f"{_min_s(works['timings_s']['total'])} (the report's stage times; wall clock not recorded)"
    during = f", 1-min load {load['min']:.1f}-{load['max']:.1f} during it (sampled every 10 s)" if load else ""
    return (_table(head, rows) + f"\n\nRun `{works['run']}`: {when} on the shared {m['cpus']}-core {m['cpu']}{during}.\n")


def release_table(release: dict) -> str:
    """The tuned weights and each release side by side: exposure per tier, greedy extraction, bits at the top tier and
    their drift from the tuned model, file size and time."""
    tiers = sorted(release["formats"][0]["tiers"], key=lambda k: int(k.split("_")[1]))
    members = [k for k in tiers if k != "rep_0"]
    top = members[-1] if members else tiers[-1]
    rows = []
    for f in release["formats"]:
        t = f["tiers"]
        exposure = [f"{t[k]['exposure']:.2f}" if t[k]["exposure"] is not None else "-" for k in members + ["rep_0"]]
        extracted = f"{sum(t[k]['extracted'] or 0 for k in members)}/{sum(t[k]['n'] for k in members)}"
        drift = t[top].get("bits_drift")
        rows.append([f["label"], f["quantization"], f"{f['bytes'] / 1e6:.2f}" if f["bytes"] else "-", *exposure, extracted,
                     f"{t[top]['bits']:.2f}", "-" if drift is None else f"{drift:+.3f}", f"{f['seconds']:.1f}"])
    head = ["format", "type", "MB", *[f"exposure {k.split('_')[1]}x" for k in members], "exposure refs",
            "extracted (members)", f"bits {top.split('_')[1]}x", f"bits - tuned {top.split('_')[1]}x", "s"]
    return (_table(head, rows) + f"\n\n{release['model']}, recipe `{release['recipe']}`, run `{release['run']}`; "
            f"1-min load {_load(release['machine']['load_average_at_start'][:1])} at the start.\n")


TABLES: dict[str, Table] = {
    "default": Table(("canary_designs.json", "default_audit.json"), default_result),
    "default_timing": Table(("default_audit.json",), default_timing),
    "recipes": Table(("default_audit.json", "chain.json", "dp_soundness.json", "dp_soundness_smollm2.json"), recipe_times),
    "scoring": Table(("scoring.json", "exposure.json"), scoring_table),
    "curve_smollm2": Table(("curves.json",), curve_smollm2),
    "curve_cost": Table(("curves.json",), curve_cost),
    "chain": Table(("chain.json",), chain_table),
    "compare": Table(("chain.json",), compare_table),
    "canary_designs": Table(("canary_designs.json",), designs_table),
    "dp_tiny": Table(("dp_soundness.json",), dp_table),
    "dp_smollm2": Table(("dp_soundness_smollm2.json",), dp_smollm2_table),
    "dp_new_tokens": Table(("dp_soundness_new_tokens.json",), dp_table),
    "scale_memory": Table(("scale_memory.json",), scale_memory.table),  # computed, not measured: the JSON says so
    "works_tiny": Table(("works_tiny.json",), works_tiny_table),
    "works_smollm2": Table(("works_smollm2.json",), works_tiny_table),
    "release": Table(("release.json",), release_table),
}


def generate(name: str) -> str:
    """The Markdown of table ``name`` from its JSON files."""
    table = TABLES[name]
    return table.make(*[_json(s) for s in table.sources])


def marker(name: str) -> str:
    sources = " ".join(f"benchmarks/{s}" for s in TABLES[name].sources)
    return f"<!-- table: {sources} via benchmarks/tables.py {name} -->"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(text: str) -> str:
    """``text`` with every generated block replaced by what its generator gives now (and its marker normalized)."""

    def one(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        return f"{marker(name)}\n{generate(name)}<!-- /table -->"

    return BLOCK.sub(one, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=list(TABLES))
    parser.add_argument("--list", action="store_true", help="the table names and the JSON each reads")
    parser.add_argument("--write", action="store_true", help="rewrite every generated block in README.md and docs/*.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated block is out of date")
    args = parser.parse_args()
    if args.list:
        for name in TABLES:
            print(marker(name))
        return 0
    if args.name:
        print(generate(args.name), end="")
        return 0
    stale = []
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if args.write:
                path.write_text(new, encoding="utf-8")
    verb = "rewrote" if args.write else "out of date"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
