"""Reading a ground-truth directory, and checking a model trained elsewhere, for :class:`audit.pipeline.origin.ExternalModel`.

Pure checks with one-line errors, no run directory, no MLflow: :func:`read_ground_truth_dir` (the files, canaries
against manifest: the one reader of a ground-truth directory, for ``audit measure``, the Trainer callback and a further
tune's parent runs), :func:`measure_recipe` (the recipe a measurement runs under), :func:`check_external_weights`
(the tuned model given: safetensors, shapes, tokenizer, "nothing was trained"). It imports neither
:mod:`audit.pipeline.origin` nor
:mod:`audit.pipeline`, so :func:`audit.pipeline.origin.origin_for` can rebuild a measurement on resume without an import cycle.
``audit measure`` itself is :mod:`audit.pipeline.measure`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audit.core.errors import AuditError, check_readable
from audit.core.layout import LAYOUT
from audit.core.schema import CanarySet, InjectionManifest, Recipe

if TYPE_CHECKING:
    from audit.core.keys import AuditKey

GROUND_TRUTH_FILES = (LAYOUT.recipe, LAYOUT.canaries, LAYOUT.canaries_meta, LAYOUT.manifest)
MEASURE_SECTIONS = ("name", "description", "scoring", "gates", "tracking", "output", "outputs", "expected")
"""Recipe sections ``key=value`` overrides may change: how the model is measured and reported. The others (model,
canaries, corpus, seed, training) shaped the ground truth; the base is changed with ``--base``."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class GroundTruthDir:
    """A ground-truth directory, read and checked: its recipe, manifest and canaries, the base it records."""

    path: Path
    recipe: Recipe
    base_source: str
    base_fingerprint: str | None
    """The base's weights fingerprint when the directory was made (None when it did not record one)."""
    manifest: InjectionManifest
    canaries: CanarySet | None
    """The set of ``canaries.jsonl`` + ``canaries.meta.json`` (matches the manifest); None only for a chain's run
    written before ``canaries.meta.json`` existed (``chain_run=True``), whose set can only be drawn again."""
    rows: list[dict[str, Any]]
    """``canaries.jsonl`` as stored, one JSON object a row (what a further tune's canaries must equal, row for row)."""

    @property
    def manifest_sha256(self) -> str:
        return self.manifest.sha256()


GROUND_TRUTH_FIX = ("give the directory `audit inject --out` or inject_canaries(out=...) wrote (of this version), or a run "
                    "directory")


def read_ground_truth_dir(path: str | Path, *, chain_run: bool = False) -> GroundTruthDir:
    """Read ``path`` (``audit inject`` / ``inject_canaries`` output, or a run directory): the one reader of a
    ground-truth directory, for ``audit measure``, the Trainer callback and a further tune's parent runs.

    Missing files and canaries that do not match the manifest are one-line errors, and so, unless ``chain_run``, is a
    further tune's run (measure against its chain's first run, where the canaries were planted). ``chain_run``: a run
    of a chain read by a further tune, which may be a further tune itself, or written before ``canaries.meta.json``
    existed (then ``canaries`` is None, and the set is drawn again from the recipe)."""
    from audit.core.config import read_yaml, validate_recipe
    from audit.data.ground_truth import read_canary_set

    gt = Path(path).expanduser()
    if not gt.is_dir():
        raise AuditError(f"ground-truth directory {path} does not exist or is not a directory", fix=GROUND_TRUTH_FIX)
    required = [name for name in GROUND_TRUTH_FILES if not (chain_run and name == LAYOUT.canaries_meta)]
    missing = [name for name in required if not (gt / name).is_file()]
    if missing:
        raise AuditError(f"{gt} is not a ground-truth directory: {', '.join(missing)} missing", fix=GROUND_TRUTH_FIX)
    gt = gt.resolve()
    for name in (*GROUND_TRUTH_FILES, LAYOUT.inject, LAYOUT.report):  # what records the base's fingerprint, if there
        if (gt / name).is_file():
            check_readable(gt / name, fix=f"let this user read it (chmod u+r {gt / name}), or measure as its owner")
    try:
        manifest = InjectionManifest.model_validate_json((gt / LAYOUT.manifest).read_text(encoding="utf-8"))
    except ValueError:
        raise AuditError(f"{gt}/manifest.json is not an injection manifest",
                         fix="use an unmodified ground-truth directory") from None
    canaries = read_canary_set(gt)
    if (canaries is None and not chain_run) or (canaries is not None and canaries.sha256() != manifest.canary_set_sha256):
        found = "none" if canaries is None else canaries.sha256()[:12]
        raise AuditError(f"the canaries in {gt}/canaries.jsonl do not match its manifest.json (canary-set hash {found} != "
                         f"{manifest.canary_set_sha256[:12]})", fix="use an unmodified ground-truth directory")
    rows = [json.loads(line) for line in (gt / LAYOUT.canaries).read_text(encoding="utf-8").splitlines() if line]
    recipe = validate_recipe(read_yaml(gt / LAYOUT.recipe), source=str(gt / LAYOUT.recipe))
    if recipe.parent and not chain_run:
        raise AuditError(f"{gt} is a further tune of {recipe.parent}: its canaries were planted in the chain's first run",
                         fix="measure against the chain's first run directory")
    base_source, base_fp = recipe.model.source, None
    inject = _read_json(gt / LAYOUT.inject)
    if inject:
        base_source = inject.get("base", {}).get("source", base_source)
        base_fp = inject.get("base", {}).get("fingerprint")
    elif (report := _read_json(gt / LAYOUT.report)):
        base_fp = report.get("model", {}).get("fingerprint")
    return GroundTruthDir(path=gt, recipe=recipe, base_source=base_source, base_fingerprint=base_fp, manifest=manifest,
                          canaries=canaries, rows=rows)


def exposure_references(gt: GroundTruthDir, *, tokenizer: Any, key: AuditKey | None) -> list[str]:
    """The exposure references of ``gt``'s canaries, drawn again with ``tokenizer`` before any run directory exists (the
    Trainer callback scores a live model with them). They are never stored: a function of the seed, the audit key and
    the canary set (:func:`audit.data.canaries.reference_secrets`), drawn as :func:`audit.data.ground_truth.prepare_ground_truth`
    draws them, so a curve point ranks against the references the final audit ranks against."""
    from audit.data.canaries import GenerationContext, load_spec, reference_secrets
    from audit.data.ground_truth import draw_canaries

    recipe, canaries = gt.recipe, gt.canaries
    assert canaries is not None, "read without chain_run: canaries.meta.json is there"
    spec = load_spec(recipe.canaries.spec, recipe.canaries.params)
    context = GenerationContext(tokenizer=tokenizer)
    if not canaries.space.enumerable:  # a sampled space's references follow the canary draw in the same context
        draw_canaries(recipe, spec, context=context, seed=canaries.seed, key=key, stored=canaries)
    return reference_secrets(spec, canaries, n=recipe.scoring.exposure_references, seed=canaries.seed, context=context,
                             key=key)


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
    from audit.core.config import apply_overrides, parse_override, validate_recipe

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
    from audit.core.schema import sha256_json

    merges = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        merges = json.loads(backend.to_str()).get("model", {}).get("merges")
    return sha256_json({"vocab": sorted(tokenizer.get_vocab().items()), "merges": merges})


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _check_adapter(path: Path) -> Path:
    """A PEFT adapter folder whose files this process can read, with whole safetensors weights."""
    from audit.data.models import check_safetensors_complete

    if not path.is_dir() or not (path / "adapter_config.json").is_file():
        raise AuditError(f"--adapter {path} is not a PEFT adapter directory (no adapter_config.json)",
                         fix="give the folder model.save_pretrained() wrote for the PEFT model")
    if not (path / "adapter_model.safetensors").is_file():
        raise AuditError(f"adapter {path} has no adapter_model.safetensors; pickle weights are refused",
                         fix="save the adapter with safe_serialization=True")
    config = path / "adapter_config.json"
    check_readable(config, fix=f"let this user read it (chmod u+r {config})")
    check_safetensors_complete(path / "adapter_model.safetensors")
    return path.resolve()


def _read_config(path: Path) -> dict[str, Any]:
    """``path`` (a config.json or adapter_config.json) as a dict; unreadable or not a JSON object is one line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditError(f"{path} is unreadable ({str(exc).splitlines()[0]})", fix="give an unmodified model folder") from None
    if not isinstance(data, dict):
        raise AuditError(f"{path} is not a JSON object", fix="give an unmodified model folder")
    return data


TIED_OUTPUT = "lm_head"
"""The output layer: a model that ties it to the input embeddings saves no tensor for it, so its absence on one side
is no difference in shape."""
PEFT_PREFIX = "base_model.model."
PEFT_WRAPPERS = ("base_layer", "token_adapter")
"""Parts PEFT adds to a module's name when it wraps it (LoRA on an embedding, trainable tokens); the module's own
tensor is the name without them."""
LORA_FACTORS = {"lora_A.weight": 1, "lora_B.weight": 0, "lora_embedding_A": 1, "lora_embedding_B": 0}
"""The LoRA factor tensors PEFT saves, and which of their axes must equal the adapted layer's: ``A`` is
``[r, inputs]``, ``B`` is ``[outputs, r]`` (an embedding's ``A`` is ``[r, rows]``, its ``B`` ``[dim, r]``)."""


def _tied_output(tensor: str) -> bool:
    return tensor.rsplit(".", 1)[0].split(".")[-1] == TIED_OUTPUT


@dataclass(frozen=True)
class Vocabulary:
    """The base's embedding rows, and how many a canary spec adds (``new_tokens``): the run puts rows for them on the
    base before the tuned weights (:func:`audit.data.models.extend_vocabulary`), so a tuned embedding may have up to that
    many more."""

    rows: int
    added: int = 0

    def same(self, found: int, expected: int) -> bool:
        return found == expected or (expected == self.rows and expected < found <= expected + self.added)

    def fits(self, found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
        return len(found) == len(expected) and all(self.same(f, e) for f, e in zip(found, expected, strict=True))


def vocabulary(recipe: Recipe, base: Path) -> Vocabulary:
    """:class:`Vocabulary` of ``base`` (its config's ``vocab_size``) under the recipe's canary spec."""
    from audit.data.canaries import added_tokens, load_spec

    rows = _read_config(base / "config.json").get("vocab_size")
    return Vocabulary(rows=rows if isinstance(rows, int) else -1,
                      added=len(added_tokens(load_spec(recipe.canaries.spec, recipe.canaries.params))))


def check_same_shape(tuned: Path, base: Path, *, tuned_name: str, base_name: str, vocab: Vocabulary) -> None:
    """``tuned`` has the base's architecture (config ``model_type`` and ``architectures``) and every tensor of the
    base under the same name with the same shape, read from the safetensors headers (nothing is loaded). A model of
    another shape that happens to share the base's tokenizer would otherwise be scored and labelled its fine-tune."""
    from audit.data.models import tensor_shapes

    fix = (f"give weights fine-tuned from {base_name} (same architecture and tensor shapes), or pass --base with the "
           "model they were fine-tuned from")
    mine, theirs = _read_config(tuned / "config.json"), _read_config(base / "config.json")
    kinds = [(c.get("model_type"), c.get("architectures")) for c in (mine, theirs)]
    if kinds[0] != kinds[1]:
        (m_type, m_arch), (b_type, b_arch) = kinds
        raise AuditError(f"--model {tuned_name} is not a fine-tune of the base {base_name}: it is a {m_type} model "
                         f"({', '.join(m_arch or ['?'])}), the base a {b_type} model ({', '.join(b_arch or ['?'])})", fix=fix)
    found, expected = tensor_shapes(tuned), tensor_shapes(base)
    for name in sorted(set(found) | set(expected)):
        if name not in found and not _tied_output(name):
            why = f"it has no tensor {name}, which the base has ({list(expected[name])})"
        elif name not in expected and not _tied_output(name):
            why = f"it has a tensor {name} ({list(found[name])}), which the base does not"
        elif name in found and name in expected and not vocab.fits(found[name], expected[name]):
            why = f"its tensor {name} is {list(found[name])}, the base's {list(expected[name])}"
        else:
            continue
        raise AuditError(f"--model {tuned_name} is not a fine-tune of the base {base_name}: {why}", fix=fix)


def check_adapter_fits(adapter: Path, below: Path, *, below_name: str, vocab: Vocabulary) -> None:
    """Every tensor of the adapter fits the model it is put on (``below``), from the safetensors headers: each LoRA
    factor matches the layer it adapts (inputs for ``A``, outputs for ``B``), each saved whole module (PEFT's
    ``modules_to_save``, embedding base layers) matches the model's. Refused here, before the run directory: PEFT
    finds it only when it loads the adapter, after the base was scored."""
    from audit.data.models import tensor_shapes

    config = _read_config(adapter / "adapter_config.json")
    layers = tensor_shapes(below)
    for key, shape in sorted(tensor_shapes(adapter).items()):
        why = _misfit(key, shape, layers, below_name=below_name, vocab=vocab,
                      fan_in_fan_out=bool(config.get("fan_in_fan_out")))
        if why:
            made_for = config.get("base_model_name_or_path") or "another model"
            raise AuditError(f"--adapter {adapter} was made for {made_for}, not for {below_name}: {why}",
                             fix=f"give an adapter trained on {below_name}, or pass --base (or --model) with the model it "
                                 "was trained on")


def _misfit(key: str, shape: tuple[int, ...], layers: dict[str, tuple[int, ...]], *, below_name: str, vocab: Vocabulary,
            fan_in_fan_out: bool) -> str | None:
    """Why the adapter tensor ``key`` does not fit ``below_name``, a model of tensors ``layers``, or None. Tensors of
    other PEFT kinds (trainable tokens' deltas, DoRA magnitudes) are left to PEFT's load."""
    name = key.removeprefix(PEFT_PREFIX)
    factor = next((f for f in LORA_FACTORS if name.endswith(f".{f}")), None)
    if factor is not None:
        module = name.removesuffix(f".{factor}")
        target = layers.get(f"{module}.weight")
        if target is None:
            return None if _tied_output(f"{module}.weight") else f"it adapts {module}, which {below_name} does not have"
        if len(target) != 2 or len(shape) != 2:  # a convolution: PEFT checks it when it loads
            return None
        axis = LORA_FACTORS[factor]
        # nn.Linear is [out, in]; an embedding [rows, dim] and GPT-2's Conv1D (fan_in_fan_out) [in, out]
        flipped = factor.startswith("lora_embedding") or fan_in_fan_out
        if vocab.same(shape[axis], target[1 - axis if flipped else axis]):
            return None
        return f"{key} is {list(shape)}, which does not fit {module}.weight {list(target)} of {below_name}"
    if not name.endswith((".weight", ".bias")):
        return None
    plain = ".".join(part for part in name.split(".") if part not in PEFT_WRAPPERS)  # a whole module saved with it
    target = layers.get(plain)
    if target is None:
        return None if _tied_output(plain) else f"it holds {plain}, which {below_name} does not have"
    return None if vocab.fits(shape, target) else f"its {plain} is {list(shape)}, the one of {below_name} {list(target)}"


def _adapter_is_untrained(path: Path) -> bool:
    """Every LoRA ``B`` matrix is zero: PEFT's initialisation, an adapter that changes nothing."""
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if "lora_B" in k]  # noqa: SIM118 - safe_open has no __iter__
        return bool(keys) and all(not f.get_tensor(k).any() for k in keys)


def _count_tensors(path: Path) -> int:
    """Number of values in the safetensors files of ``path`` (an adapter's trainable parameters), read from headers."""
    from audit.data.models import tensor_shapes

    return sum(math.prod(shape) for shape in tensor_shapes(path).values())


@dataclass(frozen=True)
class CheckedWeights:
    """The tuned model given, checked: what to put on the base, in order, and what the run records of it."""

    layers: tuple[Any, ...]
    """:class:`~audit.train.types.WeightsLayer` s: a ``full`` model replaces the base, a ``lora`` adapter goes on top."""
    fingerprint: str
    """The adapter's fingerprint for a PEFT adapter, else the model's (as ``audit run`` records its weights)."""
    details: dict[str, Any]
    trainable_params: int = 0


def check_external_weights(gt: GroundTruthDir, recipe: Recipe, *, model: str | Path | None, adapter: str | Path | None,
                           base_given: bool, progress: bool = False) -> CheckedWeights:
    """Resolve and check the tuned model given (nothing is loaded but tokenizers, nothing is written but the cached
    fp32 copy of a GGUF file, :func:`audit.pipeline.release.gguf_file.fp32_model_dir`): safetensors or GGUF only, the base
    unchanged since the ground truth was made (unless ``base_given``), a tokenizer equal to the base's (a GGUF file's
    from its metadata), weights that differ from the base's."""
    from audit.data.ground_truth import load_tokenizer
    from audit.data.models import fingerprint_safetensors_dir, resolve_model
    from audit.pipeline.release.gguf_file import fp32_model_dir, is_gguf_path
    from audit.train.types import WeightsLayer

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
    below, below_name = base.path, recipe.model.source  # what an adapter goes on
    vocab = vocabulary(recipe, base.path)
    if model is not None and (adapter is None or str(model) != recipe.model.source):
        def same_shape(path: Path) -> None:
            check_same_shape(path, base.path, tuned_name=str(model), base_name=recipe.model.source, vocab=vocab)

        if is_gguf_path(model):  # a release (llama.cpp's format): dequantized into fp32 once, cached by its sha256
            tuned = fp32_model_dir(model, check=same_shape, progress=progress)
            details.update(gguf_file=tuned.provenance["gguf_file"], gguf_sha256=tuned.provenance["gguf_sha256"],
                           gguf_type=tuned.provenance["gguf_type"])
        else:
            tuned = resolve_model(str(model), progress=progress, **flags)
            same_shape(tuned.path)
        below, below_name = tuned.path, str(model)
        model_fp = tuned.provenance.get("weights_fingerprint") or fingerprint_safetensors_dir(tuned.path)
        layers.append(WeightsLayer("full", tuned.path))
        source = tuned.provenance.get("gguf_file") or (str(tuned.path) if tuned.kind == "local" else str(model))
        details.update(model=source, model_path=str(tuned.path),
                       model_fingerprint=model_fp)  # a local path absolute: a resume may start from another folder
        tokenizer_dirs.append(tuned.path)
    trainable = 0
    if adapter is not None:
        adapter_dir = _check_adapter(Path(adapter).expanduser())
        check_adapter_fits(adapter_dir, below, below_name=below_name, vocab=vocab)
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
    return CheckedWeights(layers=tuple(layers), fingerprint=weights_fp, details=details, trainable_params=trainable)
