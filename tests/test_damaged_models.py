"""Model directories that are damaged or would run code: refused before the run starts, in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from audit.cli import main
from audit.core.errors import AuditError
from audit.data.models import check_safetensors_complete


@pytest.fixture
def model_copy(in_tmp, tiny_model_dir):
    def copy(name: str):
        path = in_tmp / name
        shutil.copytree(tiny_model_dir, path)
        return path
    return copy


def _weights(path):
    return path / "model.safetensors"


def test_a_whole_safetensors_file_passes_and_every_damage_is_named(tmp_path, tiny_model_dir):
    check_safetensors_complete(_weights(tiny_model_dir))
    data = _weights(tiny_model_dir).read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "it is truncated (329,356 bytes, the header describes 658,712)"),
        "trailing": (data + b"\0" * 10, "it has 10 bytes past its last tensor"),
        "header cut": (data[:40], "its header is cut short"),
        "not safetensors": (b"PK\x03\x04 a zip file, say", "it is not a safetensors file"),
        "empty": (b"", "it is not a safetensors file"),
        "bad header": (data[:8] + b"{" * (int.from_bytes(data[:8], "little")) + data[8 + int.from_bytes(data[:8], "little"):],
                       "its header is not valid safetensors JSON"),
    }
    for name, (content, expected) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        file.write_bytes(content)
        with pytest.raises(AuditError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            check_safetensors_complete(file)


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "model weights damaged/model.safetensors are damaged: it is truncated"),
    ("tokenizer_auto_map", "ships its own code (tok.py via auto_map in tokenizer_config.json)"),
])
def test_a_damaged_or_code_carrying_model_is_refused_before_the_run(damage, expected, model_copy, in_tmp, capsys):
    path = model_copy("damaged")
    if damage == "truncate":
        weights = _weights(path)
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["tok.MyTokenizer", None]}
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["run", "tiny/lora_cpu", "--no-tracking", "model.source=damaged"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (in_tmp / "runs").exists()


def test_model_weights_this_user_cannot_read_are_named_not_reported_missing(model_copy, in_tmp, capsys, unreadable):
    """safetensors calls a file it may not open FileNotFoundError; the weights are tried before it opens them."""
    weights = unreadable(_weights(model_copy("locked"))).relative_to(in_tmp)  # named as model.source gives it
    assert main(["run", "tiny/lora_cpu", "--no-tracking", "model.source=locked"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot read {weights} (permission denied) (fix: let this user read it (chmod u+r {weights}), "
                   "or copy the model where it can be read)"), err
    assert not (in_tmp / "runs").exists()
