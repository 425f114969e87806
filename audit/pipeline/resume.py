"""Resumable run directories: each stage's file is its checkpoint.

    audit run tiny/lora_cpu                          # killed mid-training (OOM killer, preemption, Ctrl-C)
    audit run --resume runs/tiny-lora-cpu-<time>-<id>  # same canaries, cached base scores, training from its checkpoint

What a resume does, stage by stage (:class:`audit.core.store.StageStore` decides; the pipeline never asks whether it
is resuming; this module holds the run directory's lock and status and finds the Trainer checkpoint):

* ``recipe.yaml``, ``canaries.jsonl`` (+ ``canaries.meta.json``), ``manifest.json`` are recomputed from the stored
  recipe and must match the files byte for byte (:func:`audit.core.store.write_once`); a difference means the inputs or
  the code changed, and the run refuses to continue rather than mix two audits in one directory.
* ``scores_<label>.jsonl`` (``base``, ``tuned``): reused when present, never recomputed.
* ``train.json`` + the weights folder: reused when present (the weights fingerprint is checked); otherwise training
  continues from the newest complete Trainer checkpoint in ``trainer/`` (weights as safetensors; optimizer, scheduler
  and RNG state read by transformers with ``torch.load(weights_only=True)``, only from this run's own directory).
  A checkpoint counts once its ``trainer_state.json``, which transformers writes last, exists and its files check
  out (:func:`checkpoint_problem`); a half-written or damaged one is set aside with one line, not trusted, and the
  next older one is used, or training starts over.
* The MLflow run recorded in ``run.json`` (with its tracking URI) is reopened, so the loss curve and the final
  metrics land in one run: each stage run is reused by name, a ``train.loss`` step already logged is not logged
  again, and what an earlier attempt could not log (``tracking_pending.jsonl``) is replayed first. A resume from
  another working directory uses that recorded URI too. If the server is down, the resume is not refused: one
  warning line, and what it logs is kept in ``tracking_pending.jsonl`` for ``audit sync``.
* A full disk (ENOSPC, a quota, ``ulimit -f``) stops the run with one line (:func:`disk_full`); ``run.json`` says
  ``failed`` with the error (:func:`save_failure`) and the run can be resumed once there is space.
* A run stopped by SIGTERM or SIGINT (:class:`RunInterrupted`) is ``failed`` in ``run.json`` with the signal named.

One process per run directory: an exclusive ``flock`` on ``.run.lock``, which the kernel drops when the holder dies
(even by SIGKILL), so a killed run can be resumed at once and a live one cannot be resumed twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audit.core.console import say
from audit.core.errors import AuditError
from audit.core.layout import LAYOUT
from audit.core.schema import SCHEMA_VERSION, AuditReport, Recipe
from audit.core.store import StageStore, write_json
from audit.train import distributed
from audit.train.types import TRAINER_DIR


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived (a timeout, ``docker stop``, Kubernetes, Ctrl-C): raised by the CLI's signal
    handler, so the run unwinds like Ctrl-C: ``run.json`` becomes ``failed`` with the signal named, the MLflow runs
    end KILLED, and the process exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file too large for this file system or limit"}
"""Write errors that say the disk (or a quota or ``ulimit -f``) is full: an environment problem the user fixes."""


def disk_full(exc: BaseException, where: Path) -> AuditError | None:
    """``exc`` as a one-line :class:`AuditError` when it is a full disk (:data:`DISK_ERRNOS`) while writing under
    ``where``, else None (a bug keeps its traceback)."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS:
        return None
    what = f"writing {exc.filename}" if exc.filename else f"writing under {where}"
    return AuditError(f"{DISK_ERRNOS[exc.errno]} ({what})",
                      fix=f"free space on the disk that holds {where} (or raise the quota), then resume with "
                          f"`audit run --resume {where}`" if (where / LAYOUT.status).is_file() else
                          f"free space on the disk that holds {where} (or raise the quota), or choose another folder")


def save_failure(handle: RunHandle, fields: dict[str, Any]) -> None:
    """Mark the run failed in ``run.json`` even on a full disk: the atomic write (a new file, then rename) needs
    new blocks, so when it fails ``run.json`` is rewritten in place (its old blocks are freed and reused); if
    even that fails, one warning line says the status could not be saved."""
    try:
        handle.save_status(**fields)
        return
    except OSError:
        pass
    from audit.core.store import json_text

    try:
        with open(handle.run_dir / LAYOUT.status, "r+", encoding="utf-8") as f:
            text = json_text(handle.status)
            f.seek(0)
            f.truncate()
            f.write(text)
    except OSError as exc:
        say(True, f"[audit] warning: could not mark {handle.run_dir / LAYOUT.status} failed ({exc.strerror})")


def failure_status(exc: BaseException) -> dict[str, Any]:
    """The ``run.json`` fields of a run that stopped on ``exc`` (a signal is named in ``signal``)."""
    fields: dict[str, Any] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000], "failed_at": _now()}
    if isinstance(exc, RunInterrupted):
        fields["signal"] = exc.signal_name
    elif isinstance(exc, KeyboardInterrupt):
        fields["signal"] = "SIGINT"
    return fields


# --------------------------------------------------------------------------------------------------- run directory


@dataclass
class RunHandle:
    """An open run directory: its lock, its status (``run.json``) and what a resume reused."""

    run_dir: Path
    status: dict[str, Any]
    resumed: bool
    progress: bool = True
    reused: list[str] = field(default_factory=list)
    _lock_fd: int | None = None
    _store: StageStore | None = None

    def save_status(self, **updates: Any) -> None:
        self.status.update(updates)
        write_json(self.run_dir / LAYOUT.status, self.status)

    def note_reuse(self, what: str) -> None:
        self.reused.append(what)
        say(self.progress, f"[audit] resume: reusing {what}")

    @property
    def store(self) -> StageStore:
        """The stage store over this run directory; what it reuses is said and counted here."""
        if self._store is None:
            self._store = StageStore(self.run_dir, note=self.note_reuse)
        return self._store

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _lock(run_dir: Path) -> int:
    return _hold(os.open(run_dir / LAYOUT.lock, os.O_RDWR | os.O_CREAT, 0o644), run_dir)


def check_not_in_use(run_dir: Path) -> None:
    """AuditError while a live process holds ``run_dir``'s lock (tried and let go at once).

    A resume checks this before it reads anything: a run takes its lock first, then writes ``run.json`` and, seconds
    later, ``recipe.yaml``, so a resume in a live run's first moments was told the run "stopped before writing
    recipe.yaml". Opened read-only: a run directory you cannot write is refused later, with its own message.
    """
    try:
        fd = os.open(run_dir / LAYOUT.lock, os.O_RDONLY)
    except OSError:  # no lock file: no process ever held the lock (it is made before the lock is taken)
        return
    os.close(_hold(fd, run_dir))


def _hold(fd: int, run_dir: Path) -> int:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditError(f"run {run_dir} is in use by another audit process",
                         fix="wait for it to finish, or stop it before resuming") from None
    return fd


def lock_run_dir(run_dir: Path, *, resumed: bool, progress: bool = True) -> RunHandle:
    """Lock ``run_dir`` and mark it running; on resume keep its history and record the attempt."""
    fd = _lock(run_dir)
    try:
        status = read_status(run_dir) if resumed else {}
        if resumed:
            attempts = list(status.get("resumes", []))
            attempts.append({"at": _now(), "after_status": status.get("status")})
            status.update(status="running", resumes=attempts)
            for stale in ("error", "signal", "failed_at", "tracking"):
                status.pop(stale, None)
        else:
            status = {"status": "running", "started_at": _now()}
        status["schema_version"] = SCHEMA_VERSION
        handle = RunHandle(run_dir=run_dir, status=status, resumed=resumed, progress=progress, _lock_fd=fd)
        handle.save_status()
    except BaseException:
        os.close(fd)
        raise
    return handle


def new_run_dir(recipe: Recipe) -> Path:
    import secrets

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    root = Path(recipe.output.root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{recipe.name.replace('/', '-')}-{stamp}-{secrets.token_hex(3)}"
    path.mkdir()
    return path


@dataclass(frozen=True)
class RunDir:
    """The run directory an audit writes to, chosen once, before anything is checked or written: a new one (``path``
    None, made when it opens) or the interrupted run at ``path``, resumed.

    The only place that knows whether a run resumes. Like inspect_ai's sample source, a new run is the do-nothing case
    (it resumes nothing and has nothing recorded), so the stages below ask this object or the stage store
    (:class:`~audit.core.store.StageStore`, which reuses whatever files are there), never a ``resume_dir``.
    """

    path: Path | None = None

    @property
    def resuming(self) -> bool:
        return self.path is not None

    def recorded(self, name: str) -> Path | None:
        """The file ``name`` as the run being resumed recorded it; None when it has none, and always for a new run."""
        return self.path / name if self.path is not None and (self.path / name).is_file() else None

    def check(self, recipe: Recipe) -> None:
        """Refuse, before anything is written, a place this run cannot write: the output root of a new run, the
        directory of a resumed one."""
        from audit.data.validate import check_output_root, check_writable_folder

        if self.path is None:
            check_output_root(recipe)
        else:
            check_writable_folder(self.path, what="run directory", fix="resume where the run directory is writable")

    def open(self, recipe: Recipe, *, progress: bool = True) -> RunHandle:
        """Lock the directory and mark it running (:func:`lock_run_dir`): a new one under ``output.root``, or this one."""
        resumed = self.path is not None
        return lock_run_dir(self.path if resumed else new_run_dir(recipe), resumed=resumed, progress=progress)

    def completed_report(self) -> AuditReport | None:
        """The report of a resumed run that had already completed (there is nothing to resume), else None."""
        if self.path is None or read_status(self.path).get("status") != "complete" or self.recorded(LAYOUT.report) is None:
            return None
        from audit.core.gates import read_report_or_run

        return read_report_or_run(self.path)


NEW_RUN = RunDir()
"""A run that resumes nothing: its directory is made when it opens."""


def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        status = json.loads((run_dir / LAYOUT.status).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise AuditError(f"{run_dir} has no readable {LAYOUT.status}: it is not a canary-audit run directory",
                         fix="give a directory made by `audit run` (runs/<name>-<time>-<id>)") from None
    if not isinstance(status, dict):
        raise AuditError(f"{run_dir / LAYOUT.status} is not a run status", fix="give a directory made by `audit run`")
    return status


def load_resumable(run_dir: str | Path) -> tuple[Path, Recipe, dict[str, Any]]:
    """The run directory, its stored recipe and status, checked before anything is touched."""
    from audit.core.config import read_yaml, validate_recipe

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"cannot resume {run_dir}: no such directory", fix="give a run directory, e.g. runs/<name>-<time>-<id>")
    if distributed.launched_rank() == 0:  # the others of a torchrun resume may start after rank 0 took the lock
        check_not_in_use(run_dir)  # first: a live run holds its lock before it writes run.json and recipe.yaml
    status = read_status(run_dir)
    if not (run_dir / LAYOUT.recipe).is_file():
        raise AuditError(f"cannot resume {run_dir}: it has no {LAYOUT.recipe} (the run stopped before writing it)",
                         fix="start a new run with `audit run RECIPE`")
    recipe = validate_recipe(read_yaml(run_dir / LAYOUT.recipe), source=str(run_dir / LAYOUT.recipe))
    return run_dir, recipe, status


# --------------------------------------------------------------------------------------------------- training checkpoints


def last_checkpoint(handle: RunHandle) -> Path | None:
    """The newest intact Trainer checkpoint of this run; incomplete or damaged ones are moved aside, never loaded.

    Newest first: a checkpoint without ``trainer_state.json`` (which transformers writes last) was half-written when
    the run stopped; one whose files do not check out (:func:`checkpoint_problem`: a truncated safetensors file or
    optimizer state, a ``trainer_state.json`` that does not parse) was damaged later. Each is renamed
    ``incomplete-...`` / ``damaged-...`` with one line saying so, and the next older one is tried; with none left,
    training starts over from step 0 (same seed, so the same weights as a run never interrupted).
    """
    trainer_dir = handle.run_dir / TRAINER_DIR
    if not trainer_dir.is_dir():
        return None
    found = sorted(((int(p.name.removeprefix("checkpoint-")), p) for p in trainer_dir.glob("checkpoint-*")
                    if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()), reverse=True)
    set_aside = 0
    for step, path in found:
        complete = (path / "trainer_state.json").is_file() and any(path.glob("*.safetensors"))
        problem = checkpoint_problem(path) if complete else None
        if complete and problem is None:
            after = " instead" if set_aside else ""
            handle.note_reuse(f"training checkpoint {path.name} (step {step}){after}")
            handle.save_status(resumed_from_checkpoint=path.name)
            return path
        kind = "incomplete" if not complete else "damaged"
        aside = trainer_dir / f"{kind}-{path.name}-{datetime.now(UTC):%Y%m%d%H%M%S}"
        path.rename(aside)
        set_aside += 1
        why = "was half-written when the run stopped" if not complete else f"is damaged ({problem})"
        say(handle.progress, f"[audit] resume: {path.name} {why}; moved to {aside.name}")
    if set_aside:
        say(handle.progress, "[audit] resume: no intact training checkpoint left; training starts over from step 0 "
                             "(same seed, same result)")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the Trainer checkpoint folder ``path`` cannot be resumed from, or None when its files check out.

    Cheap checks that read no tensor: ``trainer_state.json`` parses and has ``global_step``; each ``*.safetensors``
    file ends where its header says (:func:`audit.data.models.safetensors_problem`); each
    torch file (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``training_args.bin``) is a zip archive whose
    directory, written last, is there. A truncated file of either kind fails.
    """
    import zipfile

    from audit.data.models import safetensors_problem

    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return "trainer_state.json has no global_step"
    except (OSError, ValueError) as exc:
        return f"trainer_state.json does not parse: {type(exc).__name__}"
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)  # the check model folders get (audit.data.models), header only
        if problem:
            return f"{file.name}: {problem}"
    for file in sorted(p for pattern in ("*.pt", "*.pth", "*.bin") for p in path.glob(pattern)):
        try:
            with zipfile.ZipFile(file):
                pass
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{file.name}: not a complete torch file ({type(exc).__name__})"
    return None


# --------------------------------------------------------------------------------------------------- audit sync


def sync_run(run_dir: str | Path, *, tracking_uri: str | None = None) -> str:
    """Replay what a run could not log to MLflow (``tracking_pending.jsonl``); returns what was done, in words.

    The tracking URI is the one ``run.json`` recorded (``tracking_uri``) unless ``tracking_uri`` is given. The run
    directory is locked meanwhile, so a sync never races the audit that is still writing the file.
    """
    from audit.report.tracking import replay_pending

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"cannot sync {run_dir}: no such directory", fix="give a run directory, e.g. runs/<name>-<time>-<id>")
    read_status(run_dir)  # one clear error for a directory that is no run
    fd = _lock(run_dir)
    try:
        status = read_status(run_dir)
        if not (run_dir / LAYOUT.pending).is_file():
            return f"nothing to sync: {run_dir} has no {LAYOUT.pending} (MLflow has all of it)"
        uri = tracking_uri or status.get("tracking_uri")
        if not uri:
            raise AuditError(f"{run_dir / LAYOUT.status} does not say where the run was tracked",
                             fix=f"pass --tracking-uri URI to `audit sync {run_dir}`")
        done = replay_pending(run_dir, uri, run_id=status.get("mlflow_run_id"))
        status.update(tracking="synced", synced_at=_now(), tracking_uri=uri,
                      **({"mlflow_run_id": done.run_id} if done.run_id else {}))
        write_json(run_dir / LAYOUT.status, status)
        return f"replayed {done.calls} calls into MLflow run {done.run_id} at {uri}"
    finally:
        os.close(fd)
