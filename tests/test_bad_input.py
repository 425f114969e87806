"""Every user-facing bad input: one line on stderr, ``error: <what> (fix: <how>)``, exit code 2, no traceback, and
no run directory left behind. One case per input; the ids are the list the issue's closing note reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audit.cli import main


@pytest.fixture
def inputs(in_tmp, monkeypatch):
    """Bad files to point the recipe at, in an empty working directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(in_tmp / "hf"))
    (in_tmp / "broken.yaml").write_text("name: x\nmodel: {source: tiny-llama\n")
    (in_tmp / "list.yaml").write_text("- name: x\n")
    (in_tmp / "typo.yaml").write_text("name: x\nmodel: {source: tiny-llama}\ntraining:\n  epoch: 2\n")
    (in_tmp / "empty.jsonl").write_text("")
    (in_tmp / "header_only.csv").write_text("text\n")
    (in_tmp / "body.jsonl").write_text('{"body": "a note"}\n{"body": "another note"}\n')
    (in_tmp / "numbers.jsonl").write_text('{"text": 5}\n')
    (in_tmp / "corpus.txt").write_text("plain text\n")
    works = in_tmp / "works"
    works.mkdir()
    (works / "a.txt").write_text("A short original work, long enough to cut a few excerpts from. " * 20)
    (works / "works.yaml").write_text("works:\n  - file: a.txt\n    title: A work\n    author: Someone\n")
    (in_tmp / "nomanifest").mkdir()
    (in_tmp / "model_no_config").mkdir()
    (in_tmp / "model_no_config" / "model.safetensors").write_bytes(b"")
    (in_tmp / "bad_gates.yaml").write_text("gates:\n  - {metric: exposure.mean/rep_1/tuned, maximum: 3}\n")
    (in_tmp / "bad_gates_yaml.yaml").write_text("gates: [\n")
    (in_tmp / "notarun").mkdir()
    killed = in_tmp / "runs_elsewhere" / "killed"
    killed.mkdir(parents=True)
    (killed / "run.json").write_text(json.dumps({"status": "running"}))
    (in_tmp / "not_a_report.json").write_text('{"hello": 1}')
    return in_tmp


RUN = ["run", "tiny/lora_cpu", "--no-tracking"]

CASES = {
    # recipes
    "missing recipe file": (["run", "nowhere/recipe.yaml"], "recipe 'nowhere/recipe' not found"),
    "malformed YAML": (["run", "broken.yaml"], "broken.yaml is not valid YAML at line 3"),
    "recipe is not a mapping": (["run", "list.yaml"], "must hold a YAML mapping (key: value), not list"),
    "unknown key in a recipe file": (["run", "typo.yaml"], "unknown key 'training.epoch'. Did you mean 'epochs'?"),
    "unknown key in an override": ([*RUN, "trainig.epochs=1"], "unknown key 'trainig'. Did you mean 'training'?"),
    "override without =": ([*RUN, "epochs"], "override 'epochs' is not of the form key=value"),
    "wrong type (number)": ([*RUN, "training.epochs=abc"], "'training.epochs': Input should be a valid number"),
    "wrong type (list)": ([*RUN, "canaries.tiers=five"], "'canaries.tiers': Input should be a valid list (got 'five')"),
    "out of range": ([*RUN, "training.batch_size=0"], "'training.batch_size': Input should be greater than or equal to 1"),
    "repeated tiers": ([*RUN, "canaries.tiers=[1,1]"], "tiers must not repeat a value"),
    "unknown lr scheduler (once failed after base scoring)": ([*RUN, "training.lr_scheduler=bogus"],
                                                              "'training.lr_scheduler': Input should be 'linear'"),
    "empty canary alphabet (once a raw pydantic error)": ([*RUN, "canaries.params={alphabet: ''}"],
                                                          "param 'alphabet': the alphabet needs at least two distinct symbols"),
    "infinite epochs": ([*RUN, "training.epochs=.inf"], "'training.epochs': Input should be a finite number"),
    "negative seed": ([*RUN, "seed=-1"], "'seed': Input should be greater than or equal to 0"),
    "seed beyond numpy's range": ([*RUN, "seed=99999999999999999999999"],
                                  "'seed': Input should be less than or equal to 4294967295"),
    "NaN gate threshold (once passed)": ([*RUN, "gates=[{metric: exposure.mean/rep_1/tuned, max: .nan}]"],
                                         "'gates.0.max': Input should be a finite number"),
    "checkpoint interval not whole": ([*RUN, "training.checkpoint_every=2.5"],
                                      "checkpoint_every must be a whole number of steps"),
    "gate without threshold in recipe": ([*RUN, "gates=[{metric: x}]"], "'gates.0': gate on 'x' needs a threshold"),
    "unknown canary spec": ([*RUN, "canaries.spec=digts"], "canary spec 'digts' not found. Did you mean 'digits'?"),
    "more references than the space": ([*RUN, "canaries.params.length=4", "scoring.exposure_references=20000"],
                                       "cannot draw 20000 distinct secrets"),
    "references past the limit (once minutes of silence)": (
        [*RUN, "canaries.spec=words", "scoring.exposure_references=10000000"],
        "scoring.exposure_references=10,000,000 is over the limit of 100,000: exposure would score 10,000,000 candidates "
        "x 12 ranked canaries x 2 models = 240,000,000 forward passes"),
    # corpora
    "missing corpus file": ([*RUN, "corpus.source=missing.jsonl"], "corpus file missing.jsonl does not exist"),
    "empty corpus": ([*RUN, "corpus.source=empty.jsonl"], "corpus 'empty.jsonl' is empty"),
    "corpus with a header and no rows": ([*RUN, "corpus.source=header_only.csv"], "corpus 'header_only.csv' is empty"),
    "corpus without the named column": ([*RUN, "corpus.source=body.jsonl"],
                                        "has neither a text column 'text' nor a messages column"),
    "corpus column that is not text": ([*RUN, "corpus.source=numbers.jsonl"], "corpus 'numbers.jsonl'"),
    "corpus file of an unknown type": ([*RUN, "corpus.source=corpus.txt"], "unsupported extension '.txt'"),
    "canaries longer than max_length": ([*RUN, "training.max_length=8"], "would not reach the loss (truncated"),
    "packing that cuts canaries": ([*RUN, "training.packing=wrapped"], "would not reach the loss (split_by_packing"),
    "packing: not a strategy": ([*RUN, "training.packing=true"], "'training.packing': Input should be False, 'bfd'"),
    # works
    "works folder without licenses": ([*RUN, "canaries.spec=works", "canaries.params.sources=[folder:works]"],
                                      "has no license: a work without a license cannot be planted"),
    "works folder without a manifest": ([*RUN, "canaries.spec=works", "canaries.params.sources=[folder:nomanifest]"],
                                        "has no works.yaml"),
    # tracking
    "unreachable tracking server": (["run", "tiny/lora_cpu", "--tracking-uri", "http://127.0.0.1:9"],
                                    "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    "tracking store folder missing": (["run", "tiny/lora_cpu", "--tracking-uri", "sqlite:////nonexistent/dir/m.db"],
                                      "folder /nonexistent/dir for the MLflow sqlite store does not exist"),
    # models
    "unresolvable model path": ([*RUN, "model.source=./no/such/model"], "model './no/such/model' cannot be resolved"),
    "unresolvable hub id offline": ([*RUN, "model.source=nobody/nothing"], "looks like a Hugging Face id but cannot be fetched"),
    "model directory without config": ([*RUN, "model.source=model_no_config"], "has no config.json"),
    # validate
    "validate with an unknown key": (["validate", "tiny/lora_cpu", "scoring.batchsize=2"], "Did you mean 'batch_size'?"),
    # gate
    "gate: missing report": (["gate", "runs/nothing"], "report runs/nothing does not exist"),
    "gate: run without a report": (["gate", "runs_elsewhere/killed"], "has no report.json (run status: running; resume it with"),
    "gate: not a report": (["gate", "not_a_report.json"], "is not a canary-audit report"),
    # resume
    "resume: no such directory": (["run", "--resume", "runs/nothing"], "cannot resume runs/nothing: no such directory"),
    "resume: not a run directory": (["run", "--resume", "notarun"], "notarun has no readable run.json"),
    "resume: run stopped before its recipe": (["run", "--resume", "runs_elsewhere/killed"], "it has no recipe.yaml"),
    "resume with overrides": (["run", "--resume", "runs_elsewhere/killed", "seed=1"],
                              "--resume continues a run with the recipe stored in it"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, inputs, capsys):
    argv, expected = CASES[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert " (fix: " in err, err
    assert expected in err, err
    assert "Traceback" not in captured.out + captured.err
    runs = inputs / "runs"
    assert not runs.exists() or not any(runs.iterdir()), f"left {list(runs.iterdir())}"


def test_gate_file_errors(inputs, capsys):
    """Bad gates files, checked against a report that does exist."""
    from helpers import tier_report

    run = inputs / "gated"
    run.mkdir()
    (run / "report.json").write_text(tier_report({1: (2, 1.0, 0)}).model_dump_json())
    future = inputs / "future.json"  # a report from a later version
    future.write_text(json.dumps({**json.loads((run / "report.json").read_text()), "schema_version": 2, "new_field": 1}))
    (inputs / "empty_gates.yaml").write_text("[]\n")
    (inputs / "nan_gates.yaml").write_text("- {metric: exposure.mean/rep_1/tuned, max: .nan}\n")
    (inputs / "ok_gates.yaml").write_text("- {metric: exposure.mean/rep_1/tuned, max: 100}\n")
    for argv, expected in [
        (["gate", str(run), "--gates", "nope.yaml"], "gates file nope.yaml does not exist"),
        (["gate", str(run), "--gates", "bad_gates.yaml"], "gates[0]: unknown key 'maximum'. Did you mean 'max'?"),
        (["gate", str(run), "--gates", "bad_gates_yaml.yaml"], "bad_gates_yaml.yaml is not valid YAML"),
        (["gate", str(run)], "no gates to check: the recipe of r1 has no 'gates:' section"),
        (["gate", str(run), "--gates", "empty_gates.yaml"], "no gates to check: gates file empty_gates.yaml lists no gates"),
        (["gate", str(run), "--gates", str(inputs)], f"gates file {inputs} is a directory"),
        (["gate", str(run), "--gates", "nan_gates.yaml"], "Input should be a finite number"),
        (["gate", str(run), "--gates", "ok_gates.yaml", "--junit", "/proc/nope/gates.xml"],
         "cannot write --junit /proc/nope/gates.xml: folder /proc/nope cannot be created"),
        (["gate", str(future)], "is a report of schema_version 2; this canary-audit reads version 1"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, err


def test_the_console_script_prints_no_traceback(tmp_path):
    """The real `audit` process: exit status 2 and one stderr line, nothing from Python's error machinery."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / "audit"), "run", "tiny/lora_cpu", "training.epochs=abc"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "runs").exists()
