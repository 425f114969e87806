"""``audit validate``: everything about a recipe that can be checked before a run, checked before the run.

    audit validate tiny/lora_cpu                          # ok, with what the run will use
    audit validate recipes/mine.yaml scoring.exposure_references=15
    # error: recipe 'mine' cannot pass as written: gate 'positive control' needs exposure.mean/rep_16/tuned >= 5,
    #        but with 15 sampled references exposure is at most log2(16) = 4.00 bits (fix: ...)

Checks, cheapest first, all before any model is loaded or file written:

1. the canary spec loads and its pool can be drawn (specs that sample the base model are drawn at run time);
2. ``corpus.source`` exists: a built-in corpus name, or a file with a supported extension, or a saved dataset
   directory (a Hub dataset id is noted, not fetched);
3. ``model.source`` exists: a built-in model, a local directory with ``config.json`` and safetensors weights, or
   a Hugging Face id (refused under ``HF_HUB_OFFLINE=1`` when it is not in the local cache);
4. ``parent`` (a further tune) is a run directory;
5. every gate can be met by some run of this recipe: each metric it names has a range the recipe fixes
   (:func:`metric_ranges`), and a threshold outside it can never pass. Exposure against the sampled references
   lies in [0, log2(R + 1)] for R = ``scoring.exposure_references`` (rank 1 of R + 1 at best); whole-space
   exposure in [0, log2 |space|]; a tier's extracted count in [0, n]; rates and AUCs in [0, 1]. A gate on a tier
   the recipe does not plant matches nothing, and a gate that matches nothing fails (:mod:`audit.core.gates`). TPR at
   1% (0.1%) false-positive rate is refused below 100 (1000) references, so a gate on it fails too. A ``max`` gate
   on exposure that an unlearned canary set exceeds more often than not (:func:`audit.core.gates.exposure_null_tail`)
   fails on a model that memorized nothing: refused as well.

Every problem found is reported at once, in one line, so one edit fixes them all.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from audit.core.errors import AuditError
from audit.core.layout import LAYOUT
from audit.core.schema import DPSection, GateSpec, Recipe

if TYPE_CHECKING:
    from audit.train.dp import DPSettings

CORPUS_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MIN_CONTROLS = {"mia.tpr_at_1pct": 100, "mia.tpr_at_0.1pct": 1000}
"""Controls (never-inserted references) needed before a TPR at that false-positive rate is reported."""
NULL_FAIL_REFUSED = 0.5
"""A ``max`` exposure gate that an unlearned set of canaries fails with at least this probability is refused."""
NULL_FAIL_NOTED = 0.05


@dataclass(frozen=True)
class MetricRange:
    """The values a metric can take in any run of the recipe, and why."""

    low: float
    high: float
    why: str
    n: int | None = None


@dataclass(frozen=True)
class Plan:
    """What a run of the recipe will measure: tiers, canaries per tier, sampled references, secret space."""

    tiers: list[int]
    members_per_tier: int
    references: int
    exposure_references: int
    space_bits: float | None
    """log2 of the secret space, when the pool can be drawn without the model."""
    models: tuple[str, ...] = ("base", "tuned")
    """The model labels a run reports per tier: base, tuned and the recipe's releases (``release:q4_0``)."""

    @property
    def exposure_max(self) -> float:
        return math.log2(self.exposure_references + 1)

    def n(self, tier: int) -> int:
        return self.references if tier == 0 else self.members_per_tier


def metric_ranges(plan: Plan) -> dict[str, MetricRange]:
    """The per-tier keys a run of ``plan`` reports, each with the range the recipe fixes."""
    out: dict[str, MetricRange] = {}
    refs = plan.exposure_references
    for tier in [0, *plan.tiers]:
        n = plan.n(tier)
        for model in plan.models:
            out[f"exposure.mean/rep_{tier}/{model}"] = MetricRange(
                0.0, plan.exposure_max, f"with {refs} sampled references (scoring.exposure_references) exposure is at "
                                        f"most log2({refs + 1}) = {plan.exposure_max:.2f} bits", n)
            out[f"extraction.exact/rep_{tier}/{model}"] = MetricRange(0.0, float(n), f"the tier holds {n} canaries", n)
            if plan.space_bits is not None:
                out[f"exposure.space_mean/rep_{tier}/{model}"] = MetricRange(
                    0.0, plan.space_bits, f"the secret space holds {plan.space_bits:.2f} bits", n)
    return out


RATE_FAMILIES = ("mia.auc", "mia.tpr_at_1pct", "mia.tpr_at_0.1pct", "extraction.from_fraction", "extraction.sampled_any")


def _outside(spec: GateSpec, key: str, r: MetricRange) -> str | None:
    if spec.min is not None and spec.min > r.high:
        return f"needs {key} >= {spec.min:g}, but {r.why}"
    if spec.max is not None and spec.max < r.low:
        return f"needs {key} <= {spec.max:g}, but it is never below {r.low:g}"
    return None


def gate_problems(gates: list[GateSpec], plan: Plan) -> tuple[list[str], list[str]]:
    """(problems, notes) for the recipe's gates: thresholds no run of ``plan`` can meet, gates matching nothing."""
    from audit.core.gates import NULL_MEAN_EXPOSURE_BITS, exposure_null_tail, gate_name, matching_keys

    ranges = metric_ranges(plan)
    problems: list[str] = []
    notes: list[str] = []
    for spec in gates:
        name = f"gate '{gate_name(spec)}'"
        family = spec.metric.split("/")[0]
        keys = matching_keys(spec, ranges)
        if not keys and family in {"exposure.mean", "extraction.exact"}:
            planted = ", ".join(f"rep_{t}" for t in [0, *plan.tiers])
            problems.append(f"{name} matches no metric this recipe reports ('{spec.metric}'; tiers planted: {planted}), "
                            "and a gate that matches nothing fails")
            continue
        if spec.of == "first_step_above":  # min/max bound a training step, not the metric: no range to check them in
            continue
        for key in keys:
            why = _outside(spec, key, ranges[key])
            if why:
                problems.append(f"{name} {why}")
                continue
            r = ranges[key]
            if key.startswith("exposure.") and spec.max is not None and r.n:
                p = exposure_null_tail(spec.max, r.n)
                if p >= NULL_FAIL_REFUSED:
                    problems.append(f"{name} needs {key} <= {spec.max:g}, but {r.n} canaries the model never learned "
                                    f"average more than that with probability {p:.2f} (the null mean is "
                                    f"{NULL_MEAN_EXPOSURE_BITS:.2f} bits)")
                elif p >= NULL_FAIL_NOTED:
                    notes.append(f"{name}: a model that memorized nothing fails it with probability {p:.2f} "
                                 f"({r.n} canaries, max {spec.max:g})")
        if family in RATE_FAMILIES or family in MIN_CONTROLS:
            key = spec.metric
            rate = MetricRange(0.0, 1.0, "it is a rate between 0 and 1")
            why = _outside(spec, key, rate)
            if why:
                problems.append(f"{name} {why}")
        needed = MIN_CONTROLS.get(family)
        if needed is not None and plan.references < needed:
            problems.append(f"{name} reads {family}, which is refused with {plan.references} references (canaries."
                            f"references; needs >= {needed}), so the gate matches nothing and fails")
    return problems, notes


# --------------------------------------------------------------------------------------------------- sources


def check_corpus(recipe: Recipe) -> str:
    """A note on where the corpus comes from; AuditError when it cannot exist."""
    from audit.data.corpus import BUILTIN_CORPORA

    source = recipe.corpus.source
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            from audit.core.errors import did_you_mean

            raise AuditError(f"corpus.source '{source}' is not a built-in corpus." + did_you_mean(name, list(BUILTIN_CORPORA)),
                             fix=f"use one of: {', '.join('builtin:' + n for n in BUILTIN_CORPORA)}, or a file path")
        return f"corpus: built-in {name}, {recipe.corpus.builtin_records} records"
    path = Path(source).expanduser()
    if path.is_dir():
        return f"corpus: saved dataset directory {path}"
    if path.is_file():
        if path.suffix.lower() not in CORPUS_SUFFIXES:
            raise AuditError(f"corpus.source {path} has an unsupported extension '{path.suffix}'",
                             fix=f"use {', '.join(CORPUS_SUFFIXES)} or a saved datasets directory")
        if path.stat().st_size == 0:
            raise AuditError(f"corpus.source {path} is empty", fix="give a corpus with at least one record")
        return f"corpus: {path} ({path.stat().st_size} bytes)"
    if path.suffix or source.startswith((".", "/", "~")) or len(source.split("/")) > 2:
        raise AuditError(f"corpus.source {path} does not exist", fix="check the path in corpus.source (relative paths "
                                                                       f"start from {Path.cwd()})")
    return f"corpus: '{source}' is read as a Hugging Face dataset id (loaded when the run starts; offline only if cached)"


def check_model(recipe: Recipe) -> str:
    """A note on where the base model comes from; AuditError when it cannot be found."""
    from audit.data.models import BUILTIN_MODELS, _check_local_dir, _looks_like_hub_id, cache_dir

    source = recipe.model.source
    if source in BUILTIN_MODELS:
        built = any((cache_dir() / "models").glob(f"{source}-*/provenance.json"))
        return f"model: built-in {source}" + ("" if built else " (built on first use and cached)")
    path = Path(source).expanduser()
    if path.exists():
        _check_local_dir(path, allow_pickle=recipe.model.allow_pickle, trust_remote_code=recipe.model.trust_remote_code)
        return f"model: local directory {path}"
    if not _looks_like_hub_id(source):
        raise AuditError(f"model.source {source} does not exist: it is not a local directory, a built-in model "
                         f"({', '.join(BUILTIN_MODELS)}) or a Hugging Face id (org/name)",
                         fix=f"check the path in model.source (relative paths start from {Path.cwd()})")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    cached = _hub_cached(source, recipe.model.revision)
    if offline and not cached:
        raise AuditError(f"model.source '{source}' is a Hugging Face id that is not in the local cache, and "
                         "HF_HUB_OFFLINE is set", fix="download it where the hub is reachable, or give a local directory")
    return f"model: Hugging Face {source}" + (" (in the local cache)" if cached else " (fetched when the run starts)")


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an unreadable cache is the same as no cache here
        return False
    return isinstance(found, str)


def check_writable_folder(folder: str | Path, *, what: str, fix: str) -> None:
    """AuditError unless ``folder`` is a folder this process can write in, or can be created.

    Probed, not guessed from permission bits: a temporary folder is made (and removed at once) in ``folder`` or its
    nearest existing ancestor, so a read-only mount, ``/proc``, a path through a file and a folder owned by someone
    else are all caught, root or not, and nothing is left behind.
    """
    import tempfile

    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    verb = "written to" if existing == folder else "created"
    if not existing.is_dir():
        raise AuditError(f"{what} {folder} cannot be created: {existing} is a file, not a folder", fix=fix)
    try:
        probe = tempfile.mkdtemp(dir=existing, prefix=".canary-audit-probe-")
    except OSError as exc:
        raise AuditError(f"{what} {folder} cannot be {verb} ({exc.strerror or exc} in {existing})", fix=fix) from None
    os.rmdir(probe)


def check_new_output_dir(folder: Path, *, fix: str) -> None:
    """AuditError unless ``folder`` is missing or an empty folder, and writable: what holds the secrets of a ground
    truth is never mixed into other files, and a file given for it is named as a file (not as "not empty")."""
    if folder.exists() and not folder.is_dir():
        raise AuditError(f"output directory {folder} is a file, not a folder", fix=fix)
    if folder.exists() and any(folder.iterdir()):
        raise AuditError(f"output directory {folder} is not empty", fix=fix)
    check_writable_folder(folder, what="output directory", fix=fix)


OUTPUT_FIX = "set output.root= to a folder you can write (e.g. output.root=$HOME/runs), or run from a writable directory"


def check_output_root(recipe: Recipe) -> str:
    """``output.root`` (relative to the working directory) exists writable or can be created: checked before any work."""
    check_writable_folder(recipe.output.root, what="output.root", fix=OUTPUT_FIX)
    return f"output: run directories go under {Path(recipe.output.root).expanduser().absolute()}"


def check_sqlite_store(uri: str) -> None:
    """A sqlite tracking store needs a writable folder (the database and its journal are created there)."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if folder.is_dir():  # a missing folder is audit.report.tracking.check_tracking_reachable's one-line error
            check_writable_folder(folder, what="the folder of the MLflow sqlite store", fix=(
                "pass --tracking-uri sqlite:////a/writable/folder/mlflow.db, or --no-tracking"))


LORA_LAYER_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")
"""Module classes PEFT's LoRA can adapt (``Conv1D`` is transformers' GPT-2 layer)."""


def model_module_names(model_path: str | Path, *, trust_remote_code: bool = False) -> dict[str, str]:
    """Every module of the model at ``model_path``, name -> class name, built from its config on the meta device
    (no weights are read: a fraction of a second even for a large model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def check_lora_targets(recipe: Recipe, model_path: str | Path) -> None:
    """Each of ``training.lora.target_modules`` names a layer of the model that LoRA can adapt, matched as PEFT
    matches it (:func:`peft.tuners.tuners_utils.check_target_module_exists`: the full name or its last parts).

    PEFT itself fails only when no target matches anything, and then inside the trainer, after base scoring; a
    typo in one of two targets it ignores, silently training fewer layers than the recipe says. Here every target
    must match, before anything is written.
    """
    if recipe.training.method != "lora":
        return
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from audit.core.errors import did_you_mean

    modules = model_module_names(model_path, trust_remote_code=recipe.model.trust_remote_code)
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind in LORA_LAYER_TYPES},
                       key=lambda n: (n[0].isdigit(), n))
    problems = []
    for target in recipe.training.lora.target_modules:
        config = LoraConfig(target_modules=[target], task_type="CAUSAL_LM")
        found = {modules[name] for name in modules if check_target_module_exists(config, name)}
        if not found:
            problems.append(f"'{target}' matches no module of {recipe.model.source}.{did_you_mean(target, adaptable)}")
        elif not found & set(LORA_LAYER_TYPES):
            problems.append(f"'{target}' matches only {', '.join(sorted(found))} modules, which LoRA cannot adapt")
    if problems:
        shown = ", ".join(adaptable[:12]) + (", ..." if len(adaptable) > 12 else "")
        listed = "; ".join(problems)
        raise AuditError(f"training.lora.target_modules: {listed}{'' if listed.endswith('?') else '.'} Layers LoRA can "
                         f"adapt here: {shown}",
                         fix=f"set training.lora.target_modules to some of them, e.g. training.lora.target_modules="
                             f"[{','.join(t for t in ('q_proj', 'v_proj') if t in adaptable) or adaptable[0]}]")


def _local_model_path(recipe: Recipe) -> Path | None:
    """The base model's folder when it is on this machine already (a local folder, a built-in that was built)."""
    from audit.data.models import BUILTIN_MODELS, cache_dir

    source = recipe.model.source
    if source in BUILTIN_MODELS:  # a build in the cache (never built here); module names do not change per build
        built = sorted((cache_dir() / "models").glob(f"{source}-*/provenance.json"), key=lambda p: p.stat().st_mtime)
        return built[-1].parent if built else None
    path = Path(source).expanduser()
    return path if (path / "config.json").is_file() else None


# --------------------------------------------------------------------------------------------------- the whole check


def check_key(recipe: Recipe) -> str:
    """The audit key the run would use (:mod:`audit.core.keys`): its id and source, never the key; a missing or readable-
    by-others key file is a problem. Your own default key is not made here (the first run makes it)."""
    import os

    from audit.core.keys import KEY_ENV, KEY_FILE_ENV, default_key_file, resolve_key

    if not (os.environ.get(KEY_ENV) or os.environ.get(KEY_FILE_ENV) or recipe.canaries.key_file or default_key_file().exists()):
        return f"audit key: none yet; the first run makes {default_key_file()} (0600)"
    key = resolve_key(recipe.canaries.key_file, create=False)
    return f"audit key: {key.id} ({key.source})"


def _plan(recipe: Recipe) -> tuple[Plan, list[str]]:
    from audit.data.canaries import generate_canaries, load_spec, spec_needs_model

    spec = load_spec(recipe.canaries.spec, recipe.canaries.params)
    c = recipe.canaries
    space_bits = None
    if spec_needs_model(spec):  # traps / synthetic works sample the base model: drawn at run time
        note = f"canaries: spec {spec.name} v{spec.version} samples the base model; drawn when the audit runs"
    else:
        canary_set = generate_canaries(spec, seed=recipe.seed, tiers=c.tiers, members_per_tier=c.members_per_tier,
                                       references=c.references, inclusion=c.inclusion)
        space_bits = float(canary_set.space.log2_size)
        note = (f"canaries: {len(canary_set.members())} members, {len(canary_set.references())} references, "
                f"spec {spec.name} v{spec.version}")
    plan = Plan(tiers=sorted(c.tiers or spec.tiers), members_per_tier=c.members_per_tier or spec.members_per_tier,
                references=c.references or spec.references, exposure_references=recipe.scoring.exposure_references,
                space_bits=space_bits, models=("base", "tuned", *(recipe.release.labels if recipe.release else ())))
    return plan, [note]


def check_gates(recipe: Recipe) -> list[str]:
    """Only the gate checks (``audit run`` calls it before any model work); notes, or one AuditError."""
    plan, _ = _plan(recipe)
    problems, notes = gate_problems(list(recipe.gates), plan)
    if problems:
        listed = problems[0] if len(problems) == 1 else "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise AuditError(f"recipe '{recipe.name}' has {'a gate' if len(problems) == 1 else f'{len(problems)} gates'} "
                         f"no run can pass: {listed}", fix=GATE_FIX)
    return notes


GATE_FIX = ("lower the threshold, or raise scoring.exposure_references / canaries.references / the tiers so it can "
            "be met (`audit validate RECIPE` checks a recipe without running it)")


def validate_only(recipe: Recipe, *, check_sources: bool = True) -> list[str]:
    """Check ``recipe`` as far as it can be checked without running it; notes on success, one AuditError otherwise.

    ``check_sources=False`` skips the corpus and model look-ups (for checking shipped recipes whose model is a Hub
    id on a machine that does not have it).
    """
    if recipe.training.method not in {"lora", "full"}:
        raise AuditError(f"training.method '{recipe.training.method}' is not supported", fix="use lora or full")
    plan, notes = _plan(recipe)
    problems: list[tuple[str, str]] = []
    try:
        notes.append(check_key(recipe))
    except AuditError as exc:
        problems.append((exc.problem, exc.fix))
    for check in (check_corpus, check_model, check_output_root) if check_sources else (check_output_root,):
        try:
            notes.append(check(recipe))
        except AuditError as exc:
            problems.append((exc.problem, exc.fix))
    local = _local_model_path(recipe) if check_sources and not problems else None
    if local is not None:
        try:
            check_lora_targets(recipe, local)
        except AuditError as exc:
            problems.append((exc.problem, exc.fix))
    if recipe.parent and not (Path(recipe.parent) / LAYOUT.report).is_file():
        problems.append((f"parent {recipe.parent} is not a finished run directory (no report.json)",
                         "set parent= to a run directory that `audit run` completed"))
    gate_errors, gate_notes = gate_problems(list(recipe.gates), plan)
    notes.append(f"exposure: at most {plan.exposure_max:.2f} bits against {plan.exposure_references} sampled references"
                 + (f"; whole space {plan.space_bits:.2f} bits" if plan.space_bits is not None else ""))
    notes += gate_notes
    problems += [(p, GATE_FIX) for p in gate_errors]
    if problems:
        if len(problems) == 1:
            raise AuditError(f"recipe '{recipe.name}' cannot run as written: {problems[0][0]}", fix=problems[0][1])
        listed = "; ".join(f"({i}) {p}" for i, (p, _) in enumerate(problems, 1))
        fixes = "; ".join(f"({i}) {f}" for i, (_, f) in enumerate(problems, 1))
        raise AuditError(f"recipe '{recipe.name}' cannot run as written, {len(problems)} problems: {listed}", fix=fixes)
    if recipe.gates:
        notes.append(f"gates: {len(recipe.gates)} checked; each can be met by a run of this recipe")
    return notes


MAX_TARGET_EPSILON = 64.0
"""Targets above this are refused: Opacus' noise search for eps = 1000 ran over 20 minutes and 4.9 GB (measured)."""


def check_dp_settings(settings: DPSettings | DPSection, n_records: int) -> None:
    """One-line :class:`AuditError` for the first setting that would make DP training's guarantee wrong or meaningless.

    Here, not in :mod:`audit.train.dp`, because the recipe is checked before training: the ground truth calls it
    once the injected record count n is known (delta < 1/n), and the DP trainer calls it again on what it is given."""
    if (settings.epsilon is None) == (settings.noise_multiplier is None):
        raise AuditError("training.dp needs exactly one of epsilon and noise_multiplier",
                         fix="set training.dp.epsilon=4 (noise solved for it) or training.dp.noise_multiplier=1.0")
    if settings.epsilon is not None and not (settings.epsilon > 0 and math.isfinite(settings.epsilon)):
        raise AuditError(f"training.dp.epsilon must be a positive number, got {settings.epsilon}",
                         fix="choose a target such as training.dp.epsilon=4")
    if settings.epsilon is not None and settings.epsilon > MAX_TARGET_EPSILON:
        raise AuditError(f"training.dp.epsilon={settings.epsilon:g} is beyond {MAX_TARGET_EPSILON:g}: no meaningful "
                         "guarantee, and solving the noise for it did not finish in 20 minutes (eps = 1000, PRV)",
                         fix="set training.dp.noise_multiplier directly (e.g. 0.3) for a weakly private run")
    if settings.noise_multiplier is not None and not settings.noise_multiplier > 0:
        raise AuditError(f"training.dp.noise_multiplier must be > 0, got {settings.noise_multiplier}",
                         fix="use a noise multiplier such as 1.0 (larger is more private)")
    if n_records < 1:
        raise AuditError("DP training needs at least one training record", fix="check the corpus section")
    if not 0 < settings.delta < 1 / n_records:
        raise AuditError(f"training.dp.delta={settings.delta:g} must lie in (0, 1/n) = (0, {1 / n_records:.3g}) for "
                         f"{n_records} training records: a delta of 1/n allows releasing one record outright",
                         fix=f"set training.dp.delta={10 ** math.floor(math.log10(0.1 / n_records)):g} or smaller")
    if not settings.max_grad_norm > 0:
        raise AuditError(f"training.dp.max_grad_norm must be > 0, got {settings.max_grad_norm}",
                         fix="use a clipping norm such as 1.0")
    if settings.accountant not in ("prv", "rdp"):
        raise AuditError(f"unknown accountant {settings.accountant!r}", fix="use training.dp.accountant=prv or rdp")
