"""The run-directory layout (audit.core.layout): every file named once, every record file versioned.

Files written before ``children.jsonl``, ``outputs.jsonl``, ``tracking_pending.jsonl`` and ``probe.json`` carried a
``schema_version`` still read (as version 0); one written by a newer canary-audit is refused with one line.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from audit.core.errors import AuditError
from audit.core.layout import LAYOUT, SCHEMA_VERSIONS, RunLayout, check_version

AUDIT = Path(__file__).resolve().parent.parent / "audit"
NEWER = 10**6


def _owned_names() -> set[str]:
    names = {getattr(LAYOUT, f.name) for f in dataclasses.fields(RunLayout)}
    labelled = {LAYOUT.scores_of(""), LAYOUT.calibration_of(""), LAYOUT.works_scan_of("")}  # "scores_.jsonl", ...
    return names | {name.split(".")[0] for name in labelled}  # and the prefixes an f-string builds them from


def test_no_run_directory_file_name_is_spelled_outside_the_layout():
    """A string constant that is exactly a name the layout owns (or a per-model prefix such as ``scores_``) outside
    audit/core/layout.py is a second place that name lives. Prose that mentions a file (docstrings, messages) is allowed."""
    owned = _owned_names()
    assert {"report.json", "children.jsonl", "scores_", "works_scan_"} <= owned
    found = []
    for path in sorted(AUDIT.rglob("*.py")):
        if path == AUDIT / "core" / "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in owned:
                found.append(f"{path.relative_to(AUDIT.parent)}:{node.lineno}: {node.value!r}")
    assert found == [], "use audit.core.layout.LAYOUT instead of:\n" + "\n".join(found)


def test_every_file_of_the_layout_has_a_version_decision():
    names = {getattr(LAYOUT, f.name) for f in dataclasses.fields(RunLayout)}
    per_model = {LAYOUT.scores_of("<label>"), LAYOUT.calibration_of("<label>"), LAYOUT.works_scan_of("<label>"),
                 LAYOUT.release_of("<label>")}
    assert set(SCHEMA_VERSIONS) == names | per_model
    for name in (LAYOUT.children, LAYOUT.outputs, LAYOUT.pending, LAYOUT.probe, LAYOUT.report, LAYOUT.status):
        assert isinstance(SCHEMA_VERSIONS[name], int) and SCHEMA_VERSIONS[name] >= 1, name
    for frozen in (LAYOUT.canaries, LAYOUT.scores):  # rows whose bytes the byte-identity promise fixes: no field added
        assert SCHEMA_VERSIONS[frozen] is None


def test_check_version_reads_old_and_current_rows_and_refuses_newer_or_damaged(tmp_path):
    path = tmp_path / LAYOUT.children
    assert check_version(path, {"run_dir": "x"}) == 0
    assert check_version(path, {"schema_version": SCHEMA_VERSIONS[LAYOUT.children]}) == 1
    with pytest.raises(AuditError) as newer:
        check_version(path, {"schema_version": NEWER})
    assert str(path) in newer.value.problem and "upgrade canary-audit" in newer.value.fix
    for damaged in ("1", -1, True, None):
        with pytest.raises(AuditError, match="no canary-audit writes"):
            check_version(path, {"schema_version": damaged})


# --------------------------------------------------------------------------------------------------- children.jsonl


def _record(parent_dir: Path, child_dir: Path) -> None:
    from audit.pipeline.chain import record_child

    node = SimpleNamespace(id=f"weights:{child_dir.name}", fingerprint="f" * 64)
    record_child(SimpleNamespace(run_dir=parent_dir), run_dir=child_dir, tuned_node=node, metrics={})


def test_an_old_children_file_is_read_and_new_lines_carry_the_version(tmp_path):
    old_child, new_child = tmp_path / "child-old", tmp_path / "child-new"
    old = json.dumps({"run_dir": str(old_child.resolve()), "node": "weights:old", "fingerprint": "0" * 64,
                      "created_at": "2026-01-01T00:00:00+00:00", "persistence": {}}, sort_keys=True) + "\n"
    (tmp_path / LAYOUT.children).write_text(old)
    _record(tmp_path, old_child)  # already recorded by the old line: not recorded twice
    assert (tmp_path / LAYOUT.children).read_text() == old
    _record(tmp_path, new_child)
    lines = (tmp_path / LAYOUT.children).read_text().splitlines()
    assert lines[0] + "\n" == old and len(lines) == 2
    added = json.loads(lines[1])
    assert added["schema_version"] == SCHEMA_VERSIONS[LAYOUT.children] and added["run_dir"] == str(new_child.resolve())


def test_a_newer_children_file_is_refused_and_left_as_it_is(tmp_path):
    newer = json.dumps({"run_dir": "/elsewhere", "schema_version": NEWER}) + "\n"
    (tmp_path / LAYOUT.children).write_text(newer)
    with pytest.raises(AuditError) as err:
        _record(tmp_path, tmp_path / "child")
    assert LAYOUT.children in err.value.problem and "upgrade canary-audit" in err.value.fix
    assert (tmp_path / LAYOUT.children).read_text() == newer


# --------------------------------------------------------------------------------------------------- outputs.jsonl


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}


def _outputs(run_dir: Path):
    from audit.core.schema import Canary, CanarySet, OutputsSection, SecretSpace
    from audit.core.store import StageStore
    from audit.score.outputs import outputs_stage

    cs = CanarySet(spec="t", spec_version=1, seed=0, space=SecretSpace(alphabet=list("0123456789"), length=6),
                   canaries=[Canary(id="m", spec="t", prefix="pin ", secret="482910", suffix=".", repetitions=4),
                             Canary(id="r", spec="t", prefix="pin ", secret="130577", suffix=".", repetitions=0)])
    section = OutputsSection(samples=1, prompts=[])
    return outputs_stage(StageStore(run_dir), None, _CharTokenizer(), cs, section, seed=0, progress=False)  # no model: reuse only


def test_an_old_outputs_file_is_reused(tmp_path):
    rows = [{"id": "s0", "prompt_id": "unprompted", "token_ids": [1, 2], "text": "pin 482910", "secret_hits": []}]
    (tmp_path / LAYOUT.outputs).write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _outputs(tmp_path)
    assert result.summary["reused"] and [r["id"] for r in result.rows] == ["s0"]
    assert result.metrics["outputs.samples_exact/members"].value == 1


def test_a_newer_outputs_file_is_refused(tmp_path):
    row = {"id": "s0", "prompt_id": "unprompted", "token_ids": [], "text": "", "schema_version": NEWER}
    (tmp_path / LAYOUT.outputs).write_text(json.dumps(row) + "\n")
    with pytest.raises(AuditError) as err:
        _outputs(tmp_path)
    assert LAYOUT.outputs in err.value.problem and "upgrade canary-audit" in err.value.fix


# --------------------------------------------------------------------------------------------------- tracking_pending.jsonl


STATUS_CALL = {"op": "status", "run": "parent", "status": "RUNNING"}


def test_an_old_pending_file_is_read_and_kept_calls_carry_the_version(tmp_path):
    from audit.report.tracking import Tracker, _read_pending

    path = tmp_path / LAYOUT.pending
    path.write_text(json.dumps(STATUS_CALL) + "\n")  # written before the file was versioned
    Tracker(None, "http://unused", pending=path)._keep(STATUS_CALL)
    kept = [op for _, op in _read_pending(path, tmp_path)]
    assert kept == [STATUS_CALL, {**STATUS_CALL, "schema_version": SCHEMA_VERSIONS[LAYOUT.pending]}]


def test_a_newer_pending_file_is_refused_before_anything_is_sent(tmp_path):
    from audit.report.tracking import replay_pending

    path = tmp_path / LAYOUT.pending
    text = json.dumps(STATUS_CALL) + "\n" + json.dumps({**STATUS_CALL, "schema_version": NEWER}) + "\n"
    path.write_text(text)
    with pytest.raises(AuditError) as err:
        replay_pending(tmp_path, "http://127.0.0.1:9", run_id="r")  # refused before the server is even tried
    assert LAYOUT.pending in err.value.problem and "upgrade canary-audit" in err.value.fix
    assert path.read_text() == text


# --------------------------------------------------------------------------------------------------- probe.json


def test_probe_files_old_and_newer(tmp_path):
    from audit.report.render.token_view import read_token_views

    probe = {"text": "ab", "tokens": [{"text": "a", "p_base": 0.5, "p_tuned": 0.25}], "bits_base": 1.0}
    (tmp_path / LAYOUT.probe).write_text(json.dumps(probe))  # written before probe.json was versioned
    assert len(read_token_views(tmp_path)) == 1
    (tmp_path / LAYOUT.probe).write_text(json.dumps({**probe, "schema_version": NEWER}))
    with pytest.raises(AuditError, match="upgrade canary-audit"):
        read_token_views(tmp_path)


def test_a_release_checkpoint_is_versioned_and_a_newer_one_is_refused(tmp_path):
    from audit.pipeline.release.stage import Release, ReleaseArtifact

    artifact = ReleaseArtifact("release:q4_0")
    assert artifact.name == "release_q4_0.json"
    release = Release(label="release:q4_0", kind="gguf", quantization="q4_0", path="releases/model.q4_0.gguf",
                      fingerprint="ab" * 32, bytes=10, seconds=1.0)
    artifact.write(tmp_path, release)
    assert json.loads((tmp_path / artifact.name).read_text())["schema_version"] == 1
    assert artifact.read(tmp_path) == release
    data = json.loads((tmp_path / artifact.name).read_text())
    (tmp_path / artifact.name).write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(AuditError, match="release_q4_0.json is schema_version 99, newer"):
        artifact.read(tmp_path)
