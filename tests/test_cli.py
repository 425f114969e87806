"""CLI basics: bad input is one line on stderr, exit code 2, and no run directory left behind."""

from __future__ import annotations

import pytest

from audit.cli import main


def _fails_cleanly(argv, capsys, in_tmp, *, expect: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expect in err
    assert not (in_tmp / "runs").exists() or not any((in_tmp / "runs").iterdir())
    return err


def test_missing_recipe_path(capsys, in_tmp):
    _fails_cleanly(["run", "does/not/exist.yaml"], capsys, in_tmp, expect="not found")


def test_yaml_error(capsys, in_tmp):
    (in_tmp / "r.yaml").write_text("name: x\nmodel: {source: tiny-llama\n")
    _fails_cleanly(["run", "r.yaml"], capsys, in_tmp, expect="not valid YAML")


def test_unknown_key_with_suggestion(capsys, in_tmp):
    err = _fails_cleanly(["run", "tiny/lora_cpu", "trainig.epochs=1"], capsys, in_tmp, expect="unknown key 'trainig'")
    assert "Did you mean 'training'?" in err


def test_model_not_resolvable_offline(capsys, in_tmp, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(in_tmp / "hf"))
    _fails_cleanly(["run", "tiny/lora_cpu", "model.source=nobody/nothing", "--no-tracking"], capsys, in_tmp,
                   expect="cannot be fetched")


def test_override_without_recipe_uses_the_default(capsys):
    assert main(["validate", "seed=5"]) == 0
    out = capsys.readouterr().out
    assert "source: smollm2-135m" in out and "seed: 5" in out


def test_ls_lists_recipes_and_specs(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "smollm2/lora_cpu" in out and "digits" in out


def test_stray_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "tiny/lora_cpu", "--nonsense"])
    assert info.value.code == 2


# --------------------------------------------------------------------------------------------------- gate exit code


def _fake_audit(monkeypatch, tmp_path, gates):
    """`run_audit` replaced by a finished report (tests/test_report_render.py): only the CLI's exit logic runs."""
    from helpers import make_run_dir

    import audit.pipeline
    from audit.pipeline import AuditResult

    run_dir, report = make_run_dir(tmp_path / "runs" / "tiny-lora-cpu-test", gates=gates)
    monkeypatch.setattr(audit.pipeline, "run_audit", lambda recipe, **kw: AuditResult(run_dir=run_dir, report=report))
    return run_dir


def test_run_exits_1_when_a_gate_fails_and_0_with_no_fail_on_gates(monkeypatch, tmp_path, capsys):
    from helpers import FAILING

    _fake_audit(monkeypatch, tmp_path, FAILING)
    assert main(["run", "tiny/lora_cpu", "--quiet", "--no-tracking"]) == 1
    err = capsys.readouterr().err
    assert "1 release gate(s) failed: single copies stay at the null (exposure.mean/rep_1/tuned = 6, needs <= 5)" in err
    assert "exit 1 (pass --no-fail-on-gates to report without failing)" in err
    assert main(["run", "tiny/lora_cpu", "--quiet", "--no-tracking", "--no-fail-on-gates"]) == 0
    assert "exit 0 because of --no-fail-on-gates" in capsys.readouterr().err


def test_run_exits_0_when_every_gate_passes_and_names_the_html_report(monkeypatch, tmp_path, capsys):
    from helpers import PASSING

    run_dir = _fake_audit(monkeypatch, tmp_path, PASSING)
    assert main(["run", "tiny/lora_cpu", "--quiet", "--no-tracking"]) == 0
    out = capsys.readouterr().out
    assert f"report: {run_dir / 'report.html'}" in out and f"`audit report {run_dir}`" in out


@pytest.mark.slow
def test_a_real_run_whose_gate_fails_exits_1(in_tmp, capsys):
    """One epoch of tiny-llama instead of ten: the recipe's positive control (16x exposure >= 5) is not reached."""
    assert main(["run", "tiny/lora_cpu", "--quiet", "--no-tracking", "training.epochs=1"]) == 1
    (run_dir,) = (in_tmp / "runs").iterdir()
    assert (run_dir / "report.json").is_file() and (run_dir / "report.html").is_file()  # reported, then failed
    assert "1 release gate(s) failed: positive control, 16-copy canaries detected" in capsys.readouterr().err
