"""From ``works_scan.jsonl`` rows to the report: per work and model, the metrics, and what may be shared.

Per work and model (:mod:`audit.metrics.whole_works`): the (n, p)-extractable share of windows and of tokens, the
greedy share, the longest greedy run, the code length (bits per byte, against raw UTF-8 and ``lzma``); per work the
stored bits (base - tuned). Metrics, each over the works of a role (``member`` / ``held_out``) and again per kind of
work, with ``n`` = works and a bootstrap interval over works where it is a mean:

    works.extractable_share/<role>/<model>       works.extractable_share/<kind>/<role>/<model>
    works.extractable_token_share/<role>/<model> works.greedy_share/<role>/<model>
    works.bits_per_byte/<role>/<model>           works.longest_greedy_run/<role>/<model>   (max over works)
    works.max_extractable_share/<role>/<model>   (the worst work)
    works.stored_bits/<role>  (mean per work)    works.stored_bits_total/<role>   works.stored_bits_per_param/member
    works.subjects/<role>                        (how many works)

What is shared follows the disclosure rule (:func:`audit.metrics.disclosure.works_group_shareable`): every tuned
number; a base number or a difference to base over a group only where its secret works (synthetic, corpus) allow.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from audit.core.layout import LAYOUT
from audit.core.schema import (
    BaseBeforeAfter,
    MetricEntry,
    WholeWorkRow,
    WholeWorksSummary,
    WorkMap,
    WorkPassage,
    WorksPersistenceRow,
    WorkUnderModel,
    WorkWindow,
)
from audit.data.works.subjects import WorksPlan
from audit.metrics.disclosure import BASE, PUBLIC_TEXT_KIND, SECRET_WORK_KINDS, works_group_shareable
from audit.metrics.whole_works import (
    MORRIS_BITS_PER_PARAM,
    code_length,
    mean_over_works,
    stored_bits,
    stored_bits_per_parameter,
    token_cover,
    work_extraction,
)

TUNED = "tuned"
MAP_POINTS = 1000
"""Windows a report's map keeps per work and model (the highest p_z of each bucket beyond that; the run directory's
``works_scan.jsonl`` has every window)."""
PASSAGES = 3
"""Longest greedily reproduced passages listed per work."""


PARENT = "parent"
"""A further tune's ``before``: the parent run's tuned weights (:mod:`audit.pipeline.chain`)."""
MIN_STORED_BITS = 1.0
"""A role whose first tune stored less than this (mean bits per work) gets no retained share."""


@dataclass(frozen=True)
class WholeWorksResult:
    metrics: dict[str, MetricEntry]
    summary: WholeWorksSummary
    withheld: list[str] = field(default_factory=list)
    persistence: list[WorksPersistenceRow] | None = None
    """A further tune's rows for ``report.persistence.works`` (None for a first tune)."""


def _map(starts: np.ndarray, logp: np.ndarray) -> tuple[list[int], list[float]]:
    log10 = logp / math.log(10)
    if len(starts) <= MAP_POINTS:
        return starts.tolist(), [round(float(v), 3) for v in log10]
    buckets = np.array_split(np.arange(len(starts)), MAP_POINTS)
    return [int(starts[b[0]]) for b in buckets], [round(float(log10[b].max()), 3) for b in buckets]


def summarize_whole_works(plan: WorksPlan, rows: list[WorkWindow], *, n_queries: int, p: float, trainable_params: int,
                          passage_text: Callable[[str, int, int], str] | None = None, seed: int = 0) -> WholeWorksResult:
    """The report's section and metrics (see the module docstring). ``passage_text(work_id, start, stop)``: the text of
    tokens ``start:stop`` of a work, asked for public-domain works only."""
    section = plan.section
    by: dict[tuple[str, str], list[WorkWindow]] = defaultdict(list)
    for r in rows:
        by[(r.work_id, r.model)].append(r)
    models = sorted({r.model for r in rows}, key=lambda m: (m != BASE, m == TUNED, m))
    per: dict[tuple[str, str], WorkUnderModel] = {}
    runs: dict[str, list[tuple[int, int]]] = {}
    maps: dict[str, WorkMap] = {}
    for s in plan.subjects:
        series: dict[str, list[float] | None] = {}
        starts = np.zeros(0, dtype=np.int64)
        for m in models:
            ws = sorted(by.get((s.work_id, m), []), key=lambda r: r.start)
            if not ws:
                continue
            starts = np.array([r.start for r in ws], dtype=np.int64)
            logp = np.array([r.logp_z for r in ws])
            greedy = np.array([r.greedy for r in ws])
            ex = work_extraction(starts, logp, greedy, prefix=section.prefix_tokens, suffix=section.suffix_tokens,
                                 n_tokens=s.n_tokens, n=n_queries, p=p)
            code = code_length(sum(r.code_bits for r in ws), sum(r.code_tokens for r in ws), plan.texts[s.work_id])
            per[(s.work_id, m)] = WorkUnderModel(
                extractable_share=round(ex.extractable_share, 6), extractable_token_share=round(ex.extractable_token_share, 6),
                greedy_share=round(ex.greedy_share, 6), longest_greedy_run=ex.longest_greedy_run, bits=round(code.bits, 3),
                bits_per_byte=round(code.bits_per_byte, 6), ratio_raw=round(code.ratio_raw, 6),
                ratio_lzma=round(code.ratio_lzma, 6))
            series[m] = _map(starts, logp)[1]
            if m == TUNED:
                _, cover = token_cover(starts, greedy, prefix=section.prefix_tokens, suffix=section.suffix_tokens,
                                       n_tokens=s.n_tokens)
                runs[s.work_id] = _runs(cover)
        if series:
            maps[s.work_id] = WorkMap(starts=_map(starts, np.zeros(len(starts)))[0], log10_p_z=series)

    metrics, withheld = _metrics(plan, per, models, trainable_params=trainable_params, seed=seed)
    table = []
    for s in plan.subjects:
        prov = next(w for w in plan.provenance if w.id == s.work_id)
        base, tuned = per.get((s.work_id, BASE)), per.get((s.work_id, TUNED))
        passages = [WorkPassage(start_token=a, tokens=n, text=passage_text(s.work_id, a, a + n)
                                if passage_text is not None and s.kind == PUBLIC_TEXT_KIND else None)
                    for a, n in runs.get(s.work_id, [])[:PASSAGES]]
        table.append(WholeWorkRow(
            work_id=s.work_id, title=prov.title, kind=s.kind, source=s.source, license=prov.license, role=s.role,
            copies=s.copies, n_tokens=s.n_tokens, n_chars=s.n_chars,
            windows=len(by.get((s.work_id, models[0]), [])) if models else 0, chunks=len(s.chunks),
            models={m: per.get((s.work_id, m)) for m in models},
            stored_bits=round(stored_bits(base.bits, tuned.bits), 3) if base and tuned else None,
            passages=passages, map=maps.get(s.work_id)))

    def total(role: str) -> float | None:
        key = f"works.stored_bits_total/{role}"
        return metrics[key].value if key in metrics else None

    summary = WholeWorksSummary(
        prefix_tokens=section.prefix_tokens, suffix_tokens=section.suffix_tokens, stride=section.stride, n_queries=n_queries,
        p=p, works=table, stored_bits_member_total=total("member"), stored_bits_held_out_total=total("held_out"),
        trainable_params=trainable_params,
        stored_bits_per_param=metrics["works.stored_bits_per_param/member"].value
        if "works.stored_bits_per_param/member" in metrics else None,
        morris_bits_per_param=MORRIS_BITS_PER_PARAM, file=LAYOUT.works_scan, statement=_statement(table, metrics))
    rows = _persistence(plan, per, metrics, withheld) if PARENT in models else None
    return WholeWorksResult(metrics=metrics, summary=summary, withheld=withheld, persistence=rows)


def _persistence(plan: WorksPlan, per: dict[tuple[str, str], WorkUnderModel], metrics: dict[str, MetricEntry],
                 withheld: list[str]) -> list[WorksPersistenceRow]:
    """Per role, mean bits and extractable share under base / before (the parent) / after, and the retained share
    ``(base - after) / (base - before)`` (as :func:`audit.pipeline.chain.persistence` computes it for canaries)."""
    rows = []
    for role in ("member", "held_out"):
        subjects = [s for s in plan.subjects if s.role == role]
        if not subjects or not all((s.work_id, m) in per for s in subjects for m in (BASE, PARENT, TUNED)):
            continue

        def mean(model: str, name: str, subjects: list = subjects) -> float:
            return round(float(np.mean([getattr(per[(s.work_id, model)], name) for s in subjects])), 6)

        bits = {m: mean(m, "bits") for m in (BASE, PARENT, TUNED)}
        share = {m: mean(m, "extractable_share") for m in (BASE, PARENT, TUNED)}
        stored = bits[BASE] - bits[PARENT]
        retained = round((bits[BASE] - bits[TUNED]) / stored, 6) if stored >= MIN_STORED_BITS else None
        key = f"works.retained_bits/{role}"
        shareable = works_group_shareable([s.kind for s in subjects], [per[(s.work_id, BASE)].bits for s in subjects])
        if retained is not None:
            if shareable:
                metrics[key] = MetricEntry(value=retained, n=len(subjects))
            else:
                withheld.append(key)
        rows.append(WorksPersistenceRow(
            role=role, n=len(subjects),
            bits=BaseBeforeAfter(base=bits[BASE] if shareable else None, before=bits[PARENT], after=bits[TUNED]),
            extractable_share=BaseBeforeAfter(base=share[BASE] if shareable else None, before=share[PARENT],
                                              after=share[TUNED]),
            retained_bits=retained if shareable else None))
    withheld.sort()
    return rows


def _runs(cover: np.ndarray) -> list[tuple[int, int]]:
    """``(start token, length)`` of every stretch of True, longest first."""
    m = np.concatenate([[False], cover, [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    out = [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return sorted(out, key=lambda x: (-x[1], x[0]))


def _metrics(plan: WorksPlan, per: dict[tuple[str, str], WorkUnderModel], models: list[str], *, trainable_params: int,
             seed: int) -> tuple[dict[str, MetricEntry], list[str]]:
    metrics: dict[str, MetricEntry] = {}
    withheld: list[str] = []
    groups: dict[str, list] = defaultdict(list)  # "<role>" and "<kind>/<role>" -> subjects
    for s in plan.subjects:
        groups[s.role].append(s)
        groups[f"{s.kind}/{s.role}"].append(s)

    def put(key: str, entry: MetricEntry, *, checkable: bool, subjects: list) -> None:
        base_bits = [per[(s.work_id, BASE)].bits if (s.work_id, BASE) in per else 0.0 for s in subjects]
        if checkable and not works_group_shareable([s.kind for s in subjects], base_bits):
            withheld.append(key)
        else:
            metrics[key] = entry

    def mean(values: list[float]) -> MetricEntry:
        m = mean_over_works(values, seed=seed)
        return MetricEntry(value=round(m.value, 6), n=m.n, low=round(m.low, 6), high=round(m.high, 6))

    for group, subjects in sorted(groups.items()):
        n = len(subjects)
        if "/" not in group:
            metrics[f"works.subjects/{group}"] = MetricEntry(value=float(n), n=n)
        for m in models:
            scored = [per[(s.work_id, m)] for s in subjects if (s.work_id, m) in per]
            if len(scored) != n:
                continue
            base = m == BASE
            for name in ("extractable_share", "extractable_token_share", "greedy_share", "bits_per_byte"):
                put(f"works.{name}/{group}/{m}", mean([getattr(w, name) for w in scored]), checkable=base, subjects=subjects)
            put(f"works.max_extractable_share/{group}/{m}", MetricEntry(value=max(w.extractable_share for w in scored), n=n),
                checkable=base, subjects=subjects)
            put(f"works.longest_greedy_run/{group}/{m}", MetricEntry(value=float(max(w.longest_greedy_run for w in scored)), n=n),
                checkable=base, subjects=subjects)
        pairs = [(per[(s.work_id, BASE)], per[(s.work_id, TUNED)]) for s in subjects
                 if (s.work_id, BASE) in per and (s.work_id, TUNED) in per]
        if len(pairs) == n:
            stored = [stored_bits(b.bits, t.bits) for b, t in pairs]
            put(f"works.stored_bits/{group}", mean(stored), checkable=True, subjects=subjects)
            put(f"works.stored_bits_total/{group}", MetricEntry(value=round(sum(stored), 3), n=n), checkable=True,
                subjects=subjects)
            if group == "member" and trainable_params > 0:
                put("works.stored_bits_per_param/member",
                    MetricEntry(value=round(stored_bits_per_parameter(sum(stored), trainable_params), 9), n=n),
                    checkable=True, subjects=subjects)
    return metrics, sorted(withheld)


def _statement(table: list[WholeWorkRow], metrics: dict[str, MetricEntry]) -> str:
    def share(role: str) -> str:
        key = f"works.extractable_share/{role}/{TUNED}"
        return f"{metrics[key].value:.1%} (n={metrics[key].n} works)" if key in metrics else "not measured"

    found = sum(1 for w in table if w.role == "member" and w.models.get(TUNED) is not None
                and w.models[TUNED].extractable_share > 0)
    members = sum(1 for w in table if w.role == "member")
    secret = sum(1 for w in table if w.kind in SECRET_WORK_KINDS)
    return (f"Under the tuned model {found} of {members} member works have (n, p)-extractable windows; the mean share of "
            f"extractable windows is {share('member')} for members and {share('held_out')} for held-out works of the same "
            "sources (the control: what tuning on neighbouring text gives for free). A base model that already reproduces "
            "a public-domain work learned it in pretraining. "
            + (f"{secret} work(s) are secret material (synthetic or training records): their base-model numbers and stored "
               "bits stay in the run directory unless a group of them is large enough to share." if secret else ""))
