"""Shared fixtures. Tests are offline, on CPU, with the tiny in-process model unless marked ``slow``."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fixed audit key (audit.core.keys) for every test and the subprocesses they start: no test reads or creates the
# developer's ~/.config/canary-audit/key (tests/test_keys.py checks the default file in a temporary home).
TEST_AUDIT_KEY = "5a" * 32
os.environ["CANARY_AUDIT_KEY"] = TEST_AUDIT_KEY
os.environ.pop("CANARY_AUDIT_KEY_FILE", None)

# CI runs two pytest-xdist workers on two cores (README command (b): `-n 2 --dist loadfile`). Each worker, and every
# process a test starts, then runs one intra-op thread, and a test marked `smollm2` takes the machine alone (see
# pytest_runtest_protocol below): an OpenMP thread that waits for a core another process holds makes every barrier
# wait (audit.score.engine.torch_threads: 60x slower, measured on a loaded 2-core machine).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist, on the controller, for each worker it starts (``-n``, ``--tx``, a restarted one): tell it where the
    session's lock files are, one folder for every worker, made for the first."""
    if not hasattr(node.config, "machine_lock_dir"):
        node.config.machine_lock_dir = tempfile.mkdtemp(prefix="canary-audit-pytest-")
    node.workerinput["machine_lock_dir"] = node.config.machine_lock_dir


def pytest_unconfigure(config):
    if getattr(config, "machine_lock_dir", None):
        shutil.rmtree(config.machine_lock_dir, ignore_errors=True)


@contextmanager
def _machine_lock(config, *, exclusive: bool) -> Iterator[None]:
    """Every test holds ``machine.lock`` shared, a `smollm2` test exclusively. ``gate.lock`` gives the exclusive
    request priority: a waiting `smollm2` test holds the gate, so the other worker starts no new test; once that
    worker's current test ends, the `smollm2` test has the machine (without the gate, a worker that starts its next
    test microseconds after the last one could keep a shared flock forever)."""
    folder = Path(config.workerinput["machine_lock_dir"])
    with open(folder / "gate.lock", "a") as gate, open(folder / "machine.lock", "a") as machine:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist: a `smollm2` test runs alone with every core; the others run side by side, one thread each. The
    lock spans the item's whole protocol, so module and session fixtures set up or torn down for it are inside."""
    if not hasattr(item.config, "workerinput"):  # not an xdist worker (a pytest a test starts inherits the env)
        yield
        return
    exclusive = item.get_closest_marker("smollm2") is not None
    if exclusive:
        from audit.score.engine import torch_threads

    with _machine_lock(item.config, exclusive=exclusive), (torch_threads(os.cpu_count() or 1) if exclusive else nullcontext()):
        yield


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
    from audit.data.models import resolve_model

    return resolve_model("tiny-llama", progress=False).path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """``(model, tokenizer)`` for tiny-llama in fp32 on CPU. Do not train it in place: load your own copy."""
    import torch

    from audit.data.models import load_model_and_tokenizer

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


@dataclass(frozen=True)
class TinyRun:
    """What one ``audit run tiny/lora_cpu`` left: its working directory (``mlflow.db``, ``mlartifacts/``), its run
    directory, and what it printed."""

    work: Path
    run_dir: Path
    stdout: str
    stderr: str


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Iterator[TinyRun]:
    """One ``audit run tiny/lora_cpu`` with the recipe's own settings and the default MLflow store (``mlflow.db`` in
    its working directory), done once per session and shared by every test that only reads what it wrote (report,
    scores, plots, the MLflow run, the printed output). It runs as a user runs it, in a subprocess, so everything it
    prints is captured.

    Read only: a test that changes anything in the run directory copies it first (``shutil.copytree``). The run
    directory is fingerprinted after the run and checked at the end of the session; a changed or added file fails
    there, naming it."""
    from helpers import AUDIT, audit_env

    work = tmp_path_factory.mktemp("tiny-run")
    done = subprocess.run([*AUDIT, "run", "tiny/lora_cpu"], cwd=work, env=audit_env(), capture_output=True,
                          encoding="utf-8", errors="replace", timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (work / "runs").iterdir()
    before = _digests(run_dir)
    yield TinyRun(work=work, run_dir=run_dir, stdout=done.stdout, stderr=done.stderr)
    after = _digests(run_dir)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"a test wrote into the shared tiny run (copy it with shutil.copytree first): {changed}"


@pytest.fixture(scope="module")
def injected(tmp_path_factory) -> Path:
    """``audit inject tiny/lora_cpu --out gt``, once; tests copy it."""
    from audit.cli import main as cli_main

    out = tmp_path_factory.mktemp("inject") / "gt"
    assert cli_main(["inject", "tiny/lora_cpu", "--out", str(out)]) == 0
    return out
