"""Lineage nodes: content-addressed ids, parents, and the derived artefacts of a tune (merged weights, outputs)."""

from __future__ import annotations

from audit.core import lineage


def test_node_ids_are_kind_and_fingerprint_and_parents_are_ids():
    base = lineage.node("base_weights", "tiny", "a" * 64)
    data = lineage.data_node("builtin:notes", "digits", "b" * 64, n_records=10)
    tuned = lineage.node("tuned_weights", lineage.tune_label("lora", further=False), "c" * 64, [base, data])
    assert base.id == "base_weights:" + "a" * 12 and tuned.parents == [base.id, data.id]
    assert data.label == "builtin:notes + digits canaries" and data.details == {"n_records": 10, "canaries_planted": True}


def test_clean_data_and_further_tunes_say_so():
    clean = lineage.data_node("builtin:notes", "digits", "d" * 64, n_records=5, planted=False)
    assert "clean" in clean.label and clean.details["canaries_planted"] is False
    assert lineage.tune_label("full", further=True) == "further full fine-tune"


def test_derived_nodes_hang_off_the_tuned_weights():
    tuned = lineage.node("tuned_weights", "lora fine-tune", "c" * 64)
    assert lineage.derived_nodes(tuned) == []
    merged, outputs = lineage.derived_nodes(tuned, merged_fingerprint="e" * 64, merged_path="merged",
                                            outputs_fingerprint="f" * 64, outputs_details={"samples": 32})
    assert merged.kind == "tuned_weights" and merged.details == {"path": "merged", "form": "merged"}
    assert outputs.kind == "outputs" and outputs.details == {"samples": 32}
    assert merged.parents == outputs.parents == [tuned.id]
