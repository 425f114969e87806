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
