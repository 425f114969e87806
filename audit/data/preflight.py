"""Pre-flight checks: prove, before training, that every planted canary copy will reach the loss.

An audit that plants canaries the trainer never trains on measures nothing and reports "no memorization". The
checks replay what TRL's ``SFTTrainer`` does to each record that carries a canary (trl 1.x ``_prepare_dataset``:
render chat records with the chat template, append EOS to text, tokenize with special tokens, build the loss
mask, truncate to ``max_length`` or pack) and then look at the tokens under the canary's characters
(``prefix + secret``; a cut suffix does no harm):

``missing``           the placement's record does not hold the canary where the manifest says, or no token covers it;
``loss_masked``       the canary sits in a user / system turn under ``assistant_only_loss``, or in the prompt under
                      ``completion_only_loss`` (labels -100: it would never be learned);
``truncated``         some of its tokens fall past ``max_length`` (``keep_start``) or before the kept tail (``keep_end``);
``split_by_packing``  packing would cut it across two training sequences (``wrapped`` in dataset order, or an
                      overlong record cut into ``max_length`` chunks by ``bfd_split``).

Pure: it needs a tokenizer object (a fast tokenizer, for character offsets), not torch. Findings carry canary ids
and token positions, never secret text.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from audit.core.errors import AuditError
from audit.core.schema import CanarySet, InjectionManifest, Placement, PreflightFinding, PreflightReport

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
)
"""Used to render chat records for a tokenizer that ships no chat template (the tiny test model)."""

Packing = Literal[False, "bfd", "bfd_split", "wrapped"]

_FIXES = {
    "missing": "re-run the inject stage (the records no longer match the manifest) or check the chat template keeps message text",
    "loss_masked": "place canaries in assistant turns / completions (the default), "
                   "or turn off assistant_only_loss / completion_only_loss",
    "truncated": "raise training.max_length, shorten the canaries, or use corpus.placement=new_record",
    "split_by_packing": "set training.packing=false, or training.packing=bfd with a max_length that holds the longest record",
}


def render_chat(messages: list[dict[str, Any]], tokenizer: Any) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)


def training_text(record: dict[str, Any], *, format: str, text_column: str, messages_column: str, tokenizer: Any) -> str:
    """The string the trainer sees for ``record``: its text column, or its messages rendered with the chat template."""
    if format == "text":
        return record[text_column]
    return render_chat(record[messages_column], tokenizer)


def training_texts(records: list[dict[str, Any]], *, format: str, text_column: str, messages_column: str,
                   tokenizer: Any) -> list[str]:
    return [training_text(r, format=format, text_column=text_column, messages_column=messages_column, tokenizer=tokenizer)
            for r in records]


def _tokenize_like_trl(text: str, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """TRL's language-modeling path: append EOS unless present, tokenize with the tokenizer's special tokens."""
    eos = tokenizer.eos_token or ""
    if eos and not text.endswith(eos):
        text = text + eos
    enc = tokenizer(text=text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def record_tokens(text: str, tokenizer: Any) -> int:
    """Tokens of one text record as the trainer sees it (special tokens, EOS appended)."""
    return len(_tokenize_like_trl(text, tokenizer)[0])


def _locate(record: dict[str, Any] | None, placement: Placement, canary_text: str, *, format: str, tokenizer: Any,
            text_column: str, messages_column: str) -> tuple[str, int, str] | str:
    """``(training text, canary start in it, role)`` or a string saying why the canary is not where it should be."""
    if record is None:
        return f"record {placement.record_index} is not in the training set"
    if format == "text":
        value = record.get(placement.column)
        if not isinstance(value, str) or value[placement.offset : placement.offset + len(canary_text)] != canary_text:
            return (f"record {placement.record_index} column '{placement.column}' "
                    f"does not hold the canary at offset {placement.offset}")
        if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            # TRL's prompt-completion records train on prompt + completion; the prompt is masked by completion_only_loss
            if placement.column == "prompt":
                return record["prompt"] + record["completion"], placement.offset, "prompt"
            if placement.column == "completion":
                return record["prompt"] + record["completion"], len(record["prompt"]) + placement.offset, "completion"
        if placement.column != text_column:
            return f"the canary is in column '{placement.column}', but training reads '{text_column}'"
        return value, placement.offset, "text"
    messages = record.get(placement.column)
    mi = placement.message_index
    if not isinstance(messages, list) or mi is None or not 0 <= mi < len(messages):
        return f"record {placement.record_index} has no message {mi} in '{placement.column}'"
    content = messages[mi].get("content", "")
    if content[placement.offset : placement.offset + len(canary_text)] != canary_text:
        return f"record {placement.record_index} message {mi} does not hold the canary at offset {placement.offset}"
    rendered = render_chat(messages, tokenizer)
    pos = content_at = 0
    for j, m in enumerate(messages[: mi + 1]):  # find each message's text in order, so repeated texts resolve right
        text = m.get("content", "")
        content_at = rendered.find(text, pos)
        if content_at < 0:
            return f"the chat template changed the text of record {placement.record_index} message {j}"
        pos = content_at + len(text)
    return rendered, content_at + placement.offset, str(messages[mi].get("role", ""))


def secret_spans(manifest: InjectionManifest, canaries: CanarySet, records: list[dict[str, Any]], tokenizer: Any, *,
                 texts: list[str]) -> dict[int, list[tuple[int, int]]]:
    """Record index -> the character spans of the secrets its canary copies hold, in its training text ``texts[i]``.

    What ``training.loss=secret`` trains on (Panda et al. 2025 label the secret span alone). Found as the pre-flight
    finds each copy (:func:`_locate`); a copy the pre-flight would flag raises, as the pre-flight has already run."""
    by_id = {c.id: c for c in canaries.canaries}
    lookup = dict(enumerate(records))
    spans: dict[int, list[tuple[int, int]]] = {}
    for p in manifest.placements:
        canary = by_id[p.canary_id]
        where = _locate(lookup.get(p.record_index), p, canary.text, format=manifest.format, tokenizer=tokenizer,
                        text_column=manifest.text_column, messages_column=manifest.text_column)
        if isinstance(where, str) or where[0] != texts[p.record_index]:
            raise AuditError(f"training.loss=secret: canary {p.canary_id} copy {p.copy_index} is not where the training "
                             f"text of record {p.record_index} has it", fix="use training.loss=all for this corpus")
        start = where[1] + len(canary.prefix)
        spans.setdefault(p.record_index, []).append((start, start + len(canary.secret)))
    return spans


def secret_labels(text: str, spans: list[tuple[int, int]] | None, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record as TRL tokenizes it (EOS appended): labels are the ids, or, for a record
    with ``spans``, -100 on every token that overlaps none of them (the secret's tokens alone carry the loss)."""
    ids, offsets = _tokenize_like_trl(text, tokenizer)
    return ids, labels_on_spans(ids, offsets, spans)


def labels_on_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]] | None) -> list[int]:
    """``ids`` with -100 on every token whose characters overlap none of ``spans`` (all ids when there are none):
    the one labelling rule of ``training.loss=secret``, for TRL (:func:`secret_labels`) and DP-SGD alike."""
    if not spans:
        return list(ids)
    return [t if b > a and any(a < end and b > start for start, end in spans) else -100
            for t, (a, b) in zip(ids, offsets, strict=True)]


def run_preflight(
    manifest: InjectionManifest,
    canaries: CanarySet,
    records: dict[int, dict[str, Any]] | list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int | None,
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start",
    packing: Packing = False,
    assistant_only_loss: bool = False,
    completion_only_loss: bool = False,
    secret_only_loss: bool = False,
    all_training_texts: list[str] | None = None,
) -> PreflightReport:
    """Check every placement of ``manifest`` against the training records (index -> record, or the full list).

    ``all_training_texts`` (every record's training text, in order) is needed only for ``packing="wrapped"``,
    where a canary's position in the packed stream depends on every record before it.
    """
    by_id = {c.id: c for c in canaries.canaries}
    lookup = records if isinstance(records, dict) else dict(enumerate(records))
    findings: list[PreflightFinding] = []
    canary_tokens_max = record_tokens_max = needed = 0
    stream_starts: list[int] | None = None
    if packing == "wrapped" and all_training_texts is not None:
        stream_starts, total = [], 0
        for text in all_training_texts:
            stream_starts.append(total)
            total += len(_tokenize_like_trl(text, tokenizer)[0])

    def flag(check: str, p: Placement, detail: str) -> None:
        findings.append(PreflightFinding(check=check, canary_id=p.canary_id, copy_index=p.copy_index,  # type: ignore[arg-type]
                                         record_index=p.record_index, detail=detail))

    for p in manifest.placements:
        canary = by_id.get(p.canary_id)
        if canary is None:
            flag("missing", p, "the manifest names a canary that is not in the canary set")
            continue
        where = _locate(lookup.get(p.record_index), p, canary.text, format=manifest.format, tokenizer=tokenizer,
                        text_column=manifest.text_column, messages_column=manifest.text_column)
        if isinstance(where, str):
            flag("missing", p, where)
            continue
        text, start, role = where
        if assistant_only_loss and manifest.format == "messages" and role != "assistant":
            flag("loss_masked", p, f"the canary is in a '{role}' turn and assistant_only_loss masks every non-assistant token")
        if completion_only_loss and role == "prompt":
            flag("loss_masked", p, "the canary is in the prompt and completion_only_loss masks the prompt")
        end = start + len(canary.prefix) + len(canary.secret)
        ids, offsets = _tokenize_like_trl(text, tokenizer)
        covering = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        record_tokens_max = max(record_tokens_max, len(ids))
        if not covering:
            flag("missing", p, "no token of the tokenized record covers the canary")
            continue
        first, last = covering[0], covering[-1]
        canary_tokens_max = max(canary_tokens_max, last - first + 1)
        needed = max(needed, last + 1)
        span = f"canary tokens {first}..{last} of a {len(ids)}-token record"
        if max_length is not None:
            if packing in (False, "bfd"):
                cut = last >= max_length if truncation_mode == "keep_start" else first < len(ids) - max_length
                if cut:
                    how = "packing=bfd truncates" if packing == "bfd" else f"truncation_mode={truncation_mode}"
                    flag("truncated", p, f"{span}; max_length {max_length} ({how})")
            elif packing == "bfd_split" and first // max_length != last // max_length:
                flag("split_by_packing", p, f"{span}; bfd_split cuts records into {max_length}-token pieces")
            elif packing == "wrapped":
                if stream_starts is None:
                    flag("split_by_packing", p, "wrapped packing cuts the concatenated dataset every max_length tokens; "
                                                "positions unknown without all training texts")
                else:
                    g0, g1 = stream_starts[p.record_index] + first, stream_starts[p.record_index] + last
                    if g0 // max_length != g1 // max_length:
                        flag("split_by_packing", p,
                             f"{span}; wrapped packing cuts at stream token {(g1 // max_length) * max_length}")
    loss = "all tokens (language modeling)"
    if secret_only_loss:
        loss = "the secrets' tokens in records that carry a canary, all tokens elsewhere (training.loss=secret)"
    elif assistant_only_loss:
        loss = "assistant turns only"
    elif completion_only_loss:
        loss = "completions only"
    return PreflightReport(placements_checked=len(manifest.placements), max_length=max_length, loss=loss,
                           packing=str(packing or "off"), canary_tokens_max=canary_tokens_max,
                           record_tokens_max=record_tokens_max, findings=findings, max_length_needed=needed or None)


def require_passed(report: PreflightReport) -> None:
    """Raise an :class:`AuditError` that says what the checks found, if anything."""
    if report.passed:
        return
    counts = Counter(f.check for f in report.findings)
    first = report.findings[0]
    summary = ", ".join(f"{check} x{n}" for check, n in sorted(counts.items()))
    fix = _FIXES[first.check]
    if first.check == "truncated" and report.max_length_needed:
        fix = f"set training.max_length to at least {report.max_length_needed}, or shorten the canaries"
    raise AuditError(
        f"pre-flight: {len(report.findings)} of {report.placements_checked} canary copies would not reach the loss "
        f"({summary}); e.g. canary {first.canary_id} copy {first.copy_index} in record {first.record_index}: {first.detail}",
        fix=fix,
    )
