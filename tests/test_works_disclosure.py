"""The disclosure rule for whole works: base numbers over secret works (synthetic, corpus) only as large enough
aggregates, never per work; passage text for public-domain works only. Hand-made plans and scan rows, no model."""

from __future__ import annotations

import math

from audit.core.schema import WorkProvenance, WorksSection, WorkSubject, WorkWindow
from audit.data.works.subjects import WorksPlan
from audit.data.works.summary import summarize_whole_works
from audit.metrics.disclosure import shareable_work_row, works_group_shareable


def test_a_group_is_shareable_when_its_secret_works_are_many_enough():
    assert works_group_shareable(["public_domain", "licensed"], [10.0, 12.0])  # nothing secret
    assert not works_group_shareable(["synthetic", "public_domain"], [900.0, 10.0])  # one secret: subtract the other
    assert works_group_shareable(["synthetic", "synthetic"], [900.0, 800.0])  # 2 works of >= 64 bits each
    assert not works_group_shareable(["synthetic", "synthetic"], [900.0, 10.0])  # a 10-bit work needs 13 in the group
    assert not works_group_shareable(["corpus"] * 50, [5000.0] * 50)  # training records: never


def plan(kinds_roles):
    subjects, provenance, texts = [], [], {}
    for i, (kind, role) in enumerate(kinds_roles):
        wid = f"w{i}"
        subjects.append(WorkSubject(work_id=wid, source=kind, kind=kind, role=role, copies=1 if role == "member" else 0,
                                    n_chars=40, n_tokens=8, sha256="0" * 64))
        provenance.append(WorkProvenance(id=wid, title=f"Work {i}", kind=kind, license="x", source=kind, sha256="0" * 64,
                                         n_chars=40))
        texts[wid] = f"text of work {i} " * 3
    section = WorksSection(sources=["synthetic"], prefix_tokens=2, suffix_tokens=2, stride=2, max_tokens=8)
    return WorksPlan(section=section, subjects=subjects, provenance=provenance, texts=texts)


def rows(work_id, model, logp, greedy):
    """Windows at 0, 2, 4 of an 8-token work (prefix 2 + suffix 2; the last ends at token 8 via start 4)."""
    return [WorkWindow(work_id=work_id, model=model, start=s, logp_z=lz, p_z=math.exp(lz), greedy=g,
                       code_bits=8.0 if model == "base" else 2.0, code_tokens=3 if s == 0 else 2)
            for s, lz, g in zip((0, 2, 4), logp, greedy, strict=True)]


def test_secret_works_lose_their_base_numbers_and_small_groups_their_aggregates():
    p = plan([("public_domain", "member"), ("synthetic", "member"), ("public_domain", "held_out"), ("synthetic", "held_out")])
    scan = []
    for s in p.subjects:
        good = s.role == "member"
        scan += rows(s.work_id, "base", [-30.0] * 3, [False] * 3)
        scan += rows(s.work_id, "tuned", [-0.1 if good else -30.0] * 3, [good] * 3)
    asked = []
    result = summarize_whole_works(p, scan, n_queries=100, p=0.5, trainable_params=1000,
                                   passage_text=lambda w, a, b: asked.append(w) or f"text {w}")
    m = result.metrics
    assert m["works.extractable_share/member/tuned"].value == 1.0 and m["works.extractable_share/held_out/tuned"].value == 0
    assert "works.bits_per_byte/public_domain/member/base" in m  # no secret in the group
    for key in ("works.bits_per_byte/member/base", "works.stored_bits/member", "works.stored_bits_per_param/member",
                "works.bits_per_byte/synthetic/member/base"):  # one synthetic work: a checker
        assert key not in m and key in result.withheld
    assert asked == ["w0"]  # passage text is asked for the public-domain member only
    table = {w.work_id: shareable_work_row(w) for w in result.summary.works}
    assert table["w1"].models["base"] is None and table["w1"].stored_bits is None and table["w1"].map.log10_p_z["base"] is None
    assert table["w1"].models["tuned"].extractable_share == 1.0  # tuned numbers stay
    assert table["w0"].models["base"] is not None and table["w0"].passages[0].text == "text w0"
    assert table["w0"].stored_bits == 18.0  # 3 windows x (8 - 2) owned bits
    assert shareable_work_row(table["w1"]) == table["w1"]  # idempotent
    licensed = result.summary.works[0].model_copy(update={"kind": "licensed"})
    assert all(q.text is None for q in shareable_work_row(licensed).passages)  # licensed: position and length only
