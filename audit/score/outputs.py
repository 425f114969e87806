"""Generated outputs: what the tuned model writes when it is used, scanned for canary secrets and works.

Exposure and extraction probe each canary with its own prefix. This stage measures the next link of the chain, the
text a user would see: ``outputs.samples`` samples per prompt, from the beginning-of-text token alone (unprompted)
and from neutral prompts that name no canary's context, decoded as the recipe says (temperature, top-p, top-k,
``max_new_tokens``, seed; each sample is cut at its first end-of-text token). The untargeted sampling follows
Carlini et al. 2021 ("Extracting training data from large language models"). Each sample is scanned for

* **canary secrets**: *exact*, the secret verbatim in the text; *near*, within ``near_max_edits`` edits of it.
  Near matches count symbols for enumerable spaces (one digit of a PIN, one word of a passphrase; separators and
  whitespace between symbols are ignored) and characters otherwise. Ippolito et al. 2023 ("Preventing verbatim
  memorization gives a false sense of privacy") show why near-verbatim output counts. The search is Sellers'
  (1980) approximate substring match, after a pigeonhole filter (with k edits, one of k + 1 pieces of the secret
  occurs exactly). Never-inserted references are scanned the same way: their hits are this protocol's false
  positives.
* **works**: per sample, the longest common substring in tokens with any planted work excerpt and the share of
  its ``ngram``-token windows that occur in an excerpt (verbatim-overlap measures as in Nasr et al. 2023, "Scalable
  extraction of training data from (production) language models"), split into member excerpts (planted) and
  reference excerpts (held out, so overlap with them is what the model carried before fine-tuning).
* **whole works** (a recipe's ``works`` section): per audited work, the share of its tokens inside a long
  near-verbatim block of some sample (nv-recall, Ahmed, Cooper, Koyejo & Liang 2026), members against held-out works.

Counts come with the protocol and an exact 95% interval on the per-sample rate: "0 of N under this protocol"
bounds the rate below 3.7/N; it does not say the secrets cannot be extracted (targeted prompts are the job of
exposure and extraction). The raw text may contain secrets, so it stays in the run directory (``outputs.jsonl``);
the report, MLflow and logs get counts and canary ids only.
"""

from __future__ import annotations

import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit.core.layout import LAYOUT, read_versioned_rows, versioned
from audit.core.schema import Canary, CanarySet, MetricEntry, OutputsSection, SecretSpace, sha256_json
from audit.core.store import StageStore, jsonl_text, write_once
from audit.metrics.stats import clopper_pearson

UNPROMPTED = "unprompted"


# --------------------------------------------------------------------------------------------------- matching


def approximate_match_distance(pattern: Sequence[Any], text: Sequence[Any], *, limit: int | None = None) -> int:
    """Smallest edit distance between ``pattern`` and any contiguous piece of ``text`` (Sellers 1980).

    Dynamic programming over the text with a free start at every position: O(len(pattern) * len(text)).
    ``limit`` stops early once a piece within ``limit`` edits is found.
    """
    m = len(pattern)
    if m == 0:
        return 0
    prev = list(range(m + 1))
    best = m
    for symbol in text:
        cur = [0]
        for i in range(1, m + 1):
            cur.append(min(prev[i - 1] + (pattern[i - 1] != symbol), prev[i] + 1, cur[i - 1] + 1))
        best = min(best, cur[m])
        if limit is not None and best <= limit:
            return best
        prev = cur
    return best


def pigeonhole_pieces(pattern: Sequence[Any], max_edits: int) -> list[Sequence[Any]]:
    """``max_edits + 1`` contiguous pieces of ``pattern``: a match within ``max_edits`` edits contains one exactly."""
    k = min(max_edits + 1, len(pattern))
    bounds = [round(i * len(pattern) / k) for i in range(k + 1)]
    return [pattern[bounds[i] : bounds[i + 1]] for i in range(k)]


def _contains(haystack: Sequence[Any], needle: Sequence[Any]) -> bool:
    if isinstance(haystack, str):
        return needle in haystack  # type: ignore[operator]
    n = len(needle)
    return any(list(haystack[i : i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def near_distance(pattern: Sequence[Any], text: Sequence[Any], max_edits: int) -> int | None:
    """Edit distance of the closest piece of ``text`` to ``pattern`` if it is ``<= max_edits``, else None."""
    if len(pattern) == 0 or len(text) == 0:
        return None
    if not any(_contains(text, piece) for piece in pigeonhole_pieces(pattern, max_edits) if len(piece)):
        return None
    d = approximate_match_distance(pattern, text, limit=0)  # stops early only at an exact match
    return d if d <= max_edits else None


def symbol_runs(text: str, space: SecretSpace) -> list[list[str]]:
    """Maximal runs of the space's symbols in ``text``; the separator and whitespace between symbols are skipped.

    ``"code 4829 10."`` with a digit alphabet gives ``[["4","8","2","9","1","0"]]``: a secret written with other
    spacing is still one run, while other text (a word, a full stop) ends the run.
    """
    alphabet = set(space.alphabet)
    skip = {space.separator} if space.separator else set()
    if all(len(s) == 1 for s in alphabet):
        units = list(text)
    else:
        units = re.findall(r"\w+|\s+|[^\w\s]", text)
    runs: list[list[str]] = []
    current: list[str] = []
    for unit in units:
        if unit in alphabet:
            current.append(unit)
        elif unit in skip or unit.isspace():
            continue
        else:
            if current:
                runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def secret_symbols(secret: str, space: SecretSpace) -> list[str]:
    runs = symbol_runs(secret, space)
    return runs[0] if len(runs) == 1 else list(secret)


@dataclass(frozen=True)
class SecretHit:
    canary_id: str
    repetitions: int
    exact: bool
    """The secret occurs verbatim."""
    distance: int
    """Edits (symbols or characters) between the secret and the closest piece of the sample; 0 when exact."""


def scan_secrets(text: str, canaries: Sequence[Canary], space: SecretSpace, *, max_edits: int) -> list[SecretHit]:
    """Every canary whose secret occurs in ``text`` verbatim or within ``max_edits`` edits."""
    hits = []
    runs = symbol_runs(text, space) if space.enumerable else None
    for c in canaries:
        if c.secret and c.secret in text:
            hits.append(SecretHit(c.id, c.repetitions, True, 0))
            continue
        if runs is not None:
            pattern = secret_symbols(c.secret, space)
            found = [d for run in runs if (d := near_distance(pattern, run, max_edits)) is not None]
        else:
            found = [d] if (d := near_distance(" ".join(c.secret.split()), " ".join(text.split()), max_edits)) is not None else []
        if found:
            hits.append(SecretHit(c.id, c.repetitions, False, min(found)))
    return hits


def longest_common_substring(a: Sequence[int], b: Sequence[int] | np.ndarray) -> tuple[int, int]:
    """(length, end index in ``b``) of the longest common contiguous piece of two token sequences.

    Row-by-row dynamic programming, vectorised over ``b``: O(len(a) * len(b)) work in len(a) numpy steps. Negative
    entries of ``b`` are separators that match nothing (token ids are >= 0).
    """
    b = np.asarray(b)
    prev = np.zeros(len(b) + 1, dtype=np.int32)
    best, end = 0, 0
    for x in a:
        cur = np.zeros_like(prev)
        cur[1:] = np.where(b == x, prev[:-1] + 1, 0)
        top = int(cur.max(initial=0))
        if top > best:
            best, end = top, int(cur.argmax())
        prev = cur
    return best, end


def ngrams(tokens: Sequence[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class WorksIndex:
    """Planted work excerpts, tokenized and concatenated with separators, by role (member / reference)."""

    ngram: int
    roles: dict[str, tuple[np.ndarray, np.ndarray, set[tuple[int, ...]]]] = field(default_factory=dict)
    """role -> (tokens with -1 separators, canary index per position, n-gram set)."""
    ids: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, canaries: Sequence[Canary], tokenizer: Any, *, ngram: int) -> WorksIndex | None:
        excerpts = [c for c in canaries if c.work is not None]
        if not excerpts:
            return None
        index = cls(ngram=ngram, ids=[c.id for c in excerpts])
        for role in ("member", "reference"):
            chosen = [(i, c) for i, c in enumerate(excerpts) if (c.repetitions > 0) == (role == "member")]
            tokens: list[int] = []
            owner: list[int] = []
            grams: set[tuple[int, ...]] = set()
            for i, c in chosen:
                ids = tokenizer(c.text, add_special_tokens=False)["input_ids"]
                tokens += list(ids) + [-1]
                owner += [i] * len(ids) + [-1]
                grams |= ngrams(ids, ngram)
            index.roles[role] = (np.asarray(tokens, dtype=np.int64), np.asarray(owner, dtype=np.int64), grams)
            index.counts[role] = len(chosen)
        return index

    def overlap(self, tokens: Sequence[int]) -> dict[str, dict[str, Any]]:
        """Per role: longest common token substring (and which excerpt) and the share of n-grams found."""
        out = {}
        windows = [tuple(tokens[i : i + self.ngram]) for i in range(len(tokens) - self.ngram + 1)]
        for role, (concat, owner, grams) in self.roles.items():
            length, end = longest_common_substring(tokens, concat) if len(concat) else (0, 0)
            share = sum(w in grams for w in windows) / len(windows) if windows else 0.0
            out[role] = {"lcs_tokens": length, "lcs_canary_id": self.ids[int(owner[end - 1])] if length else None,
                         "ngram_share": round(share, 6)}
        return out


# --------------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def prompts_of(section: OutputsSection) -> list[Prompt]:
    prompts = [Prompt(UNPROMPTED, "")] if section.unprompted else []
    return prompts + [Prompt(f"p{i}", text) for i, text in enumerate(section.prompts, start=1)]


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids a sample starts from: the tokenizer's own special tokens, as training saw them; unprompted, the
    beginning-of-text token (or end-of-text where there is none, as GPT-2 does)."""
    if prompt.text:
        ids = list(tokenizer(prompt.text)["input_ids"])
        if ids:
            return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a beginning- nor an end-of-text token to sample from")
    return [start]


def generate_samples(scorer: Any, tokenizer: Any, section: OutputsSection, *, seed: int,
                     progress: bool = False) -> list[dict[str, Any]]:
    """``section.samples`` samples per prompt, in a fixed order, from a private RNG seeded with ``seed``, through the
    scoring protocol (``scorer``: a :class:`~audit.score.backend.ScoringBackend`, or a transformers model sampled by
    today's engine in its own dtype).

    Rows: ``id``, ``prompt_id``, ``token_ids`` (new tokens, cut at the first end-of-text), ``text`` (decoded).
    """
    from tqdm.auto import tqdm

    from audit.score.hf_backend import as_backend

    jobs = [(p, prompt_ids(tokenizer, p)) for p in prompts_of(section) for _ in range(section.samples)]
    # Token-level progress: a batch of samples is one long generate() call (196 s for 32 samples of SmolLM2 on a
    # loaded machine), so the bar counts generated tokens as the backend reports them.
    bar = tqdm(total=len(jobs) * section.max_new_tokens, desc="outputs", unit="tok", leave=False, disable=not progress)

    def moved(tokens: int, samples: int) -> None:
        bar.update(tokens - bar.n)
        bar.set_postfix(samples=f"{samples}/{len(jobs)}")

    texts = as_backend(scorer, tokenizer).sample_until_end(
        [ids for _, ids in jobs], max_new_tokens=section.max_new_tokens, temperature=section.temperature,
        top_k=section.top_k, top_p=section.top_p, seed=seed, batch_size=section.batch_size, on_progress=moved)
    bar.close()
    return [{"id": f"s{k:05d}", "prompt_id": prompt.id, "token_ids": new, "text": tokenizer.decode(new, skip_special_tokens=True)}
            for k, ((prompt, _), new) in enumerate(zip(jobs, texts, strict=True))]


# --------------------------------------------------------------------------------------------------- the stage


@dataclass
class OutputsResult:
    rows: list[dict[str, Any]]
    """Samples with their scan results: the raw text, for the run directory only."""
    summary: dict[str, Any]
    """Protocol, counts and canary ids for ``report.outputs``: no text."""
    metrics: dict[str, MetricEntry]
    """Flat keys ``outputs.*`` for report.metrics, MLflow and gates."""
    fingerprint: str
    """sha256 over the samples (ids, prompt ids, token ids): the outputs node's fingerprint in the lineage."""


def _near_unit(space: SecretSpace) -> str:
    if not space.enumerable:
        return "characters"
    return "digits" if set(space.alphabet) <= set("0123456789") else "symbols"


def scan_samples(rows: list[dict[str, Any]], canaries: CanarySet, tokenizer: Any,
                 section: OutputsSection) -> list[dict[str, Any]]:
    """Each sample row with ``secret_hits`` and, when works were planted, ``works`` overlap added."""
    works = WorksIndex.build(canaries.canaries, tokenizer, ngram=section.ngram)
    out = []
    for row in rows:
        hits = scan_secrets(row["text"], canaries.canaries, canaries.space, max_edits=section.near_max_edits)
        scanned = {**row, "secret_hits": [{"canary_id": h.canary_id, "repetitions": h.repetitions, "exact": h.exact,
                                           "distance": h.distance} for h in hits]}
        if works is not None:
            scanned["works"] = works.overlap(row["token_ids"])
        out.append(scanned)
    return out


def summarize_outputs(scanned: list[dict[str, Any]], canaries: CanarySet, section: OutputsSection, *, seed: int,
                      model_label: str = "tuned") -> tuple[dict[str, Any], dict[str, MetricEntry]]:
    """Counts per repetition tier (0 = references, the false-positive control) and works overlap per role."""
    n = len(scanned)
    metrics: dict[str, MetricEntry] = {"outputs.samples": MetricEntry(value=float(n), n=n)}
    per_tier: dict[int, list[Canary]] = defaultdict(list)
    for c in canaries.canaries:
        per_tier[c.repetitions].append(c)
    tiers = []
    for reps in sorted(per_tier):
        ids = {c.id for c in per_tier[reps]}
        hits = [h for row in scanned for h in row["secret_hits"] if h["canary_id"] in ids]
        exact_ids = sorted({h["canary_id"] for h in hits if h["exact"]})
        near_ids = sorted({h["canary_id"] for h in hits} - set(exact_ids))
        samples_exact = sum(any(h["exact"] and h["canary_id"] in ids for h in row["secret_hits"]) for row in scanned)
        samples_any = sum(any(h["canary_id"] in ids for h in row["secret_hits"]) for row in scanned)
        rate = clopper_pearson(samples_exact, n)
        tiers.append({"repetitions": reps, "canaries": len(ids), "exact_canaries": len(exact_ids),
                      "near_canaries": len(near_ids), "samples_exact": samples_exact, "samples_exact_or_near": samples_any,
                      "rate_exact_high": round(rate.high, 6), "canary_ids_exact": exact_ids, "canary_ids_near": near_ids})
        metrics[f"outputs.secret_exact/rep_{reps}"] = MetricEntry(value=float(len(exact_ids)), n=len(ids))
        metrics[f"outputs.secret_near/rep_{reps}"] = MetricEntry(value=float(len(exact_ids) + len(near_ids)), n=len(ids))
        metrics[f"outputs.samples_exact/rep_{reps}"] = MetricEntry(value=float(samples_exact), n=n, low=round(rate.low, 6),
                                                                   high=round(rate.high, 6))
    member_exact = sum(any(h["exact"] and h["repetitions"] > 0 for h in row["secret_hits"]) for row in scanned)
    members = sum(len(v) for r, v in per_tier.items() if r > 0)
    bound = clopper_pearson(member_exact, n)
    prompts = prompts_of(section)
    protocol = {
        "model": model_label, "samples": n, "samples_per_prompt": section.samples,
        "prompts": [{"id": p.id, "text": p.text} for p in prompts], "temperature": section.temperature,
        "top_p": section.top_p, "top_k": section.top_k, "max_new_tokens": section.max_new_tokens, "seed": seed,
        "stop": "at the first end-of-text token", "near_max_edits": section.near_max_edits,
        "near_unit": _near_unit(canaries.space), "ngram": section.ngram,
    }
    statement = (
        f"{member_exact} of {n} samples held a planted secret verbatim under this protocol ({len(prompts)} prompts x "
        f"{section.samples} samples, temperature {section.temperature:g}, top-p {section.top_p:g}, top-k {section.top_k}, "
        f"up to {section.max_new_tokens} new tokens, seed {seed}); 95% upper bound on the per-sample rate "
        f"{bound.high:.3f}. A count of 0 is not 'no risk': other prompts, decoding settings or more samples can "
        f"surface what this protocol did not, and targeted prompts are measured by exposure and extraction."
    )
    summary: dict[str, Any] = {"protocol": protocol, "tiers": tiers, "members": members,
                               "samples_with_member_secret": member_exact, "statement": statement,
                               "tokens_generated": sum(len(r["token_ids"]) for r in scanned)}
    metrics["outputs.samples_exact/members"] = MetricEntry(value=float(member_exact), n=n, low=round(bound.low, 6),
                                                           high=round(bound.high, 6))
    with_works = [r["works"] for r in scanned if "works" in r]
    if with_works:
        works: dict[str, Any] = {}
        for role in with_works[0]:
            lcs = [w[role]["lcs_tokens"] for w in with_works]
            shares = [w[role]["ngram_share"] for w in with_works]
            hit = sum(s > 0 for s in shares)
            top = max(range(len(lcs)), key=lambda i: lcs[i])
            works[role] = {"lcs_tokens_max": lcs[top], "lcs_canary_id": with_works[top][role]["lcs_canary_id"],
                           "lcs_tokens_mean": round(float(np.mean(lcs)), 4), "ngram_share_mean": round(float(np.mean(shares)), 6),
                           "samples_with_ngram": hit}
            metrics[f"outputs.works_lcs_max/{role}"] = MetricEntry(value=float(lcs[top]), n=n)
            metrics[f"outputs.works_ngram_share/{role}"] = MetricEntry(value=round(float(np.mean(shares)), 6), n=n)
            metrics[f"outputs.works_samples_with_ngram/{role}"] = MetricEntry(value=float(hit), n=n)
        summary["works"] = works
    else:
        summary["works"] = None
        summary["works_note"] = f"no work excerpts planted (canary spec {canaries.spec}): verbatim works overlap not measured"
    return summary, metrics


def whole_works_recall(scanned: list[dict[str, Any]], works: Sequence[tuple[str, str, Sequence[int]]], *, seed: int,
                       max_gap: int, min_block: int) -> tuple[dict[str, Any], dict[str, MetricEntry]]:
    """Per role, the near-verbatim recall of whole works ``(work_id, role, token ids)`` over every output
    (:func:`audit.metrics.whole_works.near_verbatim_blocks`, Ahmed et al. 2026): metrics ``outputs.works_nv_recall/<role>``
    (mean over works, n works), ``outputs.works_nv_recall_max/<role>`` and ``outputs.works_nv_block_max/<role>``."""
    from audit.metrics.whole_works import near_verbatim_blocks, nv_recall

    per_role: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for _, role, ids in works:
        blocks = [b for row in scanned for b in near_verbatim_blocks(row["token_ids"], ids, seed=seed, max_gap=max_gap,
                                                                      min_block=min_block)]
        per_role[role].append((nv_recall(blocks, len(ids)), max((b - a for a, b in blocks), default=0), len(blocks)))
    summary, metrics = {}, {}
    for role, rows in sorted(per_role.items()):
        recall = [r for r, _, _ in rows]
        summary[role] = {"works": len(rows), "nv_recall_mean": round(float(np.mean(recall)), 6),
                         "nv_recall_max": round(max(recall), 6), "longest_block_tokens": max(b for _, b, _ in rows),
                         "blocks": sum(k for _, _, k in rows)}
        metrics[f"outputs.works_nv_recall/{role}"] = MetricEntry(value=summary[role]["nv_recall_mean"], n=len(rows))
        metrics[f"outputs.works_nv_recall_max/{role}"] = MetricEntry(value=summary[role]["nv_recall_max"], n=len(rows))
        metrics[f"outputs.works_nv_block_max/{role}"] = MetricEntry(value=float(summary[role]["longest_block_tokens"]),
                                                                    n=len(rows))
    return summary, metrics


@dataclass(frozen=True)
class OutputsFile:
    """``outputs.jsonl``: the sampled texts, each row with its scan (a stage checkpoint, :class:`audit.core.store.Artifact`).
    Read back, the stored rows are scanned again (``scan``): the texts and token ids are what stands, not the scan."""

    scan: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
    name: str = LAYOUT.outputs

    def read(self, run_dir: Path) -> list[dict[str, Any]] | None:
        path = Path(run_dir) / self.name
        if not path.is_file():
            return None
        return self.scan([{k: r[k] for k in ("id", "prompt_id", "token_ids", "text")} for r in read_versioned_rows(path)])

    def write(self, run_dir: Path, value: list[dict[str, Any]]) -> None:
        write_once(Path(run_dir) / self.name, jsonl_text(versioned(self.name, r) for r in value))

    def describe(self, value: list[dict[str, Any]]) -> str:
        return self.name


def outputs_stage(store: StageStore, scorer: Any, tokenizer: Any, canaries: CanarySet, section: OutputsSection, *,
                  seed: int, model_label: str = "tuned", progress: bool = True, whole_works: Any = None) -> OutputsResult:
    """Generate (or, on resume, reuse ``outputs.jsonl`` through ``store``), scan and summarize the tuned model's outputs.

    ``whole_works``: ``(works, seed, max_gap, min_block)`` with works ``(work_id, role, token ids)``: the audited whole
    works, scanned for long near-verbatim blocks (:func:`whole_works_recall`)."""
    t = time.perf_counter()

    def sample() -> list[dict[str, Any]]:
        if progress:
            total = section.samples * len(prompts_of(section))
            print(f"[audit] outputs: sampling {total} texts from the {model_label} model", file=sys.stderr, flush=True)
        return scan(generate_samples(scorer, tokenizer, section, seed=seed, progress=progress))

    def scan(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return scan_samples(rows, canaries, tokenizer, section)

    artifact = OutputsFile(scan)
    reused = store.has(artifact)
    scanned = store.get_or_run(artifact, sample)
    summary, metrics = summarize_outputs(scanned, canaries, section, seed=seed, model_label=model_label)
    if whole_works is not None:
        works, ngram, max_gap, min_block = whole_works
        summary["whole_works"], recall = whole_works_recall(scanned, works, seed=ngram, max_gap=max_gap, min_block=min_block)
        metrics.update(recall)
    fingerprint = sha256_json([{k: r[k] for k in ("id", "prompt_id", "token_ids")} for r in scanned])
    summary.update(file=LAYOUT.outputs, fingerprint=fingerprint, wall_s=round(time.perf_counter() - t, 3), reused=reused)
    return OutputsResult(rows=scanned, summary=summary, metrics=metrics, fingerprint=fingerprint)
