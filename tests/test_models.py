"""The model resolver: built-ins, local directories, hub ids offline, and refusal of pickle checkpoints."""

from __future__ import annotations

import hashlib
import json

import pytest

from audit.core.errors import AuditError
from audit.data.models import fingerprint_safetensors_dir, resolve_model, sha256_file


def test_tiny_llama_is_cached_with_provenance(tiny_model_dir):
    resolved = resolve_model("tiny-llama", progress=False)
    assert resolved.kind == "builtin"
    assert (resolved.path / "model.safetensors").is_file()
    provenance = json.loads((resolved.path / "provenance.json").read_text())
    assert provenance["weights_fingerprint"] == fingerprint_safetensors_dir(resolved.path)
    assert provenance["params"] < 1_000_000


def test_tiny_llama_build_is_reproducible(tmp_path, monkeypatch, tiny_model_dir):
    """A fresh build in another cache gives bit-identical weights (same fingerprint)."""
    monkeypatch.setenv("CANARY_AUDIT_CACHE", str(tmp_path / "cache"))
    fresh = resolve_model("tiny-llama", progress=False)
    assert fresh.path != tiny_model_dir
    stored = json.loads((tiny_model_dir / "provenance.json").read_text())
    assert fresh.provenance["weights_fingerprint"] == stored["weights_fingerprint"]


def test_tiny_tokenizer_splits_digits(tiny_model):
    _, tokenizer = tiny_model
    ids = tokenizer("code 481927", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-6:] == list("481927")


def test_local_directory_resolves(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "local"
    assert resolved.path == tiny_model_dir.resolve()


def test_local_directory_with_only_pickle_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(AuditError, match="pickle"):
        resolve_model(str(tmp_path))


def test_local_directory_without_config_is_refused(tmp_path):
    with pytest.raises(AuditError, match="config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(AuditError) as info:
        resolve_model("someorg/not-a-real-model")
    assert "cannot be fetched" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_unresolvable_name_lists_builtins():
    with pytest.raises(AuditError, match="smollm2-135m, tiny-llama"):
        resolve_model("no-such-model")


def test_sha256_file_hashes_every_chunk_of_a_file_larger_than_one_read(tmp_path):
    """The one file hasher (pinned wheels, GGUF files, works archives) reads 1 MiB at a time: the tail counts too."""
    data = bytes(range(256)) * 5000 + b"tail"  # 1.28 MB: two reads and a partial third
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.bin").write_bytes(data[:-1] + b"!")
    assert sha256_file(tmp_path / "a.bin") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "b.bin") != sha256_file(tmp_path / "a.bin")


def test_a_hub_model_records_the_snapshot_it_resolved_to(monkeypatch, tmp_path, tiny_model_dir):
    """Offline, from a Hugging Face cache: ``model.revision`` unset means the branch ``main`` points to, and report.json
    must say which commit that was; a pinned commit resolves to itself."""
    import shutil

    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("provenance.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for revision in (None, commit):
        resolved = resolve_model("someorg/tiny", revision=revision, progress=False)
        assert resolved.kind == "hub" and resolved.provenance == {"repo_id": "someorg/tiny", "revision": revision,
                                                                   "snapshot": commit}
