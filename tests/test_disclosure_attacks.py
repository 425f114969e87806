"""The disclosure rule of the threat model (:mod:`audit.metrics.disclosure`), enforced by attack.

A reader of everything an audit shares (report.json/html/md, token_view.json, the plots, the MLflow run's params,
metrics with their history, tags and text artifacts, the printed output) also holds the public base model, the
spec, the recipe and the prefixes. Two attacks try to turn that into secrets (issue 23):

(a) **position by position**: for each secret token, one forward pass of the base model over the prefix and the
    digits so far gives all ten candidates' probabilities; a published number equal (at its printed precision) to
    exactly one candidate's p, ln p, log2 p or bits picks the digit. Before the rule, the token view's ``p_base`` gave
    a 6-digit secret back in 6 passes.
(b) **one scalar per secret**: the base model's bits of all 10^6 secrets of a canary (one walk of the trie), and
    what derives from them (nats, compression against raw UTF-8, whole-space exposure); a published number that
    narrows the space to at most 2^-10 of it around the true secret is a leak.

Each attack must recover nothing from the shared material and must succeed on the run directory's
``scores.jsonl``/``scores_base.jsonl`` (secret material, 0600): the control that keeps the attack honest.

The run's own clock is left out of what the attacks read: the timings it records (``timings_s``, ``wall_s``, the
``time.*_s`` metrics and each MLflow stage run's ``time_s``), the Trainer's own (``train_runtime``,
``train_samples_per_second``, ``train_steps_per_second``, which the ``train`` stage run receives like every number
the Trainer logs) and tqdm's rates in the printed progress. No guessed secret computes them, and they change from run
to run: with a few dozen of them printed to the millisecond, CI runs put a stage time (the ``report`` stage's
``time_s`` = 1.321) within half a millisecond of a secret's base exposure (1.3214, rank 400,155 of 10^6), where
10^-3 bits of exposure holds fewer than 2^-10 of the secrets, and a loaded machine's ``train_steps_per_second``
(56.076 unloaded, 3 decimals) on another secret's base bits (53.0339, where 10^-3 bits holds ~230 of 10^6).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import AUDIT, audit_env

NUMBER = re.compile(r"(?<![\w.])-?(?:\d+\.\d+|\.\d+)(?:[eE][-+]?\d+)?|(?<![\w.])-?\d+[eE][-+]?\d+")
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
MIN_SIGNIFICANT = 3
"""A published number with fewer significant digits (0.5, 1.0, 12) says too little to single out anything."""
NARROW = 2.0 ** -10
"""(b) counts a leak when a number keeps at most this share of the space around the true secret (10 bits learned)."""
NOISE = 2e-6
"""(b) reads a number to at least this relative tolerance: the trie walk's fp32 sums and the engine's teacher-forced
ones differ by up to ~1e-5 nats on ~50 bits (batch order), finer than the 6 decimals scores_base.jsonl prints."""
DIGITS = [str(d) for d in range(10)]
CLOCK_RATE = re.compile(r"\d+(?:\.\d+)?(?:s/(?:it|step|canary|tok)|(?:it|step|canary|tok)/s)")
"""tqdm's rates in the printed progress (``65.11step/s``, ``1.10s/canary``): the clock, not the model."""
CLOCK_KEYS = ("timings_s", "wall_s")
"""Where report.json keeps the run's wall-clock seconds (a dict of stage times, or one number)."""


WINDOW = 4
"""(a) reads per-token listings: each next position's number within this many numbers after the last one (the old
token view listed p_base and p_tuned token after token; scores.jsonl lists ln p token after token)."""
AMBIGUOUS = 10
"""(a) recovers a secret when at most this many complete digit chains come out, the true one among them."""


def _numbers(text: str) -> tuple[list[float], list[float]]:
    """The decimal numbers of ``text`` in order, each with the half-width of its last printed digit."""
    values, half = [], []
    for token in NUMBER.findall(DATA_URI.sub("", text)):
        mantissa = re.split(r"[eE]", token)[0].lstrip("-")
        exponent = int(re.split(r"[eE]", token)[1]) if re.search(r"[eE]", token) else 0
        if len(mantissa.replace(".", "").lstrip("0")) < MIN_SIGNIFICANT:
            continue
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        values.append(float(token))
        half.append(0.5 * 10.0 ** (exponent - decimals) * (1 + 1e-9))
    return values, half


def _not_clock(values: np.ndarray, half: np.ndarray, clock: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The numbers that no wall-clock value explains at their printed precision."""
    if clock is None:
        return values, half
    keep = ~np.any(np.abs(values[:, None] - clock[None, :]) <= half[:, None], axis=1)
    return values[keep], half[keep]


@dataclass(frozen=True)
class Published:
    """Every number a reader gets: per source (a file, an MLflow artifact, a JSON line) in document order, and all
    of them sorted (for scalar matching)."""

    sources: list[tuple[np.ndarray, np.ndarray]]
    values: np.ndarray
    half: np.ndarray

    @classmethod
    def of(cls, texts: list[str], clock: np.ndarray | None = None) -> Published:
        """``clock``: the run's wall-clock values; a number that one of them explains at its printed precision is
        left out (the report's tables print the timings report.json records)."""
        sources = [_not_clock(*(np.asarray(x, dtype=np.float64) for x in _numbers(t)), clock) for t in texts]
        sources = [s for s in sources if s[0].size]
        values = np.concatenate([v for v, _ in sources]) if sources else np.zeros(0)
        half = np.concatenate([h for _, h in sources]) if sources else np.zeros(0)
        order = np.argsort(values)
        return cls(sources, values[order], half[order])


# --------------------------------------------------------------------------------------------------- the audit
# --------------------------------------------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def audited(tiny_run, tmp_path_factory):
    """The session's tiny audit (tests/conftest.py: run as a user runs it, logging to a real MLflow store), rendered
    again by `audit report` in a copy of its run directory; everything both printed."""
    run_dir = tmp_path_factory.mktemp("disclosure") / tiny_run.run_dir.name
    shutil.copytree(tiny_run.run_dir, run_dir)  # `audit report` rewrites the report files: never in the shared run
    rendered = subprocess.run([*AUDIT, "report", str(run_dir)], cwd=run_dir.parent, env=audit_env(), capture_output=True)
    assert rendered.returncode == 0, rendered.stderr.decode()[-2000:]
    printed = tiny_run.stdout + tiny_run.stderr + (rendered.stdout + rendered.stderr).decode("utf-8", "replace")
    return run_dir, CLOCK_RATE.sub("", printed), json.loads((run_dir / "report.json").read_text())["tracking"]["uri"]


def _png_text(path: Path) -> str:
    """The text chunks of a PNG (tEXt, zTXt, iTXt): the metadata a plot carries."""
    data, out, pos = path.read_bytes(), [], 8
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" or kind == b"iTXt":
            out.append(body.decode("latin-1"))
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\x00")
            out.append(key.decode("latin-1") + zlib.decompress(rest[1:]).decode("latin-1"))
        pos += 12 + length
    return "\n".join(out)


def _is_clock_metric(key: str) -> bool:
    """A stage run's ``time_s`` and the parent's ``time.<stage>_s`` (audit.report.tracking), and the Trainer's
    ``train_runtime`` and ``*_per_second`` rates on the train stage run: wall-clock seconds and what divides by them."""
    return key == "time_s" or (key.startswith("time.") and key.endswith("_s")) or key.endswith(("_runtime", "_per_second"))


def _clock_values(node) -> list[float]:
    """Every value report.json keeps under :data:`CLOCK_KEYS`, at any depth."""
    if isinstance(node, list):
        return [v for item in node for v in _clock_values(item)]
    if not isinstance(node, dict):
        return []
    out: list[float] = []
    for key, value in node.items():
        if key in CLOCK_KEYS:
            out += [float(v) for v in (value.values() if isinstance(value, dict) else [value]) if isinstance(v, int | float)]
        else:
            out += _clock_values(value)
    return out


def _mlflow_text(uri: str, dest: Path) -> str:
    """Everything the MLflow store holds for the audit's runs: params, tags, every metric's whole history, and the
    text artifacts (report.json/html/md, token_view.json, manifest, ...) downloaded as a reader would."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parts = []
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert runs, "the audit logged no MLflow run: the attack would read nothing"
    for run in runs:
        parts.append(json.dumps({"params": run.data.params, "tags": run.data.tags}))
        for key in [k for k in run.data.metrics if not _is_clock_metric(k)]:
            parts.append(" ".join(repr(m.value) for m in client.get_metric_history(run.info.run_id, key)))
        stack = [None]
        while stack:
            for item in client.list_artifacts(run.info.run_id, stack.pop()):
                if item.is_dir:
                    stack.append(item.path)
                elif item.path.endswith((".json", ".md", ".html", ".txt", ".yaml", ".jsonl")):
                    local = Path(client.download_artifacts(run.info.run_id, item.path, str(dest)))
                    parts.append(local.read_text(encoding="utf-8", errors="replace"))
                elif item.path.endswith(".png"):
                    parts.append(_png_text(Path(client.download_artifacts(run.info.run_id, item.path, str(dest)))))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def shared_numbers(audited, tmp_path_factory) -> Published:
    run_dir, printed, uri = audited
    texts = [printed, _mlflow_text(uri, tmp_path_factory.mktemp("mlflow-artifacts"))]
    for name in ("report.json", "report.html", "report.md", "token_view.json"):
        texts.append((run_dir / name).read_text(encoding="utf-8"))
    texts += [_png_text(p) for p in sorted((run_dir / "plots").glob("*.png"))]
    clock = np.asarray(_clock_values(json.loads((run_dir / "report.json").read_text())), dtype=np.float64)
    assert clock.size >= 6  # the stage timings are found (else the filter would silently do nothing)
    published = Published.of(texts, clock=clock)
    assert published.values.size > 100  # the reader has real material to work with
    return published


@pytest.fixture(scope="module")
def run_dir_numbers(audited) -> Published:
    """The control: what the run directory's secret material (0600) prints."""
    run_dir, _, _ = audited
    return Published.of([line for name in ("scores.jsonl", "scores_base.jsonl")
                         for line in (run_dir / name).read_text().splitlines()])


@pytest.fixture(scope="module")
def truth(audited):
    run_dir, _, _ = audited
    rows = [json.loads(line) for line in (run_dir / "canaries.jsonl").read_text().splitlines()]
    members = [r for r in rows if r["repetitions"] > 0]
    assert len(members) == 6 and all(len(r["secret"]) == 6 and r["secret"].isdigit() for r in members)
    return members


@pytest.fixture(scope="module")
def base_model(tiny_model):
    model, tokenizer = tiny_model
    digit_ids = [tokenizer.encode(d, add_special_tokens=False) for d in DIGITS]
    assert all(len(ids) == 1 for ids in digit_ids)  # every digit is one token: the attack's premise
    return model, tokenizer, [ids[0] for ids in digit_ids]


# --------------------------------------------------------------------------------------------------- (a)


def position_attack(base_model, canary: dict, published: Published) -> set[str]:
    """Digit chains read off per-token listings: position 1 matched anywhere in a source, each next position within
    :data:`WINDOW` numbers after the last match, the candidates' probabilities from the public base model given the
    prefix and the digits read so far (p, ln p, log2 p or bits, at each number's printed precision)."""
    import torch

    from audit.score.engine import split_tokens

    model, tokenizer, digit_ids = base_model
    prefix_ids = split_tokens(tokenizer, canary["prefix"], canary["secret"]).prefix_ids
    length = len(canary["secret"])
    cache: dict[str, np.ndarray] = {}

    def forms(recovered: str) -> np.ndarray:
        """(10 candidates, 4 forms) of the next digit's probability."""
        if recovered not in cache:
            ids = prefix_ids + [digit_ids[int(d)] for d in recovered]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)[digit_ids].numpy()
            cache[recovered] = np.stack([np.exp(lp), lp, lp / math.log(2), -lp / math.log(2)], axis=1)
        return cache[recovered]

    found: set[str] = set()

    def extend(values: np.ndarray, half: np.ndarray, start: int, recovered: str) -> None:
        if len(recovered) == length:
            found.add(recovered)
            return
        stop = values.size if not recovered else min(values.size, start + WINDOW)
        window, width = values[start:stop], half[start:stop]
        hit = np.abs(window[:, None, None] - forms(recovered)[None, :, :]) <= width[:, None, None]  # (numbers, 10, 4)
        for j, digit in sorted({(int(j), int(d)) for j, d, _ in zip(*np.nonzero(hit), strict=True)}):
            if len(found) > AMBIGUOUS:
                return
            extend(values, half, start + j + 1, recovered + str(digit))

    for values, half in published.sources:
        extend(values, half, 0, "")
    return found


def recovered(chains: set[str], secret: str) -> bool:
    return secret in chains and len(chains) <= AMBIGUOUS


def test_position_attack_recovers_no_secret_from_what_is_shared(base_model, truth, shared_numbers):
    assert [c["id"] for c in truth if c["secret"] in position_attack(base_model, c, shared_numbers)] == []


def test_position_attack_recovers_every_secret_from_the_run_directory(base_model, truth, run_dir_numbers):
    assert all(recovered(position_attack(base_model, c, run_dir_numbers), c["secret"]) for c in truth)


# --------------------------------------------------------------------------------------------------- (b)


@pytest.fixture(scope="module")
def space_values(base_model, truth, audited):
    """Per attacked canary: each per-secret base value over all 10^6 secrets, and the true secret's index."""
    from audit.data.ground_truth import read_canary_set
    from audit.score.exposure_search import space_nll_bits, symbol_tokens

    model, tokenizer, _ = base_model
    run_dir, _, _ = audited
    space = read_canary_set(run_dir).space
    top = max(c["repetitions"] for c in truth)
    out = {}
    for canary in [c for c in truth if c["repetitions"] == top]:  # the top tier: the view's canary is one of them
        table = symbol_tokens(tokenizer, canary["prefix"], space, canary["secret"])
        bits = space_nll_bits(model, table)
        ranks = np.searchsorted(np.sort(bits), bits, side="right")  # 1 + others at most as likely, ties against it
        utf8_bits = 8 * len(canary["secret"].encode())
        forms = {"bits": bits, "nats": bits * math.log(2), "compression": bits / utf8_bits,
                 "exposure_space": math.log2(bits.size) - np.log2(ranks)}
        out[canary["id"]] = (int(canary["secret"]), forms)
    return out


def scalar_attack(true_index: int, forms: dict[str, np.ndarray], published: Published) -> list[str]:
    """The forms in which some published number narrows the space to <= NARROW of it, the true secret inside."""
    leaks = []
    width = np.maximum(published.half, NOISE * np.abs(published.values))
    for name, values in forms.items():
        order = np.sort(values)
        lo = np.searchsorted(order, published.values - width, side="left")
        hi = np.searchsorted(order, published.values + width, side="right")
        truth_in = np.abs(published.values - values[true_index]) <= width
        if np.any(truth_in & (hi - lo <= NARROW * values.size)):
            leaks.append(name)
    return leaks


@pytest.mark.slow
def test_scalar_attack_checks_no_secret_against_what_is_shared(space_values, shared_numbers):
    assert {cid: scalar_attack(i, forms, shared_numbers) for cid, (i, forms) in space_values.items()} == \
        {cid: [] for cid in space_values}


@pytest.mark.slow
def test_scalar_attack_checks_every_secret_against_the_run_directory(space_values, run_dir_numbers):
    found = {cid: scalar_attack(i, forms, run_dir_numbers) for cid, (i, forms) in space_values.items()}
    assert all("bits" in leaks for leaks in found.values()), found


@pytest.mark.slow
def test_the_old_token_view_fails_both_attacks(base_model, truth, space_values, audited):
    """The view as it was before the rule (p_base, p_tuned of the masked tokens at 4 significant digits, the secret's
    bits under base): rebuilt from the run directory, it gives the top canary away to both attacks."""
    from audit.score.engine import split_tokens

    model, tokenizer, _ = base_model
    run_dir, _, _ = audited
    view = json.loads((run_dir / "token_view.json").read_text())
    shown = view["title"].split()[1]
    canary = next(c for c in truth if c["id"] == shown)
    rows = {json.loads(line)["model"]: json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()
            if json.loads(line)["canary_id"] == shown}
    n_secret = len(split_tokens(tokenizer, canary["prefix"], canary["secret"]).secret_ids)
    lp = {m: rows[m]["token_logprobs"][rows[m]["secret_token_offset"]:][:n_secret] for m in ("base", "tuned")}
    old = [f"{math.exp(x):.4g}" for pair in zip(lp["base"], lp["tuned"], strict=True) for x in pair]
    old.append(f"{-sum(lp['base']) / math.log(2):.3f}")
    published = Published.of([" ".join(old)])
    assert recovered(position_attack(base_model, canary, published), canary["secret"])
    index, forms = space_values[shown]
    assert "bits" in scalar_attack(index, forms, published)


def test_the_clock_filter_drops_timings_and_rates_and_keeps_every_other_number():
    """What the attacks leave out is the run's clock and nothing else: timings matched at their printed precision
    (report.md rounds 1.954 to 1.95), tqdm's rates, the time metrics; a loss or an exposure beside them stays."""
    report = {"timings_s": {"report": 1.321, "total": 13.371}, "training": {"wall_s": 1.954, "final_loss": 1.3214},
              "canaries": {"timings_s": {"inject": 0.002}}, "metrics": {"exposure.mean/rep_1/tuned": {"value": 1.325}}}
    clock = np.asarray(_clock_values(report))
    assert sorted(clock) == [0.002, 1.321, 1.954, 13.371]
    text = CLOCK_RATE.sub("", "report 1.321 s, train 1.95 s; loss 1.3214, exposure 1.325 [00:03, 65.11step/s, 1.10s/canary]")
    published = Published.of([text], clock=clock)
    assert published.values.tolist() == [1.3214, 1.325]
    assert _is_clock_metric("time_s") and _is_clock_metric("time.train_s") and not _is_clock_metric("exposure.time")
    assert _is_clock_metric("train_runtime") and _is_clock_metric("train_steps_per_second")
    assert _is_clock_metric("train_samples_per_second") and not _is_clock_metric("train_loss")
