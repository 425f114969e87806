"""What a shared artifact may say about canary secrets: the disclosure rule of the threat model, in one place.

The rule (docs/threat-model.md): **no shared artifact (report.json/html/md, token_view.json, plots,
MLflow params, metrics, tags and artifacts, printed output) holds a number that is a function of secrets and that
someone holding only public inputs (the base model, the spec, the recipe with its seed, the prefixes, the key id)
could compute for guessed secrets.** Such a number is a *guess-checker*: score every candidate secret under the
public base model and keep the ones that reproduce it. Issue 23 found one in the token view: the published
``p_base`` of each masked secret token picked the right digit position by position, 6 forward passes for a
6-digit secret.

What is a checker here:

* any number of the **base model** on secrets (``.../base`` keys: bits, exposures, extraction flags, compression,
  the null calibration on references): the base model is public;
* a **difference to the base** (``information.memorized_bits``, ``works.memorized_bits``) when the tuned side is
  published too: tuned + difference gives the base value back.

Values that need the tuned weights (or the key: the sampled references are drawn under it) are not checkers by
themselves; ranks and AUCs that mix members with references need both.

Per secret, nothing of the kind is published (the token view shows only a coarse band of how much more probable
each secret position became, :func:`gain_band`). **Aggregates** over a group of k secrets are published only when
checking them means guessing the group at once at a cost of at least 2^:data:`SEARCH_BITS`: a sum over k secrets
drawn from a space of b bits splits into two halves, so the cheapest generic search (meet in the middle) costs
about 2^(k b / 2) candidate combinations; hence the minimum group :func:`min_group` = ceil(2 * 64 / b), at least 2
(7 for the 19.9-bit digits spec: the default audit's 8 members per tier publish everything, ``tiny/lora_cpu``'s
2 per tier withhold their base numbers). A withheld number stays in the run directory (``scores.jsonl``, 0600):
whoever holds the secrets may read it there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from audit.core.schema import AuditReport, DisclosureSummary, MetricEntry, WholeWorkRow

SEARCH_BITS = 64
"""Guessing a group of secrets must cost at least 2^64 combinations before a published aggregate can check it."""
BASE = "base"
DIFFERENCE_FAMILIES = ("information.memorized_bits", "works.memorized_bits", "persistence.retained_bits",
                       "persistence.retained_exposure", "works.stored_bits", "works.stored_bits_total",
                       "works.stored_bits_per_param", "works.retained_bits")
"""Functions of the base value that give it back beside the tuned values published with them: base minus tuned, and
a further tune's retained share (base - after) / (base - before)."""
GAIN_BANDS = ((0.5, "none"), (2.0, "small"), (6.0, "large"), (math.inf, "very large"))
"""Upper edges (bits) of the bands of a secret token's gain log2(p_tuned / p_base), and their names."""
RULE = ("no shared number is a function of secrets that the public base model, spec, recipe and prefixes could "
        "check a guess against; base-model aggregates and differences to base only over groups of at least {k} "
        "secrets (2^{bits} guesses by meet in the middle over a {space:.1f}-bit space)")


SECRET_WORK_KINDS = ("synthetic", "corpus")
"""Whole works whose text is secret material: ``synthetic`` works are sampled under the audit key, ``corpus`` records
are the training data itself. A base-model number over one (bits, p_z under base) or a difference to base checks a
guessed text; public-domain and licensed works are named by their sha256 already (not secret)."""
PUBLIC_TEXT_KIND = "public_domain"
"""The one kind of whole work whose text a shared report may quote."""
WHOLE_WORK_FAMILIES = ("works.extractable_share", "works.extractable_token_share", "works.greedy_share",
                       "works.stored_bits", "works.stored_bits_total", "works.stored_bits_per_param", "works.bits_per_byte",
                       "works.max_extractable_share", "works.longest_greedy_run", "works.subjects", "works.retained_bits")
"""Metric families of whole works (:mod:`audit.data.works.summary`): judged per group of works when they are made
(:func:`works_group_shareable`), since their ``n`` counts works of mixed kinds, not secrets of the canary space."""


def min_group(space_bits: float) -> int:
    """Smallest group of secrets whose base-model aggregate may be published: ceil(2 * SEARCH_BITS / space_bits)."""
    if not space_bits or space_bits <= 0 or not math.isfinite(space_bits):
        return 2
    return max(2, math.ceil(2 * SEARCH_BITS / space_bits))


def is_checkable(key: str) -> bool:
    """Whether a flat metric key is computable from public inputs for guessed secrets (a base value or a
    difference to base)."""
    parts = key.split("/")
    return parts[-1] == BASE or parts[0] in DIFFERENCE_FAMILIES


def gain_band(bits: float) -> str:
    """The band of one secret token's gain in bits (log2 p_tuned - log2 p_base): what the per-token view shows."""
    for edge, name in GAIN_BANDS:
        if bits < edge:
            return name
    return GAIN_BANDS[-1][1]


def works_group_shareable(kinds: list[str], base_bits: list[float]) -> bool:
    """Whether a base-model aggregate (or a difference to base) over whole works of ``kinds`` may be shared.

    Only the secret works in the group count (the others' values anyone can compute and subtract). ``corpus`` records
    never: how much of a record is unknown to an attacker is not known (a template with one unknown digit is 3.3
    bits). ``synthetic`` works: at least :func:`min_group` of them, with the space of each taken as its code length
    under the base model it was sampled from (the log-size of its typical set: an attacker guessing it with that base
    model needs about 2^bits tries), so in practice two works of a few hundred tokens."""
    secret = [(k, b) for k, b in zip(kinds, base_bits, strict=True) if k in SECRET_WORK_KINDS]
    if not secret:
        return True
    if any(k == "corpus" for k, _ in secret):
        return False
    return len(secret) >= min_group(min(b for _, b in secret))


def shareable_metrics(metrics: Mapping[str, MetricEntry], *, space_bits: float) -> tuple[dict[str, MetricEntry], list[str]]:
    """``metrics`` without the checkers over too few secrets; the withheld keys, sorted. A checkable entry with no
    sample size is withheld (its group is unknown). Whole-work families were judged when made (:data:`WHOLE_WORK_FAMILIES`)."""
    k = min_group(space_bits)
    kept, withheld = {}, []
    for key, entry in metrics.items():
        if key.split("/")[0] in WHOLE_WORK_FAMILIES:
            kept[key] = entry
        elif is_checkable(key) and (entry.n is None or entry.n < k):
            withheld.append(key)
        else:
            kept[key] = entry
    return kept, sorted(withheld)


def withheld_keys(report: AuditReport) -> frozenset[str]:
    return frozenset(report.disclosure.withheld) if report.disclosure else frozenset()


def tier_models(report: AuditReport) -> list[str]:
    """The model labels of the tier table, base first: those with numbers and those whose numbers were withheld."""
    shown = {m for t in report.tiers for m in t.exposure_mean}
    shown |= {k.rsplit("/", 1)[1] for k in withheld_keys(report) if k.startswith("exposure.mean/")}
    return sorted(shown, key=lambda m: (m != BASE, m.startswith("release:"), m))  # base, tuned, then releases


def redact_report(report: AuditReport) -> AuditReport:
    """The report as it may be shared: every checker over fewer than :func:`min_group` secrets removed from the
    metrics, the tier table, the curves and the persistence table, and the rule with what it withheld recorded in
    ``report.disclosure``. Idempotent, so a report written before the rule existed is redacted when it is read."""
    k = min_group(report.space_bits)
    metrics, withheld = shareable_metrics(report.metrics, space_bits=report.space_bits)
    tiers = []
    for tier in report.tiers:
        small = {"exposure_mean": tier.exposure_count < k, "extracted": tier.exposure_count < k}
        update = {field: {m: v for m, v in getattr(tier, field).items() if m != BASE}
                  for field, is_small in small.items() if is_small and BASE in getattr(tier, field)}
        if update:
            withheld += [key for key in tier.flat_metrics() if key.endswith(f"/{BASE}")]
            tier = tier.model_copy(update=update)
        tiers.append(tier)
    persistence = report.persistence
    if persistence is not None:
        def shareable_tiers(rows: list, suffix: str = "") -> list:
            out = []
            for row in rows:
                if row.n < k and row.bits.base is not None:
                    blank = {f: getattr(row, f).model_copy(update={BASE: None})
                             for f in ("bits", "exposure_space", "exposure_sampled", "extracted")}
                    blank.update(retained_bits=None, retained_exposure=None)
                    row = row.model_copy(update=blank)
                    withheld.append(f"persistence.base/rep_{row.repetitions}{suffix}")
                out.append(row)
            return out

        releases = {label: shareable_tiers(rows, f"/{label}") for label, rows in (persistence.by_release or {}).items()}
        persistence = persistence.model_copy(update={"tiers": shareable_tiers(persistence.tiers),
                                                     "by_release": releases or persistence.by_release})
    works = report.canaries.works_information
    rows = []
    for work in works.by_work:
        blank = {f"{role}_bits_{BASE}": None for role in ("member", "held_out")
                 if getattr(work, f"{role}_excerpts") < k and getattr(work, f"{role}_bits_{BASE}") is not None}
        withheld += [f"works.{role}/{work.work_id}" for role in ("member", "held_out") if f"{role}_bits_{BASE}" in blank]
        rows.append(work.model_copy(update=blank) if blank else work)
    canaries = report.canaries.model_copy(update={"works_information": works.model_copy(update={"by_work": rows})})
    whole = report.whole_works
    if whole is not None:
        whole = whole.model_copy(update={"works": [shareable_work_row(w) for w in whole.works]})
    withheld_all = sorted(set(withheld) | set(report.disclosure.withheld if report.disclosure else ()))
    curves = {key: points for key, points in report.curves.items() if key not in withheld_all}
    disclosure = DisclosureSummary(min_group=k, search_bits=SEARCH_BITS, withheld=withheld_all,
                                   rule=RULE.format(k=k, bits=SEARCH_BITS, space=report.space_bits))
    return report.model_copy(update={"metrics": metrics, "tiers": tiers, "persistence": persistence, "canaries": canaries,
                                     "curves": curves, "disclosure": disclosure, "whole_works": whole})


def shareable_work_row(row: WholeWorkRow) -> WholeWorkRow:
    """A work's row as it may be shared (idempotent): passage text for public-domain works only (a licensed or private
    work shows positions and lengths); a secret work without its base-model numbers, stored bits or base map."""
    passages = row.passages if row.kind == PUBLIC_TEXT_KIND else [p.model_copy(update={"text": None}) for p in row.passages]
    if row.kind not in SECRET_WORK_KINDS:
        return row.model_copy(update={"passages": passages})
    models = {m: (None if m == BASE else v) for m, v in row.models.items()}
    work_map = row.map
    if work_map is not None and work_map.log10_p_z.get(BASE) is not None:
        work_map = work_map.model_copy(update={"log10_p_z": {**work_map.log10_p_z, BASE: None}})
    return row.model_copy(update={"models": models, "stored_bits": None, "map": work_map, "passages": passages})
