"""Tracking never costs the audit (issue 12, sections 2 and 5): a dead or dying MLflow server costs seconds, what it
missed is kept in the run directory and replayed (``audit sync``, ``audit run --resume``); a resumed run reuses its
stage runs and logs no curve step twice; SIGTERM ends the run ``failed`` with the signal named and its MLflow runs
KILLED; two first runs on a fresh sqlite store both succeed. Real MLflow stores (sqlite, a closed port) throughout.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit.cli import main
from audit.core.layout import LAYOUT
from audit.report.tracking import PARENT_RUN_TAG, STAGE_TAG, replay_pending, tracked_run


def _dead_url() -> str:
    """A port nothing listens on: every connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _children(client, run_id: str) -> dict:
    run = client.get_run(run_id)
    found = client.search_runs([run.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{run_id}'")
    names = [r.info.run_name for r in found]
    assert len(names) == len(set(names)), f"duplicate stage runs: {sorted(names)}"
    return {r.info.run_name: r for r in found}


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _a_small_audit(tracker, run_dir: Path, *, loss_steps=(1, 2, 3)) -> None:
    """The calls an audit makes, in its order: params, tags, stages with metrics, a loss curve, artifacts."""
    (run_dir / "report.json").write_text('{"ok": true}\n')
    (run_dir / "plots").mkdir(exist_ok=True)
    (run_dir / "plots" / "roc.png").write_bytes(b"png")
    tracker.log_params({"training.lora.r": 8, "seed": 0})
    tracker.set_tags({"canary_audit.recipe": "tiny/lora_cpu"})
    with tracker.stage("inject", elapsed_s=0.5):
        tracker.log_stage_metrics({"records": 162})
    with tracker.stage("train"):
        tracker.log_stage_params({"per_device_train_batch_size": 4})
        for step in loss_steps:
            tracker.log_metrics({"train.loss": 6.0 - step}, step=step)
            tracker.log_stage_metrics({"loss": 6.0 - step, "grad_norm": 1.0}, step)
    with tracker.stage("report"):
        tracker.log_metrics({"exposure.mean/rep_16/tuned": 3.5})
        tracker.log_artifact(run_dir / "report.json")
        tracker.log_artifacts(run_dir / "plots", "plots")


def test_a_dead_server_costs_seconds_warns_once_and_every_call_is_kept_for_replay(in_tmp, capsys):
    from mlflow.tracking import MlflowClient

    run_dir = in_tmp / "run"
    run_dir.mkdir()
    started = time.monotonic()
    with tracked_run(_dead_url(), "canary-audit", "tiny/lora_cpu", pending=run_dir / LAYOUT.pending) as tracker:
        _a_small_audit(tracker, run_dir)
    took = time.monotonic() - started
    assert took < 20, f"a refused connection held the audit {took:.1f} s"  # 7 retries at backoff 2 held it minutes
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("[audit] warning: MLflow at http://127.0.0.1:") and "audit sync" in err[0]
    assert tracker.incomplete and tracker.run_id is None and tracker.info() is None
    ops = [json.loads(line) for line in (run_dir / LAYOUT.pending).read_text().splitlines()]
    assert ops[0]["op"] == "create_parent" and ops[-1] == {**ops[-1], "op": "terminate", "run": "parent", "status": "FINISHED"}
    assert len(ops) == tracker.kept

    store = f"sqlite:///{in_tmp / 'mlflow.db'}"  # the server's replacement: every kept call replays into it
    done = replay_pending(run_dir, store, run_id=None)
    assert done.calls == len(ops) and not (run_dir / LAYOUT.pending).exists()
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(done.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny/lora_cpu"
    assert parent.data.params == {"training.lora.r": "8", "seed": "0"}
    assert parent.data.metrics["exposure.mean/rep_16/tuned"] == 3.5
    assert _steps(client, done.run_id, "train.loss") == [1, 2, 3]
    stages = _children(client, done.run_id)
    assert set(stages) == {"inject", "train", "report"}
    assert all(s.info.status == "FINISHED" and "time_s" in s.data.metrics for s in stages.values())
    assert stages["inject"].data.metrics["time_s"] >= 0.5 and stages["inject"].data.tags[STAGE_TAG] == "inject"
    assert stages["train"].data.params["per_device_train_batch_size"] == "4"
    assert _steps(client, stages["train"].info.run_id, "loss") == [1, 2, 3]
    artifacts = {f.path for f in client.list_artifacts(done.run_id)}
    artifacts |= {f.path for f in client.list_artifacts(done.run_id, "plots")}
    assert {"report.json", "plots/roc.png"} <= artifacts


def test_a_store_that_goes_away_mid_run_loses_nothing_and_replays_without_duplicates(in_tmp, capsys):
    """Online at first, then the server is gone (the client now points at a refused port): the stage run opened
    before the outage is the one the replay continues, the ones opened after are created then."""
    from mlflow.tracking import MlflowClient

    run_dir = in_tmp / "run"
    run_dir.mkdir()
    store = f"sqlite:///{in_tmp / 'mlflow.db'}"
    with tracked_run(store, "canary-audit", "x", pending=run_dir / LAYOUT.pending) as tracker:
        tracker.log_params({"seed": 0})
        tracker.begin_stage("train")
        tracker.log_metrics({"train.loss": 5.0}, step=1)
        tracker.client = MlflowClient(tracking_uri=_dead_url())  # the server dies here
        for step in (2, 3):
            tracker.log_metrics({"train.loss": 5.0 - step}, step=step)
        tracker.end_stage()
        with tracker.stage("report"):
            tracker.log_metrics({"exposure.mean/rep_16/tuned": 2.0})
    assert tracker.incomplete and tracker.run_id is not None
    assert sum("warning: MLflow at" in line for line in capsys.readouterr().err.splitlines()) == 1
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # what MLflow shows until the replay

    done = replay_pending(run_dir, store, run_id=tracker.run_id)
    assert done.run_id == tracker.run_id
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert _steps(client, tracker.run_id, "train.loss") == [1, 2, 3]
    stages = _children(client, tracker.run_id)
    assert set(stages) == {"train", "report"} and all(s.info.status == "FINISHED" for s in stages.values())
    assert stages["train"].info.run_id == tracker.stage_run_ids["train"]


def test_a_replay_that_fails_keeps_the_calls_not_sent(in_tmp):
    run_dir = in_tmp / "run"
    run_dir.mkdir()
    with tracked_run(_dead_url(), "canary-audit", "x", pending=run_dir / LAYOUT.pending) as tracker:
        tracker.log_params({"seed": 0})
    before = (run_dir / LAYOUT.pending).read_text()
    from audit.core.errors import AuditError

    with pytest.raises(AuditError, match="unreachable"):
        replay_pending(run_dir, _dead_url(), run_id=None)
    assert (run_dir / LAYOUT.pending).read_text() == before


def test_a_resumed_run_reuses_its_stage_runs_and_logs_no_curve_step_twice(in_tmp):
    """A killed attempt logged steps 1-3, its checkpoint was at step 1: the resumed training logs 2-5 again."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(store, "canary-audit", "x") as first:
            with first.stage("score_base"):
                pass
            first.begin_stage("train")
            for step in (1, 2, 3):
                first.log_metrics({"train.loss": 6.0 - step}, step=step)
                first.log_stage_metrics({"loss": 6.0 - step}, step)
            raise KeyboardInterrupt
    killed = _children(client, first.run_id)
    assert client.get_run(first.run_id).info.status == "KILLED" and killed["train"].info.status == "KILLED"

    with tracked_run(store, "canary-audit", "x", run_id=first.run_id) as again:
        with again.stage("score_base"):
            pass
        with again.stage("train"):
            for step in (2, 3, 4, 5):
                again.log_metrics({"train.loss": 6.0 - step}, step=step)
                again.log_stage_metrics({"loss": 6.0 - step}, step)
    stages = _children(client, first.run_id)
    assert set(stages) == {"score_base", "train"} and all(s.info.status == "FINISHED" for s in stages.values())
    assert stages["train"].info.run_id == killed["train"].info.run_id
    assert _steps(client, first.run_id, "train.loss") == [1, 2, 3, 4, 5]
    assert _steps(client, stages["train"].info.run_id, "loss") == [1, 2, 3, 4, 5]


def _context(uri: str, tmp: Path):
    from audit.core.config import load_recipe
    from audit.pipeline.stages import RunContext
    from audit.train.types import DeviceChoice

    recipe = load_recipe("tiny/lora_cpu", [f"output.root={tmp / 'runs'}"])
    return RunContext(recipe=recipe, resolved=None, device=DeviceChoice("cpu", "fp32", False), tracking=True,
                      tracking_uri=uri, progress=False)


def _drawn():
    """What open_run needs of the ground truth: the canaries, whose key id and hash go out with the plan."""
    from types import SimpleNamespace

    from audit.data.canaries import generate_canaries, load_spec

    return SimpleNamespace(canaries=generate_canaries(load_spec("digits"), seed=0))


def test_sigterm_leaves_the_run_failed_with_the_signal_and_its_mlflow_runs_killed_and_a_resume_replays(in_tmp):
    """open_run as the pipeline uses it: SIGTERM (the CLI's handler raises RunInterrupted) mid-training while the
    server is away; the resume, with the server back, replays the kept calls first and reuses the stage runs."""
    from mlflow.tracking import MlflowClient

    from audit.pipeline.resume import NEW_RUN, RunDir, RunInterrupted, read_status
    from audit.pipeline.stages import open_run

    with pytest.raises(RunInterrupted):
        with open_run(_context(_dead_url(), in_tmp), NEW_RUN, _drawn()) as run:
            run.tracker.log_params({"seed": 0})
            run.tracker.begin_stage("train")
            run.tracker.log_metrics({"train.loss": 4.0}, step=1)
            raise RunInterrupted(signal.SIGTERM)
    status = read_status(run.dir)
    assert status["status"] == "failed" and status["signal"] == "SIGTERM" and "SIGTERM" in status["error"]
    assert status["tracking"] == "incomplete" and status["tracking_uri"].startswith("http://127.0.0.1:")
    assert RunInterrupted(signal.SIGTERM).exit_code == 143
    kept = [json.loads(line) for line in (run.dir / LAYOUT.pending).read_text().splitlines()]
    assert [op for op in kept if op["op"] == "terminate"] == [
        {**kept[-2], "run": "train", "status": "KILLED"}, {**kept[-1], "run": "parent", "status": "KILLED"}]

    store = f"sqlite:///{in_tmp / 'mlflow.db'}"
    with open_run(_context(store, in_tmp), RunDir(run.dir), _drawn()) as again:
        assert not (run.dir / LAYOUT.pending).exists()  # replayed before the run reopened
        with again.tracker.stage("train"):
            again.tracker.log_metrics({"train.loss": 4.0}, step=1)  # the resumed trainer logs step 1 again
            again.tracker.log_metrics({"train.loss": 3.0}, step=2)
    status = read_status(run.dir)
    assert status["status"] == "complete" and status["tracking"] == "complete" and "signal" not in status
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(status["mlflow_run_id"]).info.status == "FINISHED"
    assert _steps(client, status["mlflow_run_id"], "train.loss") == [1, 2]
    assert set(_children(client, status["mlflow_run_id"])) == {"train"}


def test_audit_sync_replays_a_run_dir_and_says_so(in_tmp, capsys):
    from mlflow.tracking import MlflowClient

    from audit.pipeline.resume import NEW_RUN, read_status
    from audit.pipeline.stages import open_run

    with open_run(_context(_dead_url(), in_tmp), NEW_RUN, _drawn()) as run:
        _a_small_audit(run.tracker, run.dir)
    capsys.readouterr()
    assert main(["sync", str(run.dir)]) == 2  # the server is still away: one line, the calls stay
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "(fix: " in err[0] and (run.dir / LAYOUT.pending).is_file()

    store = f"sqlite:///{in_tmp / 'mlflow.db'}"
    assert main(["sync", str(run.dir), "--tracking-uri", store]) == 0
    assert "replayed" in capsys.readouterr().out
    status = read_status(run.dir)
    assert status["tracking"] == "synced" and status["tracking_uri"] == store
    assert MlflowClient(tracking_uri=store).get_run(status["mlflow_run_id"]).info.status == "FINISHED"
    assert main(["sync", str(run.dir)]) == 0 and "nothing to sync" in capsys.readouterr().out
    assert main(["sync", str(in_tmp / "nope")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


FIRST_RUN = """
import sys, time
from pathlib import Path
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
from audit.report.tracking import tracked_run
with tracked_run(sys.argv[1], "canary-audit", "x") as tracker:
    tracker.log_params({"seed": 0})
print(tracker.run_id)
"""


def test_two_first_runs_on_a_fresh_sqlite_store_both_succeed(in_tmp):
    """Both processes import mlflow, then wait for one go file, then create the store at the same moment."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{in_tmp / 'mlflow.db'}"
    go = in_tmp / "go"
    script = "import mlflow.tracking, mlflow.store.db.utils\n" + FIRST_RUN
    procs = [subprocess.Popen([sys.executable, "-c", script, store, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    time.sleep(8)  # both have imported mlflow by now on a loaded 2-core machine
    go.touch()
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    ids = {out.strip() for out, _ in outs}
    client = MlflowClient(tracking_uri=store)
    assert len(ids) == 2 and all(client.get_run(i).info.status == "FINISHED" for i in ids)
    assert len(client.search_experiments()) == 2  # Default + canary-audit: one experiment, not one per process


def test_sigterm_raises_run_interrupted_once_and_a_second_signal_is_left_to_the_os():
    import os

    from audit.cli import _restore_signals, _stop_on_signals
    from audit.pipeline.resume import RunInterrupted

    before = signal.getsignal(signal.SIGTERM)
    saved = _stop_on_signals()
    try:
        with pytest.raises(RunInterrupted) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
        assert stopped.value.signal_name == "SIGTERM" and stopped.value.exit_code == 143
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second SIGTERM during the cleanup stops at once
    finally:
        _restore_signals(saved)
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_cli_exits_128_plus_the_signal_and_names_it(monkeypatch, capsys):
    from audit import cli
    from audit.pipeline.resume import RunInterrupted

    def stopped(args):
        raise RunInterrupted(signal.SIGTERM)

    monkeypatch.setitem(cli.COMMANDS, "ls", stopped)
    assert main(["ls"]) == 143
    assert capsys.readouterr().err.strip() == "interrupted by SIGTERM"
    monkeypatch.setitem(cli.COMMANDS, "ls", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["ls"]) == 130
