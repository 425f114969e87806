"""``audit sync RUN_DIR`` replays only what the audit itself would have logged (issue 23, sections 2 and 3).

A line appended to ``tracking_pending.jsonl`` asking for ``canaries.jsonl``, or for a file outside the run
directory, made the sync upload it (exit 0). Now the whole file is checked before the first call: such a line, a
link out of the run directory, or a damaged line (cut short, not UTF-8, no op, not an object) is one error line
naming its number, exit 2, the file byte for byte as it was, and nothing in MLflow. Real sqlite stores throughout;
the run directory is the 7f52ba4 fixture (real canaries, manifest, adapter) whose report the real ``log_report``
logs while the server is away.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from audit.cli import main
from audit.core.layout import LAYOUT
from audit.report.tracking import PARENT_RUN_TAG, tracked_run

FIXTURE = Path(__file__).parent / "fixtures" / "run_7f52ba4_tiny_lora"
OUTSIDE_MARK = b"outside-the-run-directory 4f1c"


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> Path:
    """The fixture run, its report logged by the real ``log_report`` while the server was away: every call kept."""
    from audit.core.schema import InjectionManifest
    from audit.report import read_report

    run_dir = tmp_path_factory.mktemp("template") / "run"
    shutil.copytree(FIXTURE, run_dir)
    (run_dir / "run.json").write_text(json.dumps({"status": "complete", "tracking": "incomplete"}) + "\n")
    manifest = InjectionManifest.model_validate_json((run_dir / "manifest.json").read_text())
    with tracked_run(_dead_url(), "canary-audit", "tiny/lora_cpu", pending=run_dir / LAYOUT.pending) as tracker:
        tracker.set_tags({"canary_audit.note": "a\u2028b"})  # a line separator inside a value is not a new line
        with tracker.stage("inject"):
            tracker.log_training_dataset(manifest, [80] * manifest.dataset_after.n_records, name="train")
        with tracker.stage("report"):
            tracker.log_report(read_report(run_dir / "report.json"), run_dir)
    return run_dir


@pytest.fixture
def run_dir(offline_run, in_tmp) -> Path:
    """A fresh copy of the offline run, and a file outside it that nothing may upload (``in_tmp/outside/key``)."""
    (in_tmp / "outside").mkdir()
    (in_tmp / "outside" / "key").write_bytes(OUTSIDE_MARK + b"\n")
    shutil.copytree(offline_run, in_tmp / "runs" / "run")
    return in_tmp / "runs" / "run"


def _store(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlflow.db'}"


def _uploaded(tmp: Path, run_dir: Path) -> list[Path]:
    """Files that appeared under ``tmp`` outside the run directory and the planted file: the store, its artifacts."""
    return [f for f in tmp.rglob("*") if f.is_file() and not f.is_relative_to(run_dir) and not f.is_relative_to(tmp / "outside")]


def _artifacts(store: str, run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    found, folders = set(), [None]
    while folders:
        for f in client.list_artifacts(run_id, folders.pop()):
            (folders.append(f.path) if f.is_dir else found.add(f.path))
    return found


def test_the_audits_own_kept_calls_replay_whole_and_no_secret_goes_with_them(run_dir, in_tmp, capsys):
    from mlflow.tracking import MlflowClient

    store = _store(in_tmp)
    assert main(["sync", str(run_dir), "--tracking-uri", store]) == 0, capsys.readouterr().err
    assert "replayed" in capsys.readouterr().out and not (run_dir / LAYOUT.pending).exists()
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if PARENT_RUN_TAG not in r.data.tags]
    assert run.info.status == "FINISHED" and run.data.tags["canary_audit.note"] == "a\u2028b"
    stages = {r.info.run_name: r for r in runs if r.data.tags.get(PARENT_RUN_TAG) == run.info.run_id}
    assert set(stages) == {"inject", "report"} and all(r.info.status == "FINISHED" for r in stages.values())
    assert [d.dataset.name for d in stages["inject"].inputs.dataset_inputs] == ["train"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["train"]
    adapter = {f"adapter/{f.name}" for f in (run_dir / "adapter").iterdir()}
    assert _artifacts(store, run.info.run_id) == {"report.json", "manifest.json", "preflight.json", "token_view.json", *adapter}
    secrets = [json.loads(line)["secret"] for line in (run_dir / "canaries.jsonl").read_text().splitlines()]
    assert secrets and not [f for f in _uploaded(in_tmp, run_dir) if f.suffix != ".db" for s in secrets
                            if f'"secret":"{s}"'.encode() in f.read_bytes()]


def _escape(run_dir: Path, in_tmp: Path) -> str:
    return "../" * len(run_dir.relative_to(in_tmp).parts) + "outside/key"


TAMPERED = {  # name -> (a link planted in the run directory, or None; the line appended)
    "secrets": (None, {"op": "log_artifact", "run": "parent", "path": "canaries.jsonl", "artifact_path": "x"}),
    "secrets_as_a_logged_name": (None, {"op": "log_artifact", "run": "parent", "path": "canaries.jsonl", "artifact_path": None}),
    "whole_run_dir": (None, {"op": "log_artifacts", "run": "parent", "path": ".", "artifact_path": "plots"}),
    "dotdot": (None, {"op": "log_artifact", "run": "parent", "path": "ESCAPE", "artifact_path": None}),
    "absolute": (None, {"op": "log_artifact", "run": "parent", "path": "ABSOLUTE", "artifact_path": None}),
    "symlink_out": ("report.html", {"op": "log_artifact", "run": "parent", "path": "report.html", "artifact_path": None}),
    "symlink_to_secrets": ("report.md", {"op": "log_artifact", "run": "parent", "path": "report.md", "artifact_path": None}),
    "symlink_in_folder": ("plots/roc.png", {"op": "log_artifacts", "run": "parent", "path": "plots", "artifact_path": "plots"}),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_line_asking_for_what_the_audit_never_logs_is_refused_by_number_with_nothing_sent(run_dir, in_tmp, capsys, case):
    link, line = TAMPERED[case]
    if line["path"] == "ESCAPE":
        line = {**line, "path": _escape(run_dir, in_tmp)}
    elif line["path"] == "ABSOLUTE":
        line = {**line, "path": str(in_tmp / "outside" / "key")}
    if link is not None:  # a link planted in the run directory under a name the audit does log
        (run_dir / link).parent.mkdir(exist_ok=True)
        target = run_dir / "canaries.jsonl" if case == "symlink_to_secrets" else in_tmp / "outside" / "key"
        (run_dir / link).symlink_to(target)
    pending = run_dir / LAYOUT.pending
    kept = pending.read_bytes().count(b"\n")
    pending.write_bytes(pending.read_bytes() + json.dumps(line).encode() + b"\n")
    before = pending.read_bytes()

    store = _store(in_tmp)
    assert main(["sync", str(run_dir), "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {pending} line {kept + 1} ") and "nothing was sent" in err[0], err
    assert "(fix: " in err[0] and f"delete line(s) {kept + 1}," in err[0]
    assert pending.read_bytes() == before
    assert _uploaded(in_tmp, run_dir) == []  # nothing sent: the store was not even created, no artifact copied


MALFORMED = {  # name -> (bytes, where: "end" appended, "middle" inserted after the first line)
    "cut_last_line": (b'{"op": "log_batch", "run": "parent", "tags": [["k", "v"', "end"),
    "not_utf8": (b'{"op": "log_batch", "run": "parent", "tags": [["k", "\xff"]]}\n', "middle"),
    "no_op": (b'{"run": "parent", "status": "FINISHED"}\n', "middle"),
    "unknown_op": (b'{"op": "delete_run", "run": "parent"}\n', "middle"),
    "not_an_object": (b'["log_batch", "parent"]\n', "middle"),
    "missing_field": (b'{"op": "terminate", "run": "parent"}\n', "middle"),
    "bad_rows": (b'{"op": "log_batch", "run": "parent", "metrics": [["loss", 1.0]]}\n', "middle"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_damaged_pending_file_is_one_error_line_naming_the_line_and_stays_byte_identical(run_dir, in_tmp, capsys, case):
    bad, where = MALFORMED[case]
    pending = run_dir / LAYOUT.pending
    first, rest = pending.read_bytes().split(b"\n", 1)
    pending.write_bytes(first + b"\n" + bad + rest if where == "middle" else first + b"\n" + rest + bad)
    number = 2 if where == "middle" else pending.read_bytes().count(b"\n") + 1
    before = pending.read_bytes()

    store = _store(in_tmp)
    assert main(["sync", str(run_dir), "--tracking-uri", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {pending} line {number} ") and "(fix: " in err[0], err
    assert (f"line {number} is cut short" in err[0]) == (case == "cut_last_line")
    assert pending.read_bytes() == before
    assert _uploaded(in_tmp, run_dir) == []  # nothing sent: the store was not even created
