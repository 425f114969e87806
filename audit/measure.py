"""``audit measure``: audit a model someone else trained, against the canaries ``audit inject`` planted.

    audit inject tiny/lora_cpu --out gt                        # canaries + injected set (gt/train.jsonl, gt/train_dataset/)
    python my_trainer.py gt/train_dataset out/                 # your own training, anywhere
    audit measure gt --model out/                              # a full fine-tune (or merged weights)
    audit measure gt --adapter out/adapter                     # a PEFT adapter on the base inject recorded
    audit measure runs/<run> --adapter runs/<run>/adapter      # measure an audit run's weights again

The ground-truth directory is what ``audit inject`` writes (``recipe.yaml``, ``inject.json``, ``canaries.jsonl`` +
``canaries.meta.json``, ``manifest.json``) or an earlier run directory. The tuned model comes from an
:class:`audit.origin.ExternalModel`: the pipeline is the one ``audit run`` runs (:func:`audit.pipeline.run_origin`),
with the train stage replaced by loading the weights given, so the run directory, report, gates and MLflow run are
the same as an ``audit run``'s and ``audit gate / report / compare`` read it unchanged.

Checked before anything is written (one line each, exit 2): the ground-truth files are there and its canaries match
its manifest; the audit key in use is the one it was made with; the tuned model's tokenizer is the base's (vocabulary
and merges compared by hash, not by object); the tuned weights are not the base's ("nothing was trained"). When the
run starts, the injection is drawn again from the recorded recipe and must reproduce ``manifest.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.errors import AuditError
from audit.schema import Recipe

GROUND_TRUTH_FILES = ("recipe.yaml", "canaries.jsonl", "canaries.meta.json", "manifest.json")
MEASURE_SECTIONS = ("name", "description", "scoring", "gates", "tracking", "output", "outputs", "expected")
"""Recipe sections ``key=value`` overrides may change: how the model is measured and reported. The others (model,
canaries, corpus, seed, training) shaped the ground truth; the base is changed with ``--base``."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class GroundTruthDir:
    """A ground-truth directory, read and checked: its recipe, the base it records, its key id and manifest hash."""

    path: Path
    recipe: Recipe
    base_source: str
    base_fingerprint: str | None
    """The base's weights fingerprint when the directory was made (None when it did not record one)."""
    key_id: str | None
    manifest_sha256: str
    canaries: Any
    """The :class:`~audit.schema.CanarySet` of ``canaries.jsonl`` + ``canaries.meta.json`` (matches the manifest)."""


def read_ground_truth_dir(path: str | Path) -> GroundTruthDir:
    """Read ``path`` (``audit inject`` output or a run directory); missing files, canaries that do not match the
    manifest, or a further tune's run (measure against its chain's first run) are one-line errors."""
    from audit.config import read_yaml, validate_recipe
    from audit.ground_truth import read_canary_set
    from audit.origin import recorded_key_id
    from audit.schema import InjectionManifest

    gt = Path(path).expanduser()
    if not gt.is_dir():
        raise AuditError(f"ground-truth directory {path} does not exist or is not a directory",
                         fix="give the --out directory of `audit inject`, or a run directory")
    missing = [name for name in GROUND_TRUTH_FILES if not (gt / name).is_file()]
    if missing:
        raise AuditError(f"{gt} is not a ground-truth directory: {', '.join(missing)} missing",
                         fix="give the --out directory of `audit inject` (of this version), or a run directory")
    gt = gt.resolve()
    try:
        manifest = InjectionManifest.model_validate_json((gt / "manifest.json").read_text(encoding="utf-8"))
    except ValueError:
        raise AuditError(f"{gt}/manifest.json is not an injection manifest", fix="use an unmodified ground-truth directory") from None
    canaries = read_canary_set(gt)
    if canaries is None or canaries.sha256() != manifest.canary_set_sha256:
        found = "none" if canaries is None else canaries.sha256()[:12]
        raise AuditError(f"the canaries in {gt}/canaries.jsonl do not match its manifest.json (canary-set hash {found} != "
                         f"{manifest.canary_set_sha256[:12]})", fix="use an unmodified ground-truth directory")
    recipe = validate_recipe(read_yaml(gt / "recipe.yaml"), source=str(gt / "recipe.yaml"))
    if recipe.parent:
        raise AuditError(f"{gt} is a further tune of {recipe.parent}: its canaries were planted in the chain's first run",
                         fix="measure against the chain's first run directory")
    base_source, base_fp = recipe.model.source, None
    inject = _read_json(gt / "inject.json")
    if inject:
        base_source = inject.get("base", {}).get("source", base_source)
        base_fp = inject.get("base", {}).get("fingerprint")
    elif (report := _read_json(gt / "report.json")):
        base_fp = report.get("model", {}).get("fingerprint")
    return GroundTruthDir(path=gt, recipe=recipe, base_source=base_source, base_fingerprint=base_fp,
                          key_id=recorded_key_id(gt), manifest_sha256=manifest.sha256(), canaries=canaries)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measure_recipe(gt: GroundTruthDir, *, base: str | None = None, adapter: Any = None, overrides: Sequence[str] = (),
                   out_root: str | Path | None = None) -> Recipe:
    """The recipe the measurement runs under: the ground truth's, with the base given, ``training.method`` saying what
    was given (``lora`` for an adapter, else ``full``), the name suffixed ``-measure`` and the overrides applied."""
    from audit.config import apply_overrides, parse_override, validate_recipe

    for item in overrides:
        keys, _ = parse_override(item)
        if keys[0] not in MEASURE_SECTIONS:
            hint = "pass --base SOURCE" if keys[0] == "model" else "inject again with that setting and retrain"
            raise AuditError(f"override '{item}': '{keys[0]}' shaped the ground truth in {gt.path} and cannot change "
                             "when measuring", fix=f"override only {', '.join(MEASURE_SECTIONS)}; to change it, {hint}")
    data = gt.recipe.model_dump(mode="json")
    data["name"] = f"{data['name'][:92]}-measure"
    if base is not None:
        data["model"] = {**data["model"], "source": str(base), "revision": None}
    else:
        data["model"] = {**data["model"], "source": gt.base_source}
    data["training"] = {**data["training"], "method": "lora" if adapter is not None else "full"}
    if out_root is not None:
        data["output"] = {**data.get("output", {}), "root": str(out_root)}
    return validate_recipe(apply_overrides(data, list(overrides)), source=f"{gt.path}/recipe.yaml with the measure overrides")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over what maps text to ids: the vocabulary (added tokens included) and, for BPE, the merges."""
    from audit.schema import sha256_json

    merges = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        merges = json.loads(backend.to_str()).get("model", {}).get("merges")
    return sha256_json({"vocab": sorted(tokenizer.get_vocab().items()), "merges": merges})


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _check_adapter(path: Path) -> Path:
    if not path.is_dir() or not (path / "adapter_config.json").is_file():
        raise AuditError(f"--adapter {path} is not a PEFT adapter directory (no adapter_config.json)",
                         fix="give the folder model.save_pretrained() wrote for the PEFT model")
    if not (path / "adapter_model.safetensors").is_file():
        raise AuditError(f"adapter {path} has no adapter_model.safetensors; pickle weights are refused",
                         fix="save the adapter with safe_serialization=True")
    return path.resolve()


def _adapter_is_untrained(path: Path) -> bool:
    """Every LoRA ``B`` matrix is zero: PEFT's initialisation, an adapter that changes nothing."""
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if "lora_B" in k]  # noqa: SIM118 - safe_open has no __iter__
        return bool(keys) and all(not f.get_tensor(k).any() for k in keys)


def _count_tensors(path: Path) -> int:
    """Number of values in the safetensors files of ``path`` (an adapter's trainable parameters), read from headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total


def external_origin(gt: GroundTruthDir, recipe: Recipe, *, model: str | Path | None, adapter: str | Path | None,
                    base_given: bool, progress: bool = False) -> Any:
    """An :class:`audit.origin.ExternalModel` for the weights given, every check done (nothing is written)."""
    from audit.canaries.generate import check_ids
    from audit.ground_truth import load_tokenizer
    from audit.models import fingerprint_safetensors_dir, resolve_model
    from audit.origin import ExternalModel, run_key
    from audit.train.types import WeightsLayer

    key = run_key(recipe, expected=[(f"ground-truth directory {gt.path}", gt.key_id)])
    check_ids(gt.canaries, key)  # every secret the one its keyed id was made from (the set hash leaves secrets out)
    flags = dict(allow_pickle=recipe.model.allow_pickle, trust_remote_code=recipe.model.trust_remote_code)
    base = resolve_model(recipe.model.source, revision=recipe.model.revision, progress=progress, **flags)
    base_fp = base.provenance.get("weights_fingerprint") or fingerprint_safetensors_dir(base.path)
    if not base_given and gt.base_fingerprint and base_fp != gt.base_fingerprint:
        raise AuditError(f"the base {recipe.model.source} is no longer the model {gt.path} was made with (fingerprint "
                         f"{base_fp[:12]} != {gt.base_fingerprint[:12]})",
                         fix="pass --base SOURCE to measure against another base on purpose")
    if model is None and adapter is None:
        raise AuditError("no tuned model given", fix="pass --model DIR (a full fine-tune or merged model) or --adapter DIR")
    layers: list[WeightsLayer] = []
    details: dict[str, Any] = {"base": recipe.model.source, "base_fingerprint": base_fp}
    tokenizer_dirs: list[Path] = []
    model_fp = base_fp
    if model is not None and (adapter is None or str(model) != recipe.model.source):
        tuned = resolve_model(str(model), progress=progress, **flags)
        model_fp = tuned.provenance.get("weights_fingerprint") or fingerprint_safetensors_dir(tuned.path)
        layers.append(WeightsLayer("full", tuned.path))
        details.update(model=str(model), model_path=str(tuned.path), model_fingerprint=model_fp)
        tokenizer_dirs.append(tuned.path)
    trainable = 0
    if adapter is not None:
        adapter_dir = _check_adapter(Path(adapter).expanduser())
        layers.append(WeightsLayer("lora", adapter_dir))
        details["adapter"] = str(adapter_dir)
        tokenizer_dirs.append(adapter_dir)
        weights_fp = fingerprint_safetensors_dir(adapter_dir)
        trainable = _count_tensors(adapter_dir)
        if model_fp == base_fp and _adapter_is_untrained(adapter_dir):
            raise AuditError(f"nothing was trained: every LoRA B matrix of {adapter_dir} is zero (PEFT's initialisation), "
                             "so the tuned model is the base", fix="give the adapter saved after training")
    else:
        weights_fp = model_fp
    if model_fp == base_fp and adapter is None:
        raise AuditError(f"nothing was trained: {model} has the base's weights (fingerprint {base_fp[:12]})",
                         fix="give the directory your training saved (trainer.save_model(DIR)), not the base")
    base_tok = tokenizer_fingerprint(load_tokenizer(base.path, trust_remote_code=recipe.model.trust_remote_code))
    details["tokenizer_fingerprint"] = base_tok
    for where in tokenizer_dirs:
        if not _has_tokenizer(where):
            continue
        found = tokenizer_fingerprint(load_tokenizer(where, trust_remote_code=recipe.model.trust_remote_code))
        if found != base_tok:
            raise AuditError(f"the tokenizer saved in {where} differs from the base's ({recipe.model.source}): vocabulary or "
                             f"merges hash {found[:12]} != {base_tok[:12]}, so the canaries' token ids would differ",
                             fix="train on the base's tokenizer unchanged (no added tokens), or pass --base with the model "
                                 "whose tokenizer it is")
    return ExternalModel(recipe=recipe, ground_truth_dir=gt.path, tuned_layers=tuple(layers), weights_fingerprint=weights_fp,
                         manifest_sha256=gt.manifest_sha256, key=key, details=details, trainable_params=trainable)


def measure_run(
    ground_truth_dir: str | Path,
    *,
    model: str | Path | None = None,
    adapter: str | Path | None = None,
    base: str | None = None,
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
    tracking: bool | None = None,
    progress: bool = True,
    out_root: str | Path | None = None,
) -> Any:
    """Score the base and the tuned model on the canaries of ``ground_truth_dir`` and write a normal run directory.

    ``model``: the tuned model (a merged model directory or a model source); with ``adapter`` (a PEFT adapter
    directory) the model the adapter is put on, default the base. ``base``: the pretrained model the canaries are
    measured against (default: the one ``audit inject`` recorded). ``overrides``: ``key=value`` recipe overrides
    (scoring, gates, tracking, output; not what shaped the ground truth). ``out_root``: where the run directory goes
    (default the recipe's ``output.root``). Returns an :class:`audit.pipeline.AuditResult`; bad input raises
    :class:`audit.errors.AuditError` before anything is written.
    """
    from audit.pipeline import run_origin
    from audit.validate import check_gates

    gt = read_ground_truth_dir(ground_truth_dir)
    recipe = measure_recipe(gt, base=base, adapter=adapter, overrides=overrides, out_root=out_root)
    check_gates(recipe)  # a gate no run can pass would fail after all the scoring: refused now
    origin = external_origin(gt, recipe, model=model, adapter=adapter, base_given=base is not None, progress=progress)
    return run_origin(origin, tracking_uri=tracking_uri, tracking=tracking, progress=progress)


def resume_origin(recipe: Recipe, run_dir: Path) -> Any:
    """The :class:`~audit.origin.ExternalModel` of an interrupted ``audit measure`` (``audit run --resume``), from its
    ``external.json``, checked again as when it started (the weights must still have the recorded fingerprint)."""
    from audit.origin import EXTERNAL_FILE

    record = _read_json(run_dir / EXTERNAL_FILE)
    try:
        gt = read_ground_truth_dir(record["ground_truth_dir"])
        model, adapter = record.get("model"), record.get("adapter")
    except KeyError:
        raise AuditError(f"{run_dir}/{EXTERNAL_FILE} is damaged", fix="start a new `audit measure`") from None
    origin = external_origin(gt, recipe, model=model, adapter=adapter, base_given=True, progress=False)
    if origin.weights_fingerprint != record.get("weights_fingerprint"):
        raise AuditError(f"the weights {run_dir} measured changed since (fingerprint {origin.weights_fingerprint[:12]} != "
                         f"{str(record.get('weights_fingerprint'))[:12]})", fix="start a new `audit measure`")
    return origin
