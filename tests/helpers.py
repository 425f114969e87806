"""Helpers shared by several test modules (hand-made reports and run directories, score rows, a fake sampler, works
folders, a killed subprocess run, a short SFT). Test modules import from here, never from each other
(tests/test_suite_layout.py checks that): importing a test module runs its module-level code again under a second
name (``tests.test_works`` beside pytest's ``test_works``), and turns its private helpers into an API that nobody
editing that module can see."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from audit.cli import main
from audit.core.layout import LAYOUT
from audit.core.schema import (
    AuditReport,
    CanariesSummary,
    GateResult,
    LineageNode,
    ModelInfo,
    PreflightSummary,
    SequenceScore,
    TierSummary,
    TrainSummary,
)
from audit.core.store import write_jsonl
from audit.data.canaries.base import Sample
from audit.metrics.suite import summarize_metrics
from audit.report import summarize_tiers, write_report
from audit.report.render.token_view import CanaryTokens, build_canary_view

# ----------------------------------------------------------------------------------- reports and run directories


def synthetic_scores(seed: int = 0, *, tiers=(0, 1, 4, 16), per_tier=None) -> list[SequenceScore]:
    """Rows like an audit's: references at the null, exposure and log-prob gains growing with repetitions."""
    rng = np.random.default_rng(seed)
    per_tier = per_tier or {0: 6, 1: 2, 4: 2, 16: 2}
    rows = []
    for reps in tiers:
        for i in range(per_tier[reps]):
            cid = f"c{reps:02d}{i:02d}"
            base_loss = 6.0 + rng.normal(0, 0.2)
            for model in ("base", "tuned"):
                gain = 0.0 if model == "base" else math.log2(1 + reps) * 1.5 + rng.normal(0, 0.3)
                loss = max(0.05, base_loss - (gain * 0.6 if model == "tuned" else 0.0))
                rank = max(1, int(rng.integers(1, 257) / (2 ** gain)))
                rows.append(SequenceScore(
                    canary_id=cid, model=model, repetitions=reps, secret_tokens=6,
                    secret_nll_bits=round(6 * loss / math.log(2), 4), rank=rank, n_references=255,
                    exposure=round(8 - math.log2(rank), 4), extracted=model == "tuned" and reps == 16 and i == 0,
                    mia_loss=round(loss, 4), mia_min_k=round(-loss * 1.1, 4), mia_min_k_pp=round(-loss / 3, 4),
                    mia_zlib=round(-loss / 12, 4), exposure_method="sampled", exposure_space=round(8 - math.log2(rank), 4),
                    secret_utf8_bits=48,
                ))
    return rows


def hand_canaries() -> CanariesSummary:
    """The canaries section of both hand-made reports: 6 digit members in tiers 1, 4, 16 and 6 references."""
    return CanariesSummary(spec="digits", spec_version=1, members=6, references=6, tiers=[1, 4, 16],
                           canary_set_sha256="d" * 64, space="product", space_bits=19.932, works=0,
                           exposure_references=255, corpus_format="text", placement="new_record", placements=42,
                           preflight=PreflightSummary(passed=True, checked=42, canary_tokens_max=46,
                                                      record_tokens_max=48, loss="all tokens (language modeling)"),
                           timings_s={})


def make_report(scores: list[SequenceScore], *, gates: list[GateResult] | None = None) -> AuditReport:
    """A full report over ``scores`` (summarized by the real metric code), with hand-made model, canaries, training."""
    suite = summarize_metrics(scores)
    base = LineageNode(id="base_weights:aaaa", kind="base_weights", label="tiny-llama", fingerprint="a" * 64)
    data = LineageNode(id="data:bbbb", kind="data", label="builtin:notes + digits canaries", fingerprint="b" * 64)
    tuned = LineageNode(id="tuned_weights:cccc", kind="tuned_weights", label="lora fine-tune", fingerprint="c" * 64,
                        parents=[base.id, data.id])
    return AuditReport(
        run_id="tiny-lora-cpu-test", created_at="2026-01-01T00:00:00+00:00",
        recipe={"name": "tiny-lora-cpu", "corpus": {"source": "builtin:notes"}}, recipe_fingerprint="f" * 64, seed=0,
        model=ModelInfo(source="tiny-llama", kind="builtin", path="/models/tiny", fingerprint="a" * 64,
                        provenance={"name": "tiny-llama"}),
        canaries=hand_canaries(),
        manifest_sha256="b" * 64,
        training=TrainSummary(method="lora", steps=210, final_loss=5.7, wall_s=12.0, trainable_params=2048, total_params=200000,
                              device="cpu", precision="fp32", gradient_checkpointing=False, weights_path="adapter",
                              weights_fingerprint="c" * 64),
        space_bits=19.93, exposure_max=8.0, tiers=summarize_tiers(scores), lineage=[base, data, tuned],
        timings_s={"inject": 0.1, "train": 12.0, "total": 20.0}, versions={"python": "3.11", "mlflow": "3"},
        git_revision="0" * 40, gates=gates or [], metrics=suite.metrics, metric_notes=suite.notes,
    )


def make_run_dir(path: Path, *, gates: list[GateResult] | None = None, token_view: bool = True) -> tuple[Path, AuditReport]:
    """A run directory as an audit leaves it (scores, report.json, token view) in seconds, without a model."""
    path.mkdir(parents=True, exist_ok=True)
    scores = synthetic_scores()
    report = make_report(scores, gates=gates)
    write_jsonl(path / "scores.jsonl", scores)
    write_report(report, path / "report.json")
    if token_view:
        base = [CanaryTokens("c1600", 16, ["My", " PIN", " is"], 2, [-3.0, -2.0, -9.0, -8.0])]
        tuned = [CanaryTokens("c1600", 16, ["My", " PIN", " is"], 2, [-2.5, -1.0, -0.2, -0.1])]
        view = build_canary_view(base, tuned)
        (path / LAYOUT.token_view).write_text(json.dumps(view.to_json()))
    return path, report


PASSING = [GateResult(gate="positive control", metric="exposure.mean/rep_16/tuned", value=8.0, n=2, threshold=">= 5",
                      status="pass")]
FAILING = PASSING + [GateResult(gate="single copies stay at the null", metric="exposure.mean/rep_1/tuned", value=6.0, n=2,
                                threshold="<= 5", status="fail", reason="6 > 5")]


def tier_report(tiers: dict[int, tuple[int, float, int]], *, gates: list[dict] | None = None, run_id: str = "r1") -> AuditReport:
    """A hand-made report: ``{repetitions: (n, tuned exposure mean, tuned extracted)}``; base stays at the null."""
    return AuditReport(
        run_id=run_id, created_at="2026-01-01T00:00:00+00:00", recipe={"name": "hand", "gates": gates or []},
        recipe_fingerprint="0" * 64, seed=0,
        model=ModelInfo(source="tiny-llama", kind="builtin", path="/nowhere", fingerprint="f" * 64),
        canaries=hand_canaries(),
        manifest_sha256="m" * 64,
        training=TrainSummary(method="lora", steps=1, final_loss=1.0, wall_s=1.0, trainable_params=1, total_params=2,
                              device="cpu", precision="fp32", gradient_checkpointing=False, weights_path="adapter",
                              weights_fingerprint="w" * 64),
        space_bits=19.93, exposure_max=8.0,
        tiers=[TierSummary(repetitions=r, n=n, exposure_mean={"base": 1.44, "tuned": e}, extracted={"base": 0, "tuned": x})
               for r, (n, e, x) in sorted(tiers.items())],
        lineage=[], timings_s={}, versions={},
    )


# ---------------------------------------------------------------------------------------------------- score rows


def score_row(cid: str, model: str, reps: int, *, loss: float, bits: float, mkpp: float = 0.0, extracted=False, sampled=0):
    return SequenceScore(canary_id=cid, model=model, repetitions=reps, secret_tokens=6, secret_nll_bits=bits, rank=1,
                         n_references=255, exposure=8.0, extracted=extracted, exposure_method="sampled", exposure_space=10.0,
                         exposure_space_low=5.0, exposure_space_high=19.9, mia_loss=loss, mia_min_k=-loss, mia_min_k_pp=mkpp,
                         mia_zlib=-loss / 10, extraction_lcp_tokens=6 if extracted else 0,
                         extraction_ned=0.0 if extracted else 1.0,
                         extracted_from_fraction=extracted, sampled_matches=sampled, sampled_n=4, secret_utf8_bits=48)


PREFIX = [-2.0, -1.0, -3.0, -0.5]  # tokens 1..4 of the text: the template prefix, predicted alike for every canary


def token_row(cid: str, model: str, reps: int, secret: list[float], *, top1: list[bool] | None = None, exposure=1.0,
              rank=128, loss: float | None = None):
    lp = PREFIX + secret
    mean_loss = -float(np.mean(secret))
    plain = score_row(cid, model, reps, loss=mean_loss if loss is None else loss, bits=-sum(secret) / math.log(2))
    return SequenceScore.model_validate(plain.model_dump() | dict(
        token_logprobs=lp, token_top1=top1 or [False] * len(lp), token_vocab_mean=[-5.0] * len(lp),
        token_vocab_var=[4.0] * len(lp), secret_token_offset=len(PREFIX), text_zlib_bytes=30 + len(cid),
        exposure=exposure, rank=rank))


def token_scores(n_refs: int = 100):
    rng = np.random.default_rng(0)
    out = []
    for tier in (1, 4):
        for k in range(4):
            base = list(rng.normal(-3.0, 0.3, size=6))
            lift = 0.2 * tier  # fine-tuning lifted every secret token, more with more repetitions
            out += [token_row(f"m{tier}{k}", "base", tier, base),
                    token_row(f"m{tier}{k}", "tuned", tier, [b + lift * (1 if j % 2 else -0.2) for j, b in enumerate(base)])]
    for k in range(n_refs):
        base = list(rng.normal(-3.0, 0.3, size=6))
        rank = int(rng.integers(1, 257))
        out += [token_row(f"r{k}", "base", 0, base, exposure=8 - math.log2(rank), rank=rank),
                token_row(f"r{k}", "tuned", 0, [b + rng.normal(0, 0.05) for b in base], exposure=8 - math.log2(rank),
                          rank=rank)]
    return out


# -------------------------------------------------------------------------------------------- canaries and works


class FakeSampler:
    """Deterministic stand-in for the base model: text and perplexity are functions of (seed, index)."""

    fingerprint = "fake-sampler"

    def __init__(self, perplexities=(5.0, 50.0, 500.0)):
        self.perplexities = perplexities

    def sample(self, prompt, *, n, max_new_tokens, temperature, seed):
        out = []
        for i in range(n):
            words = [f"w{(seed * 7919 + i * 104729 + k * 31) % 99991}" for k in range(max_new_tokens)]
            ppl = self.perplexities[(seed + i) % len(self.perplexities)]
            out.append(Sample(text=" " + " ".join(words), token_ids=list(range(max_new_tokens)),
                              nll_bits=max_new_tokens * math.log2(ppl), clean=True))
        return out


SENTENCES = [
    "The lighthouse keeper counted the ships that passed in the long grey evenings of autumn.",
    "Every morning the baker opened her shutters before the church bell rang six times.",
    "A fox crossed the frozen river where the old mill once turned its heavy wheel.",
    "They mended the nets by lamplight and sang the slow songs their grandparents had taught them.",
    "Snow covered the orchard, and the apples left on the branches shone like small red lamps.",
    "The schoolmaster read aloud from a battered atlas while the stove ticked in the corner.",
]


def story(seed: int, n: int = 60) -> str:
    return " ".join(f"({seed}.{i}) " + SENTENCES[(i * 7 + seed) % len(SENTENCES)] for i in range(n))


def make_folder(root, *, license_: str | None = "CC-BY-4.0", tamper: bool = False, drop_sha: bool = False, first: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(first, first + 2):
        text = story(k)
        (root / f"story{k}.txt").write_text(text, encoding="utf-8")
        digest = hashlib.sha256(text.encode()).hexdigest()
        entry = {"file": f"story{k}.txt", "title": f"Story {k}", "author": "A. Tester", "source": "made in the test",
                 "sha256": digest}
        if license_ is not None:
            entry["license"] = license_
        if drop_sha:
            del entry["sha256"]
        entries.append(entry)
    if tamper:
        (root / f"story{first + 1}.txt").write_text(story(first + 1) + " An extra sentence.", encoding="utf-8")
    (root / "works.yaml").write_text(yaml.safe_dump({"works": entries}), encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------- subprocess runs and training


AUDIT = [sys.executable, "-m", "audit.cli"]
# two processes over gloo; --standalone picks a free rendezvous port, so two of them at once (CI's two xdist workers)
# never meet on torchrun's default 29500
TORCHRUN_2 = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]


def audit_env() -> dict[str, str]:
    """The environment for an ``audit`` subprocess: offline, and never the developer's MLflow server."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def kill_after_first_checkpoint(cwd: Path, args: list[str]) -> Path:
    """Start ``audit ARGS`` in ``cwd``, SIGKILL it once its first training checkpoint is on disk; the run directory."""
    proc = subprocess.Popen(AUDIT + args, cwd=cwd, env=audit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if list(cwd.glob("runs/*/trainer/checkpoint-*/trainer_state.json")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, \
        f"the run ended before it could be killed (rc {proc.returncode}): {err.decode()[-2000:]}"
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def short_sft(train, tokenizer, out, callbacks, *, max_steps: int = 6):
    """A seeded LoRA SFT of tiny-llama on ``train`` with ``callbacks`` (dropout on); the logged losses."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from audit.data.models import load_model_and_tokenizer, resolve_model

    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(resolve_model("tiny-llama", progress=False).path, dtype=torch.float32, device="cpu")
    args = SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=2e-2,
                     max_length=64, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=callbacks,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# --------------------------------------------------------------------------------------------------- audit measure


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def measure_refused(argv: list[str], capsys, match: str, *, root: Path) -> str:
    """``audit measure ...`` exits 2 with one ``error:`` line naming ``match`` and leaves ``root`` as it was."""
    before = files_of(root)
    code = main(["measure", *argv, "--no-tracking", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "(fix: " in err, err
    assert match in err, err
    assert files_of(root) == before, "a refused measurement wrote something"
    assert not (root / "runs").exists() and not (root / "mlflow.db").exists()
    return err


def other_shape_model(out: Path, base_dir: Path, *, hidden_size: int = 32, layers: int = 2) -> Path:
    """A Llama of another width or depth with the base's vocabulary and tokenizer files: the tokenizer check cannot
    tell it from a fine-tune."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((base_dir / "config.json").read_text())
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, bos_token_id=config["bos_token_id"],
        eos_token_id=config["eos_token_id"], pad_token_id=config["pad_token_id"]))
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / name, out / name)
    return out


def perturbed_copy(out: Path, *, added_token: str | None = None) -> Path:
    """tiny-llama's files with one weight changed (so it counts as trained) and, optionally, a token added."""
    from safetensors.torch import load_file, save_file

    from audit.data.ground_truth import load_tokenizer
    from audit.data.models import resolve_model

    base = resolve_model("tiny-llama", progress=False).path
    shutil.copytree(base, out)
    tensors = load_file(str(out / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if added_token:
        tokenizer = load_tokenizer(out)
        tokenizer.add_tokens([added_token])
        tokenizer.save_pretrained(str(out))
    return out


def import_cycles_module():
    """``tests/import_cycles.py`` (a script, not a test module) loaded by path: its import graph and cycle finder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_cycles", Path(__file__).resolve().parent / "import_cycles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
