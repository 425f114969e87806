"""`audit compare`: runs found by run directory, MLflow run id or experiment name; the table and the PNG."""

from __future__ import annotations

import pytest

from audit.cli import main
from audit.core.errors import AuditError
from audit.report.compare import CompareRow, compare_figure, compare_plot, compare_table, plot_labels, resolve_rows

LORA = {"exposure.mean/rep_0/tuned": 1.3, "exposure.mean/rep_1/tuned": 2.0, "exposure.mean/rep_16/tuned": 8.0,
        "exposure.space_mean/rep_16/tuned": 19.9, "extraction.exact/rep_1/tuned": 0.0, "extraction.exact/rep_16/tuned": 2.0,
        "mia.auc/loss_diff": 0.83, "privacy.eps_lb": 0.4, "train.final_loss": 0.912, "time.train_s": 95.0, "time.total_s": 301.0}
FULL = {"exposure.mean/rep_0/tuned": 1.5, "exposure.mean/rep_1/tuned": 3.0, "exposure.mean/rep_16/tuned": 7.5,
        "extraction.exact/rep_1/tuned": 1.0, "extraction.exact/rep_16/tuned": 1.0, "train.final_loss": 0.5,
        "time.total_s": 480.0}


@pytest.fixture
def tracked(in_tmp):
    """Two MLflow runs in a fresh sqlite store, logged the way the pipeline logs them."""
    import mlflow

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("cmp-test", artifact_location=(in_tmp / "art").as_uri())
    ids = []
    for name, method, metrics in (("smollm2-lora-cpu", "lora", LORA), ("smollm2-full-cpu", "full", FULL)):
        with mlflow.start_run(experiment_id=exp, run_name=name) as run:
            mlflow.log_params({"training.method": method, "model.source": "smollm2-135m"})
            mlflow.set_tags({"canary_audit.recipe": name})
            mlflow.log_metrics(metrics)
            ids.append(run.info.run_id)
    return uri, ids


def test_rows_by_experiment_and_by_run_id(tracked):
    uri, ids = tracked
    rows = resolve_rows(["cmp-test"], tracking_uri=uri)
    assert [r.label.split()[0] for r in rows] == ["smollm2-lora-cpu", "smollm2-full-cpu"]
    assert [r.label.split()[-1] for r in rows] == [i[:6] for i in ids] and [r.method for r in rows] == ["lora", "full"]
    assert [r.run_id for r in resolve_rows([ids[1]], tracking_uri=uri)] == [ids[1]]
    assert rows[0].tiers() == [0, 1, 16]
    assert rows[0].exposure(16) == 8.0 and rows[1].exposure(16) == 7.5  # the headline scale: against sampled references
    assert rows[0].space_exposure(16) == 19.9 and rows[1].space_exposure(16) is None  # the second scale, labelled
    assert rows[1].get("mia.auc/loss_diff") is None


def test_table_has_one_row_per_run_and_marks_missing_values(tracked):
    uri, _ = tracked
    table = compare_table(resolve_rows(["cmp-test"], tracking_uri=uri))
    lines = [line for line in table.splitlines() if line.startswith("| smollm2")]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    row = dict(zip(header, cells, strict=True))
    assert row["exposure 16x"] == "8.00" and row["whole-space exposure 16x"] == "19.90"
    assert row["extracted 16x"] == "2" and row["MIA AUC"] == "0.83"
    assert row["final loss"] == "0.912" and row["total s"] == "301"
    full = dict(zip(header, [c.strip() for c in lines[1].strip("|").split("|")], strict=True))
    assert full["MIA AUC"] == "n/a" and full["eps LB"] == "n/a" and full["whole-space exposure 16x"] == "n/a"
    assert "whole-space exposure = rank over the whole secret space" in table  # the second scale says what it is


def test_a_run_directory_without_a_valid_report_is_one_line(tracked, in_tmp, capsys):
    """(A real run directory resolves through its report's tracking.run_id: see tests/test_chain.py.)"""
    uri, _ = tracked
    run_dir = in_tmp / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text("{}")
    assert main(["compare", str(run_dir), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_plot_is_a_png(tmp_path):
    rows = [CompareRow(label="a", run_id=None, recipe="a", method="lora", model="m", metrics=LORA),
            CompareRow(label="b", run_id=None, recipe="b", method="full", model="m", metrics=FULL)]
    path = compare_plot(rows, tmp_path / "sub" / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_unknown_target_suggests_an_experiment(tracked, capsys):
    uri, _ = tracked
    with pytest.raises(AuditError, match="cmp-test"):
        resolve_rows(["cmp-tset"], tracking_uri=uri)
    assert main(["compare", "0" * 32, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow run" in err[0]


def test_cli_prints_table_and_writes_plot(tracked, in_tmp, capsys):
    uri, _ = tracked
    assert main(["compare", "cmp-test", "--tracking-uri", uri, "--plot", "out/cmp.png"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("| smollm2-") for line in out.splitlines()) == 2 and (in_tmp / "out" / "cmp.png").is_file()


@pytest.fixture
def experiment_with_stages(in_tmp):
    """Two audits of one recipe logged by the real tracker (audit.report.tracking): each a parent run with six nested stage
    runs, in a fresh sqlite store, as `audit run` leaves them."""
    from audit.report.tracking import tracked_run

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    ids = []
    for metrics in (LORA, {**LORA, "exposure.mean/rep_16/tuned": 6.5}):
        with tracked_run(uri, "canary-audit", "tiny-lora-cpu") as tracker:
            tracker.log_params({"training.method": "lora", "model.source": "tiny-llama", "corpus.source": "builtin:notes",
                                "canaries.spec": "digits"})
            tracker.set_tags({"canary_audit.recipe": "tiny-lora-cpu"})
            for stage in ("inject", "score_base", "train", "score_tuned", "outputs", "report"):
                tracker.begin_stage(stage)
                tracker.log_stage_metrics({"records": 1.0})
            tracker.log_metrics(metrics)
            ids.append(tracker.run_id)
    return uri, ids


def test_an_experiment_lists_its_audits_not_their_nested_stage_runs(experiment_with_stages, in_tmp):
    from mlflow.tracking import MlflowClient

    uri, ids = experiment_with_stages
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("canary-audit")
    assert len(client.search_runs([exp.experiment_id])) == 14  # 2 audits + 12 stage runs in the store
    rows = resolve_rows(["canary-audit"], tracking_uri=uri)
    assert [r.run_id for r in rows] == ids
    assert len({r.label for r in rows}) == 2 and all(r.run_id[:6] in r.label for r in rows)  # one recipe, two names
    assert all(r.data == "builtin:notes + digits canaries" and r.method == "lora" for r in rows)
    table = compare_table(rows)
    body = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(body) == 2 and all(line.startswith("| tiny-lora-cpu") for line in body)
    assert all("?" not in cell.strip() for line in body for cell in line.strip("|").split("|"))  # no row of unknowns
    fig = compare_figure(rows)
    assert "2 audits" in fig._suptitle.get_text()


def test_compare_from_another_directory_fails_without_creating_a_store(experiment_with_stages, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare", "canary-audit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow store at" in err[0] and "--tracking-uri" in err[0]
    assert list(elsewhere.iterdir()) == []  # no new, empty mlflow.db


def test_plot_labels_keep_runs_of_one_recipe_apart():
    names = ["tiny-lora-cpu-20261201-080536-5f9fd0", "tiny-lora-cpu-20261201-081002-aa11bb"]
    labels = plot_labels(names)
    assert len(set(labels)) == 2 and labels[0].endswith("080536-5f9fd0") and labels[1].endswith("081002-aa11bb")
    assert plot_labels(["a", "a"]) == ["a #1", "a #2"]  # identical names still differ


def test_all_zero_panels_start_at_zero():
    zero = {"exposure.mean/rep_1/tuned": 0.0, "extraction.exact/rep_1/tuned": 0.0, "privacy.eps_lb": 0.0,
            "train.final_loss": 0.0, "time.total_s": 0.0}
    fig = compare_figure([CompareRow(label="a", run_id=None, recipe="a", method="lora", model="m", metrics=zero)])
    limits = {ax.get_title(): ax.get_ylim() for ax in fig.axes}
    assert limits["canaries extracted (greedy)"] == (0.0, 1.0) and limits["epsilon lower bound"] == (0.0, 1.0)
    assert all(low == 0.0 for low, _ in limits.values())


def test_a_release_is_a_row_of_its_own_read_from_its_labelled_metrics(in_tmp, capsys):
    """`audit compare` of a run with a GGUF release (metrics under ``release:q4_0``): one more row, whose columns
    are the release's numbers; what a release has no number of (loss, time) is n/a."""
    import mlflow

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("cmp-release", artifact_location=(in_tmp / "art").as_uri())
    q4 = {"exposure.mean/rep_0/release:q4_0": 1.4, "exposure.mean/rep_1/release:q4_0": 1.1,
          "exposure.mean/rep_16/release:q4_0": 6.5, "extraction.exact/rep_16/release:q4_0": 1.0,
          "mia.auc/loss_diff/release:q4_0": 0.71, "release.bits_drift/rep_16/release:q4_0": 0.6}
    with mlflow.start_run(experiment_id=exp, run_name="tiny-release-cpu"):
        mlflow.log_params({"training.method": "lora", "model.source": "tiny-llama"})
        mlflow.log_metrics({**LORA, "exposure.mean/rep_16/base": 1.2, **q4})
    rows = resolve_rows(["cmp-release"], tracking_uri=uri)
    assert [r.label.split()[-1] for r in rows][1] == "release:q4_0" and len(rows) == 2
    release = rows[1]
    assert release.exposure(16) == 6.5 and release.get("mia.auc/loss_diff") == 0.71 and release.tiers() == [0, 1, 16]
    assert release.exposure(16, "base") is None and release.get("train.final_loss") is None  # not the release's numbers
    table = compare_table(rows)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    cells = dict(zip(header, [c.strip() for c in table.splitlines()[3].strip("|").split("|")], strict=True))
    assert cells["run"].endswith("release:q4_0") and cells["exposure 16x"] == "6.50" and cells["extracted 16x"] == "1"
    assert cells["MIA AUC"] == "0.71" and cells["final loss"] == "n/a" and cells["exposure 1x"] == "1.10"
    assert main(["compare", "cmp-release", "--tracking-uri", uri, "--model", "base", "--plot", str(in_tmp / "b.png")]) == 0
    assert "release:q4_0" not in capsys.readouterr().out  # the base model has no releases: one row per run


def test_the_model_free_columns_follow_the_model_compared():
    """MIA AUC and the epsilon bound name no model in their keys: for ``--model release:q4_0`` they are the release's
    (``.../release:q4_0``), for ``--model base`` there is none (n/a), never the tuned model's under another name."""
    metrics = {**LORA, "exposure.mean/rep_16/release:q4_0": 6.5, "mia.auc/loss_diff/release:q4_0": 0.71,
               "exposure.mean/rep_16/base": 1.2}
    row = CompareRow(label="r", run_id=None, recipe="r", method="lora", model="m", metrics=metrics)

    def cells(model: str) -> dict[str, str]:
        table = compare_table([row], model=model).splitlines()
        header = [c.strip() for c in table[0].strip("|").split("|")]
        return dict(zip(header, [c.strip() for c in table[2].strip("|").split("|")], strict=True))

    assert cells("tuned")["MIA AUC"] == f"{LORA['mia.auc/loss_diff']:.2f}"
    assert cells("release:q4_0")["MIA AUC"] == "0.71" and cells("release:q4_0")["exposure 16x"] == "6.50"
    assert cells("base")["MIA AUC"] == "n/a" and cells("base")["eps LB"] == "n/a"
