"""Shared fixtures. Tests are offline, on CPU, with the tiny in-process model unless marked ``slow``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fixed audit key (audit.keys) for every test and the subprocesses they start: no test reads or creates the
# developer's ~/.config/canary-audit/key (tests/test_keys.py checks the default file in a temporary home).
TEST_AUDIT_KEY = "5a" * 32
os.environ["CANARY_AUDIT_KEY"] = TEST_AUDIT_KEY
os.environ.pop("CANARY_AUDIT_KEY_FILE", None)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The tiny-llama model directory (built once into the user cache, < 1 s)."""
    from audit.models import resolve_model

    return resolve_model("tiny-llama", progress=False).path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """``(model, tokenizer)`` for tiny-llama in fp32 on CPU. Do not train it in place: load your own copy."""
    import torch

    from audit.models import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test from an empty working directory (runs/ and mlflow.db land there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def unreadable(monkeypatch):
    """``unreadable(path)``: ``path`` can no longer be opened by this process. chmod 000, and, where the tests run
    as root (whom mode bits do not stop), an ``open`` that refuses it as the kernel refuses anyone else
    (PermissionError, errno 13). Only Python's ``open`` is guarded: the code under test must try the file itself
    before a library (safetensors, in Rust) opens it."""
    import builtins
    import errno
    import io
    from pathlib import Path

    blocked: set[str] = set()
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and os.path.realpath(file) in blocked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, *args, **kwargs)

    def block(path) -> Path:
        path = Path(path)
        path.chmod(0)
        if os.geteuid() == 0:
            blocked.add(os.path.realpath(path))
            monkeypatch.setattr(builtins, "open", guarded_open)
            monkeypatch.setattr(io, "open", guarded_open)
        return path

    return block
