"""The weights fingerprint reads one tensor at a time and gives the digest it always gave (run directories, parents and
``audit measure`` records hold fingerprints made by the old whole-dict implementation: a new digest would refuse them)."""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from audit.data.models import fingerprint_safetensors_dir


def _old_fingerprint(path: Path) -> str:
    """The implementation before streaming, verbatim: every tensor of the folder in one dict, then hashed."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                tensors[key] = f.get_tensor(key)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def test_the_tiny_model_keeps_the_fingerprint_its_cache_recorded(tiny_model_dir):
    recorded = json.loads((tiny_model_dir / "provenance.json").read_text())["weights_fingerprint"]
    assert fingerprint_safetensors_dir(tiny_model_dir) == _old_fingerprint(tiny_model_dir) == recorded


def test_a_sharded_folder_has_the_old_digest_and_the_digest_of_the_same_weights_in_one_file(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)  # bf16: 2-byte elements
    model.save_pretrained(tmp_path / "one", safe_serialization=True)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    digest = fingerprint_safetensors_dir(tmp_path / "sharded")
    assert digest == _old_fingerprint(tmp_path / "sharded") == fingerprint_safetensors_dir(tmp_path / "one")
    assert digest != fingerprint_safetensors_dir(tiny_model_dir)  # the fp32 original: dtype and bytes differ


def test_odd_tensors_and_a_name_in_two_files_hash_as_before(tmp_path):
    """Empty tensors, integer and bool dtypes; a name saved twice counts from the last file (sorted)."""
    save_file({"b.empty": torch.zeros(0, 3), "a.ints": torch.arange(5, dtype=torch.int64), "dup": torch.ones(2)},
              str(tmp_path / "a.safetensors"))
    save_file({"c.mask": torch.tensor([True, False]), "dup": torch.full((2,), 7.0)}, str(tmp_path / "b.safetensors"))
    assert fingerprint_safetensors_dir(tmp_path) == _old_fingerprint(tmp_path)
    (tmp_path / "b.safetensors").rename(tmp_path / "0.safetensors")  # now the other copy of "dup" is read last
    assert fingerprint_safetensors_dir(tmp_path) == _old_fingerprint(tmp_path)


def test_a_scalar_tensor_is_fingerprinted_where_the_old_code_raised(tmp_path):
    for value, folder in ((2.5, tmp_path / "x"), (3.5, tmp_path / "y")):
        folder.mkdir()
        save_file({"logit_scale": torch.tensor(value)}, str(folder / "w.safetensors"))
    with pytest.raises(RuntimeError, match="cannot be 0"):
        _old_fingerprint(tmp_path / "x")
    assert fingerprint_safetensors_dir(tmp_path / "x") != fingerprint_safetensors_dir(tmp_path / "y")


def test_no_more_than_one_tensor_is_held_at_a_time(tmp_path, monkeypatch):
    import safetensors

    save_file({f"w{i}": torch.full((64,), float(i)) for i in range(6)}, str(tmp_path / "x.safetensors"))
    real, alive, most = safetensors.safe_open, [], [0]

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            most[0] = max(most[0], sum(ref() is not None for ref in alive) + 1)
            tensor = self.inner.get_tensor(name)
            alive.append(weakref.ref(tensor))
            return tensor

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    fingerprint_safetensors_dir(tmp_path)
    assert len(alive) == 6 and most[0] == 1
    with pytest.raises(AssertionError):  # the test can fail: the old implementation held all six
        _old_fingerprint(tmp_path)
        assert most[0] == 1
