"""Safe loading: safetensors only by default; pickle only when the recipe allows it (and never pickled code);
a model's own Python code only with trust_remote_code. Refusals happen before a run directory exists."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

from audit.cli import main
from audit.core.errors import AuditError
from audit.data.models import resolve_model


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("CANARY_AUDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _model_dir_without_weights(tiny_model_dir, dest):
    dest.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, dest / name)
    return dest


@pytest.fixture
def pickle_model(tiny_model_dir, tmp_path):
    """tiny-llama's weights saved as a pickle checkpoint (pytorch_model.bin), no safetensors."""
    import torch
    from safetensors.torch import load_file

    dest = _model_dir_without_weights(tiny_model_dir, tmp_path / "pickled")
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), dest / "pytorch_model.bin")
    return dest


@pytest.fixture
def hostile_pickle_model(tiny_model_dir, tmp_path):
    dest = _model_dir_without_weights(tiny_model_dir, tmp_path / "hostile")
    marker = tmp_path / "code-ran"
    (dest / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    return dest, marker


@pytest.fixture
def remote_code_model(tiny_model_dir, tmp_path):
    """A safetensors model whose config points at its own modelling code, which leaves a marker if it ever runs."""
    dest = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, dest)
    marker = tmp_path / "code-ran"
    (dest / "custom_llama.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((dest / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"}
    (dest / "config.json").write_text(json.dumps(config))
    return dest, marker


def _refused(argv, capsys, cwd, expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expect in err, err
    assert not (cwd / "runs").exists() or not any((cwd / "runs").iterdir())
    return err


def test_pickle_checkpoint_is_refused_by_default(pickle_model, capsys, in_tmp, isolated_cache):
    err = _refused(["run", "tiny/lora_cpu", f"model.source={pickle_model}", "--no-tracking"], capsys, in_tmp,
                   "has only pickle checkpoints (pytorch_model.bin); pickle files can run code when loaded and are refused")
    assert "set model.allow_pickle=true if you trust them" in err


def test_allowed_pickle_is_converted_to_the_same_safetensors_weights(pickle_model, tiny_model_dir, isolated_cache):
    original = resolve_model("tiny-llama", progress=False).provenance["weights_fingerprint"]
    resolved = resolve_model(str(pickle_model), allow_pickle=True, progress=False)
    assert sorted(p.name for p in resolved.path.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(resolved.path.glob("*.bin"))
    assert resolved.provenance["weights_fingerprint"] == original
    assert resolved.provenance["converted_from_pickle"] == ["pytorch_model.bin"]
    # Cached by the pickle's hash: a second resolve converts nothing.
    assert resolve_model(str(pickle_model), allow_pickle=True, progress=False).path == resolved.path


def test_an_allowed_pickle_still_cannot_run_code(hostile_pickle_model, isolated_cache):
    path, marker = hostile_pickle_model
    with pytest.raises(AuditError, match="could not be loaded safely: torch.s weights-only unpickler refused it"):
        resolve_model(str(path), allow_pickle=True, progress=False)
    assert not marker.exists()


def test_hostile_pickle_is_refused_without_being_opened(hostile_pickle_model, capsys, in_tmp, isolated_cache):
    path, marker = hostile_pickle_model
    _refused(["run", "tiny/lora_cpu", f"model.source={path}", "--no-tracking"], capsys, in_tmp, "pickle files can run code")
    assert not marker.exists()


def test_model_code_is_refused_unless_the_recipe_trusts_it(remote_code_model, capsys, in_tmp):
    path, marker = remote_code_model
    err = _refused(["run", "tiny/lora_cpu", f"model.source={path}", "--no-tracking"], capsys, in_tmp,
                   "ships its own code (custom_llama.py via auto_map in config.json); running it is off by default")
    assert "set model.trust_remote_code=true only if you have read that code" in err
    assert not marker.exists()
    # With the flag the resolver lets it through (loading it would then run the code, as the user asked).
    assert resolve_model(str(path), trust_remote_code=True, progress=False).path == path.resolve()


def test_weights_are_loaded_from_safetensors_only(tiny_model_dir, tmp_path):
    """A directory holding both formats is loaded from safetensors; the pickle file is never opened."""
    import torch

    from audit.data.models import load_model_and_tokenizer

    both = tmp_path / "both"
    shutil.copytree(tiny_model_dir, both)
    marker = tmp_path / "code-ran"
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    model, _ = load_model_and_tokenizer(resolve_model(str(both), progress=False).path, dtype=torch.float32, device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not marker.exists()


def test_recipes_default_to_the_safe_settings():
    from audit.core.config import load_recipe, shipped_recipes

    for name in shipped_recipes():
        model = load_recipe(name).model
        assert model.trust_remote_code is False and model.allow_pickle is False, name
