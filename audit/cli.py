"""The ``audit`` command.

    audit run                                   # the default audit: recipes/smollm2/lora_cpu.yaml
    audit run tiny/lora_cpu training.epochs=2   # a shipped recipe by name, with key=value overrides
    audit run tiny/lora_cpu --no-fail-on-gates  # exit 0 even if a release gate fails (default: exit 1, like `audit gate`)
    audit validate recipes/tiny/lora_cpu.yaml   # check a recipe without running it
    audit ls                                    # list shipped recipes and canary specs
    audit run --resume runs/<run>               # continue an interrupted run (finished stages and last checkpoint)
    audit gate runs/<run> [--gates FILE] [--baseline RUN] [--junit FILE]   # release gates; exit 1 if one fails
    audit canaries words [--seed 3] [--reveal] [length=6]  # draw and show a spec's pool (secrets hidden by default)
    audit key [--new PATH]                               # the audit key's id and where it comes from (never the key)
    audit inject tiny/lora_cpu --out planted/ [--stream]  # canaries + injection + pre-flight as a standalone stage
    audit measure planted/ --model OUT_DIR [--adapter DIR] [--base SOURCE] [key=value]  # audit a model trained elsewhere
    audit run smollm2/clean_lora_cpu parent=runs/<run>   # fine-tune that run's tuned weights again, measure what survives
    audit chain [RECIPE] [--then RECIPE] [--release q4_0] [key=value]  # base -> tune -> outputs -> further clean tune
    audit compare RUN_OR_EXPERIMENT ... [--plot FILE]    # side-by-side table + PNG of several runs, read from MLflow
    audit probe "Colorless green ideas" [--model SOURCE] [--adapter RUN_DIR]  # per-token p under base and tuned
    audit report runs/<run> [--probe "some text"]        # regenerate report.html/report.md (no rescoring)
    audit sync runs/<run> [--tracking-uri URI]           # send MLflow what it missed while its server was away

User errors print one line, ``error: <problem> (fix: <how>)``, and exit with code 2.

Exit codes: 0 done (and every release gate passed); 1 a release gate failed (`audit run`, `audit chain` and
`audit gate` alike, so CI can read it; `audit run --no-fail-on-gates` reports the failure and still exits 0);
2 bad input; 128 + the signal number when stopped by a signal (130 Ctrl-C / SIGINT, 143 SIGTERM: ``run.json``
then says ``failed`` and names the signal, the MLflow runs end KILLED; ``audit run --resume`` continues it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from audit.core.errors import EXIT_USAGE, AuditError
from audit.core.layout import LAYOUT

EXIT_GATE_FAILED = 1

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe YAML path or shipped name (default: smollm2/lora_cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. training.epochs=2")


def _add_gate_exit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-fail-on-gates", dest="fail_on_gates", action="store_false",
                   help="exit 0 even when a release gate fails (the failure is still printed and in report.json); "
                        f"by default a failed gate exits {EXIT_GATE_FAILED}, like `audit gate`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audit", description="Audit fine-tuned language models for memorized canaries.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an audit: canaries -> inject -> train -> score -> report")
    _add_recipe_args(run)
    run.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.add_argument("--quiet", action="store_true", help="no progress output, only the final table")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue an interrupted run from its finished stages and last training checkpoint")
    _add_gate_exit_arg(run)

    val = sub.add_parser("validate", help="check a recipe before running it (keys, corpus and model exist, every gate can "
                                          "be met) and print it resolved")
    _add_recipe_args(val)

    sub.add_parser("ls", help="list shipped recipes and canary specs")

    gate = sub.add_parser("gate", help="check a report against release gates; exit 1 if any fails")
    gate.add_argument("report", metavar="REPORT_OR_RUN", help="a run directory or its report.json")
    gate.add_argument("--gates", default=None, metavar="FILE", help="gates YAML (default: the gates in the run's recipe)")
    gate.add_argument("--baseline", default=None, metavar="RUN", help="run directory or report.json to compare against")
    gate.add_argument("--junit", default=None, metavar="FILE", help="also write the results as JUnit XML")

    can = sub.add_parser("canaries", help="draw a canary spec's pool and show it (secrets hidden unless --reveal)")
    can.add_argument("spec", help="a shipped spec name (audit ls) or a spec YAML path")
    can.add_argument("overrides", nargs="*", metavar="param=value", help="override spec params, e.g. length=8")
    can.add_argument("--seed", type=int, default=0)
    can.add_argument("--reveal", action="store_true", help="show the secret text (confidential audit material)")
    can.add_argument("--out", default=None, metavar="FILE", help="also write the pool as canaries.jsonl (with secrets)")
    can.add_argument("--model", default="smollm2-135m",
                     help="base model for tokenizer-exact excerpts and for specs that sample it (traps, synthetic works)")
    can.add_argument("--key-file", default=None, metavar="PATH",
                     help="the audit key file the secrets derive from (default: $CANARY_AUDIT_KEY, then your own key)")

    key = sub.add_parser("key", help="show the audit key's id and source (the key itself is never printed)")
    key.add_argument("--new", default=None, metavar="PATH", help="create a new key file at PATH (0600), e.g. for a shared audit")

    inj = sub.add_parser("inject", help="canaries -> inject -> pre-flight for a recipe, writing the injected training set")
    _add_recipe_args(inj)
    inj.add_argument("--out", default=None, metavar="DIR", help="output directory (default: <output.root>/<name>-inject-<time>)")
    inj.add_argument("--stream", action="store_true", help="read and write the corpus record by record (big corpora)")

    mea = sub.add_parser("measure", help="audit a model trained elsewhere on the canaries `audit inject` planted: "
                                         "score base and tuned, write a run directory, log, gate")
    mea.add_argument("ground_truth", metavar="GROUND_TRUTH_DIR", help="the --out directory of `audit inject`, or a run directory")
    mea.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override how it is measured: scoring.*, gates, tracking.*, output.*, outputs.*")
    mea.add_argument("--model", default=None, metavar="PATH_OR_SOURCE",
                     help="the tuned model (a full fine-tune or merged model directory, or a llama GGUF file: a "
                          "release, dequantized into fp32); with --adapter, the model the adapter goes on (default: the base)")
    mea.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT adapter directory (safetensors)")
    mea.add_argument("--base", default=None, metavar="SOURCE",
                     help="the pretrained model (default: the one `audit inject` recorded)")
    mea.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")
    mea.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    mea.add_argument("--quiet", action="store_true", help="no progress output, only the final table")
    _add_gate_exit_arg(mea)

    chn = sub.add_parser("chain", help="the derivative chain: run RECIPE, then fine-tune its weights again (--then) and "
                                       "measure what survives")
    _add_recipe_args(chn)
    chn.add_argument("--then", default=None, metavar="RECIPE",
                     help="the further tune (default: clean_lora_cpu beside RECIPE, e.g. smollm2/clean_lora_cpu)")
    chn.add_argument("--release", default=None, metavar="FMT[,FMT]",
                     help="end the chain with releases of its last tune, each made and measured like it: merged and/or "
                          "GGUF types, e.g. --release merged,q4_0 (an unknown type is refused, naming the supported ones)")
    chn.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    chn.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    chn.add_argument("--quiet", action="store_true", help="no progress output, only the final tables")
    _add_gate_exit_arg(chn)

    cmp_ = sub.add_parser("compare", help="several runs side by side (table + PNG), read from MLflow")
    cmp_.add_argument("targets", nargs="+", metavar="RUN_OR_EXPERIMENT",
                      help="run directories, MLflow run ids or experiment names")
    cmp_.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the run's own, or ./mlflow.db)")
    cmp_.add_argument("--plot", default="compare.png", metavar="FILE", help="PNG to write (default: compare.png)")
    cmp_.add_argument("--model", default="tuned", help="which model's numbers to compare (default: tuned, with each run's "
                                                       "releases as rows of their own)")

    syn = sub.add_parser("sync", help="replay into MLflow what a run could not log while its tracking server was away")
    syn.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with a tracking_pending.jsonl")
    syn.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the one run.json recorded)")

    rep = sub.add_parser("report", help="regenerate report.html and report.md of a run from its files (no rescoring)")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (runs/<name>)")
    rep.add_argument("--probe", default=None, metavar="TEXT",
                     help="also add the per-token view of TEXT under the run's base and tuned weights (probe.json)")

    probe = sub.add_parser("probe", help="per-token probability of a text under the base and the tuned model")
    probe.add_argument("text", nargs="?", default="Colorless green ideas sleep furiously")
    probe.add_argument("--model", default=None, metavar="SOURCE",
                       help="base model (default: the run's recipe model with --adapter RUN_DIR, else smollm2-135m)")
    probe.add_argument("--adapter", default=None, metavar="PATH", help="run directory, PEFT adapter or tuned model directory")
    probe.add_argument("--json", action="store_true", help="print the probabilities as JSON")
    return parser


def _split_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``audit run training.epochs=1`` means the default recipe with an override, not a recipe named so."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)
        recipe = None
    return recipe, overrides


def cmd_run(args: argparse.Namespace) -> int:
    from audit.core.config import load_recipe
    from audit.pipeline import run_audit
    from audit.report import format_table

    recipe_name, overrides = _split_overrides(args)
    if args.resume:
        from audit.pipeline.resume import RunDir, load_resumable

        if recipe_name or overrides:
            raise AuditError("--resume continues a run with the recipe stored in it; "
                             "a recipe or key=value overrides cannot change it",
                             fix=f"run `audit run --resume {args.resume}` alone, or start a new run")
        run_dir, recipe, status = load_resumable(args.resume)
        if (report := RunDir(run_dir).completed_report()) is not None:
            print(f"run {run_dir} is already complete; nothing to resume")
            print(format_table(report))
            return _gate_exit(args, [report])
        # the store this run was tracked in (run.json), wherever the resume is started from
        result = run_audit(recipe, tracking_uri=args.tracking_uri or status.get("tracking_uri"),
                           tracking=False if args.no_tracking else None, progress=not args.quiet, resume_dir=run_dir)
    else:
        recipe = load_recipe(recipe_name, overrides)
        if recipe.parent is None:  # a gate no run can pass fails the run after all its work: refuse it now
            from audit.data.validate import check_gates

            check_gates(recipe)
        result = run_audit(recipe, tracking_uri=args.tracking_uri, tracking=False if args.no_tracking else None,
                           progress=not args.quiet)
    _print_result(result)
    return _gate_exit(args, [result.report] if result is not None else [])


def _gate_exit(args: argparse.Namespace, reports: list) -> int:
    """0, or EXIT_GATE_FAILED when a release gate of one of ``reports`` failed (unless --no-fail-on-gates)."""
    failed = [(r.run_id, g) for r in reports for g in r.gates if not g.passed]
    if not failed:
        return 0
    names = "; ".join((f"{run}: " if len(reports) > 1 else "")
                      + f"{g.gate} ({g.metric} = {'n/a' if g.value is None else f'{g.value:.3g}'}, needs {g.threshold})"
                      for run, g in failed)
    if not args.fail_on_gates:
        print(f"\n{len(failed)} release gate(s) failed: {names}; exit 0 because of --no-fail-on-gates", file=sys.stderr)
        return 0
    print(f"\n{len(failed)} release gate(s) failed: {names}; exit {EXIT_GATE_FAILED} "
          "(pass --no-fail-on-gates to report without failing)", file=sys.stderr)
    return EXIT_GATE_FAILED


def _print_result(result) -> None:
    from audit.report import format_table

    if result is None:  # a non-main process of `accelerate launch`: rank 0 reports
        return
    report = result.report
    if any(n.details.get("training") == "external" for n in report.lineage):  # audit measure
        print(f"\naudit {report.run_id}: {report.model.source} + external {report.training.method} weights "
              f"{report.training.weights_path}, total {report.timings_s['total']:.0f} s")
    else:
        print(f"\naudit {report.run_id}: {report.model.source}, {report.training.method} fine-tune, "
              f"{report.training.steps} steps in {report.training.wall_s:.0f} s, total {report.timings_s['total']:.0f} s")
    print(format_table(report))
    if report.outputs:
        print(f"\noutputs: {report.outputs.statement}")
    if report.persistence:
        from audit.pipeline.chain import format_persistence

        print(f"\npersistence of the parent's canaries (parent {report.parent_run}):")
        print(format_persistence(report.persistence.tiers, report.persistence.mia_auc_loss_diff, report.persistence.by_release))
    if report.gates:
        from audit.core.gates import format_gate_table

        print("\ngates (check again with `audit gate RUN_DIR`; exit 1 when one fails):")
        print(format_gate_table(report.gates))

    print(f"\nrun directory: {result.run_dir}")
    print(f"report: {result.run_dir / LAYOUT.html} (open it in a browser; regenerate with `audit report {result.run_dir}`)")
    if "tracking" in report.metric_notes:  # MLflow missed part of the run (audit.pipeline.stages.tracking_note)
        print(f"MLflow: {report.metric_notes['tracking']}")
    elif report.tracking is not None:
        print(f"MLflow run {report.tracking.run_id}: {report.tracking.ui_command}")


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from audit.core.config import load_recipe
    from audit.data.validate import validate_only

    recipe_name, overrides = _split_overrides(args)
    recipe = load_recipe(recipe_name, overrides)
    notes = validate_only(recipe)  # corpus and model exist, every gate can be met (audit.data.validate)
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip())
    for note in notes:
        print(f"# {note}")
    print(f"# ok: recipe '{recipe.name}' is valid")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from audit.core.config import shipped_recipes
    from audit.data.canaries import shipped_specs

    print("recipes:")
    for name in shipped_recipes():
        print(f"  {name}")
    print("canary specs:")
    for name in shipped_specs():
        print(f"  {name}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from audit.core.gates import (
        evaluate_gates,
        format_gate_table,
        junit_xml,
        load_gate_specs,
        read_report_or_run,
        recipe_gates,
        report_metrics,
    )
    from audit.core.store import atomic_write_text

    report = read_report_or_run(args.report)
    specs = load_gate_specs(args.gates) if args.gates else recipe_gates(report)
    if not specs:
        where = f"gates file {args.gates} lists no gates" if args.gates else \
            f"the recipe of {report.run_id} has no 'gates:' section and no --gates was given"
        raise AuditError(f"no gates to check: {where}", fix="pass --gates FILE or add a gates: section to the recipe")
    # checked before anything is printed: a path that cannot be written is a usage error (2), not a failed gate (1)
    if args.junit:
        junit = Path(args.junit)
        try:
            junit.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditError(f"cannot write --junit {junit}: folder {junit.parent} cannot be created ({exc.strerror})",
                             fix="give a path in a writable folder") from None
        if not os.access(junit.parent, os.W_OK) or junit.is_dir():
            raise AuditError(f"cannot write --junit {junit}: not a writable file path", fix="give a path in a writable folder")
    baseline = report_metrics(read_report_or_run(args.baseline)) if args.baseline else None
    results = evaluate_gates(specs, report_metrics(report), baseline, curves=report.curves)
    print(f"gates for {report.run_id}" + (f" (baseline {args.baseline})" if args.baseline else ""))
    print(format_gate_table(results))
    if args.junit:
        atomic_write_text(Path(args.junit), junit_xml(results))
    return 0 if all(r.passed for r in results) else EXIT_GATE_FAILED


def cmd_canaries(args: argparse.Namespace) -> int:
    from audit.core.config import parse_override
    from audit.core.keys import resolve_key
    from audit.core.store import write_jsonl
    from audit.data.canaries import GenerationContext, added_tokens, generate_canaries, load_spec, spec_needs_model
    from audit.data.ground_truth import canaries_table, model_context

    params = {}
    for item in args.overrides:
        keys, value = parse_override(item)
        params[".".join(keys)] = value
    spec = load_spec(args.spec, params)
    _, tokenizer, sampler = model_context(args.model, tokenizer_only=not spec_needs_model(spec),
                                          added_tokens=added_tokens(spec))
    canaries = generate_canaries(spec, seed=args.seed, context=GenerationContext(tokenizer=tokenizer, sampler=sampler),
                                 key=resolve_key(args.key_file))
    print(canaries_table(canaries, reveal=args.reveal))
    if args.out:
        write_jsonl(Path(args.out), canaries.canaries)
        print(f"wrote {args.out} (holds the secrets: keep it confidential)")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    from audit.core.keys import AuditKey, read_key_file, resolve_key, write_key_file

    if args.new:
        path = Path(args.new).expanduser()
        if path.exists():
            raise AuditError(f"{path} already exists", fix="give a new path; a key file is never overwritten")
        write_key_file(path)
        key = AuditKey(read_key_file(path), source=f"file:{path}")
        print(f"wrote a new audit key to {path} (mode 600), id {key.id}; use it with canaries.key_file={path} "
              "or CANARY_AUDIT_KEY_FILE")
        return 0
    key = resolve_key()
    print(f"audit key {key.id} ({key.source}); run.json and report.json of the runs it made record this id")
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from audit.core.config import load_recipe
    from audit.data.ground_truth import inject_stage

    recipe_name, overrides = _split_overrides(args)
    recipe = load_recipe(recipe_name, overrides)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path(recipe.output.root) / f"{recipe.name.replace('/', '-')}-inject-{stamp}"
    result = inject_stage(recipe, out, stream=args.stream, progress=True)
    pf = result.preflight
    print(f"planted {result.placements} canary copies into {result.n_records} records; pre-flight: "
          f"{pf.placements_checked} checked, {len(pf.findings)} findings (loss: {pf.loss}, max_length {pf.max_length})")
    print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings_s.items()))
    print(f"wrote {', '.join(result.files)} to {result.out_dir} (canaries.jsonl and train.jsonl hold the secrets)")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from audit.pipeline.measure import measure_run

    result = measure_run(args.ground_truth, model=args.model, adapter=args.adapter, base=args.base, overrides=args.overrides,
                         tracking_uri=args.tracking_uri, tracking=False if args.no_tracking else None,
                         progress=not args.quiet)
    _print_result(result)
    return _gate_exit(args, [result.report] if result is not None else [])


def cmd_probe(args: argparse.Namespace) -> int:
    import json

    from audit.pipeline.probe import format_probe, probe_text

    result = probe_text(args.text, model_source=args.model, adapter=args.adapter)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_probe(result))
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from audit.core.config import load_recipe, resolve_recipe_path
    from audit.core.resources import DEFAULT_RECIPE
    from audit.pipeline import run_audit

    recipe_name, overrides = _split_overrides(args)
    first = load_recipe(recipe_name, overrides)
    then = args.then
    if then is None:  # the clean further tune shipped beside the first recipe, e.g. smollm2/clean_lora_cpu
        beside = resolve_recipe_path(recipe_name).parent / "clean_lora_cpu.yaml"
        if not beside.is_file():
            raise AuditError(f"no further-tune recipe given and no {beside.name} beside {recipe_name or DEFAULT_RECIPE}",
                             fix="pass --then RECIPE, e.g. --then smollm2/clean_lora_cpu")
        then = str(beside)
    then_overrides = list(overrides)
    if args.release is not None:  # the chain ends with the releases of its last tune
        from audit.pipeline.chain import release_overrides

        then_overrides += release_overrides(args.release, load_recipe(then, overrides))
    load_recipe(then, then_overrides)  # a bad second recipe (or release) fails before the first run starts
    if first.parent is None:
        from audit.data.validate import check_gates

        check_gates(first)
    tracking = False if args.no_tracking else None
    parent = run_audit(first, tracking_uri=args.tracking_uri, tracking=tracking, progress=not args.quiet)
    _print_result(parent)
    child = run_audit(load_recipe(then, [*then_overrides, f"parent={parent.run_dir}"]), tracking_uri=args.tracking_uri,
                      tracking=tracking, progress=not args.quiet)
    _print_result(child)
    shipped = child.report.release.releases if child.report.release else []
    print(f"\nchain: {parent.run_dir} -> {child.run_dir}" + "".join(f" -> {r.label} ({r.path})" for r in shipped))
    return _gate_exit(args, [r.report for r in (parent, child) if r is not None])


def cmd_compare(args: argparse.Namespace) -> int:
    from audit.report.compare import compare_plot, compare_table, resolve_rows

    rows = resolve_rows(args.targets, tracking_uri=args.tracking_uri, releases=args.model == "tuned")
    print(compare_table(rows, model=args.model))
    path = compare_plot(rows, Path(args.plot), model=args.model)
    print(f"\nplot: {path}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from audit.pipeline.resume import sync_run

    print(sync_run(args.run_dir, tracking_uri=args.tracking_uri))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from audit.core.gates import read_report_or_run
    from audit.report.render import render_report

    run_dir = Path(args.run_dir)
    report = read_report_or_run(run_dir)  # one-line errors for a missing or unfinished run
    if not run_dir.is_dir():
        raise AuditError(f"{run_dir} is a file; `audit report` needs the run directory around it",
                         fix=f"pass {run_dir.parent}")
    if args.probe:
        import json

        from audit.core.layout import versioned
        from audit.core.store import atomic_write_text
        from audit.pipeline.probe import probe_text

        result = probe_text(args.probe, adapter=str(run_dir))
        probe = versioned(LAYOUT.probe, result.to_json())
        atomic_write_text(run_dir / LAYOUT.probe, json.dumps(probe, indent=2, ensure_ascii=False) + "\n")
    rendered = render_report(run_dir, report)
    print(f"wrote {rendered.html} and {rendered.markdown} ({len(rendered.plots)} plots in {rendered.html.parent / 'plots'})")
    return 0


COMMANDS = {"report": cmd_report, "run": cmd_run, "validate": cmd_validate, "ls": cmd_ls, "gate": cmd_gate,
            "canaries": cmd_canaries, "key": cmd_key, "inject": cmd_inject, "measure": cmd_measure, "chain": cmd_chain,
            "compare": cmd_compare, "probe": cmd_probe, "sync": cmd_sync}


WATCHED_COMMANDS = {"run", "chain", "inject", "measure"}
"""Long commands: a line after every 10 s without output (:func:`audit.core.progress.watchdog`), once the run has started
(its first ``[audit]`` line), so a bad input still gets exactly one line on stderr."""

QUIET_COMMANDS = {"run", "chain", "inject", "measure", "canaries", "probe", "report"}
"""Commands that load models or MLflow: library chatter off, our progress bars on (:mod:`audit.core.console`)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`audit run tiny/lora_cpu --quiet seed=1`): argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    # Anything else that is not an option is taken as an override, so `key` without `=value` gets the one-line error.
    stray = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    previous = _stop_on_signals()
    try:
        from audit.core.progress import watchdog

        watched = args.command in WATCHED_COMMANDS and not getattr(args, "quiet", False)
        with watchdog(args.command, enabled=watched, after="[audit]"):  # armed once inputs are checked
            if args.command in QUIET_COMMANDS:
                from audit.core.console import quiet_libraries

                quiet_libraries(transformers=args.command != "report" or bool(getattr(args, "probe", None)))
            return COMMANDS[args.command](args)
    except AuditError as exc:
        _error_line(exc.one_line())
        return EXIT_USAGE
    except OSError as exc:  # a full disk outside a run (audit inject, audit report): one line too; anything else is a bug
        from audit.pipeline.resume import disk_full

        full = disk_full(exc, Path.cwd())
        if full is None:
            raise
        _error_line(full.one_line())
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        from audit.pipeline.resume import RunInterrupted

        name = exc.signal_name if isinstance(exc, RunInterrupted) else "SIGINT"
        print(f"interrupted by {name}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, RunInterrupted) else 130
    finally:
        _restore_signals(previous)


def _error_line(problem: str) -> None:
    """``error: <problem>`` and its newline in one write: ``print`` makes two, and the processes of a torchrun share
    stderr, so two ranks' refusals ran together on one line."""
    sys.stderr.write(f"error: {problem}\n")
    sys.stderr.flush()


def _stop_on_signals() -> dict:
    """SIGTERM and SIGINT raise :class:`audit.pipeline.resume.RunInterrupted` (once): the run unwinds, marks ``run.json``
    failed and its MLflow runs KILLED. A second signal while that happens stops the process at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        from audit.pipeline.resume import RunInterrupted

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        raise RunInterrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, stop)
    return previous


def _restore_signals(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
