"""The run directory as a store: writes that never leave a half-written file, and the stage store that owns resume.

Writes go to a temporary name, then rename. :class:`StageStore` reuses a stage whose artifact is on disk and runs
(then writes once) a stage whose artifact is not: the one place resume is decided. On the other processes of a
distributed run the store is :class:`PlanView`, rank 0's decisions as its plan sent them: the one place it is decided
what those processes run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel

from audit.core.layout import LAYOUT
from audit.core.schema import CalibrationSummary, SequenceScore, WorkWindow

if TYPE_CHECKING:
    from audit.train.types import TrainPlan

T = TypeVar("T")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2) + "\n"
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def jsonl_text(rows: Iterable[BaseModel | dict[str, Any]]) -> str:
    lines = [r.model_dump_json() if isinstance(r, BaseModel) else json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows]
    return "".join(line + "\n" for line in lines)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def write_jsonl(path: Path, rows: Iterable[BaseModel | dict[str, Any]]) -> None:
    atomic_write_text(path, jsonl_text(rows))


def write_once(path: Path, text: str) -> bool:
    """Write ``path`` atomically if it does not exist; if it does, it must already hold exactly ``text``.

    A resumed run recomputes its deterministic stages and checks them against the files instead of overwriting
    them, so nothing computed earlier is silently replaced. Returns True when the file was written now.
    """
    from audit.core.errors import AuditError

    path = Path(path)
    if path.exists():
        if path.read_text(encoding="utf-8") == text:
            return False
        raise AuditError(f"{path} already exists with different content than this run computes now "
                         "(the recipe, the corpus or the code changed since it was written)",
                         fix="start a new run instead of resuming, or restore the original inputs")
    atomic_write_text(path, text)
    return True


# --------------------------------------------------------------------------------------------------- stage store


class Artifact(Protocol[T]):
    """How one stage's result lives in the run directory: read back (None when absent) and written once."""

    name: str
    """The file (or folder) it is kept in, as resume messages name it."""

    def read(self, run_dir: Path) -> T | None: ...

    def write(self, run_dir: Path, value: T) -> None: ...

    def describe(self, value: T) -> str: ...


class StageStore:
    """The only resume logic: a stage whose artifact is in the run directory is reused (and said so), else it runs
    and its artifact is written once.

    Like inspect_ai's sample source: a fresh run has nothing stored, so every stage runs; the pipeline never asks
    whether it is resuming. Deterministic inputs (recipe, canaries, manifest) go through :meth:`put`, which
    writes them, or on resume checks that the stored file is byte-identical (else an error: the inputs changed).
    """

    def __init__(self, run_dir: Path, *, note: Callable[[str], None] = lambda what: None) -> None:
        self.run_dir = Path(run_dir)
        self.note = note
        self.reused: list[str] = []

    def _reuse(self, what: str) -> None:
        self.reused.append(what)
        self.note(what)

    def keep(self, name: str) -> None:
        """Reuse a stored file as it is, without comparing it (the caller knows it is the one this run would write)."""
        self._reuse(name)

    def get_or_run(self, artifact: Artifact[T], run: Callable[[], T]) -> T:
        if (stored := artifact.read(self.run_dir)) is not None:
            self._reuse(artifact.describe(stored))
            return stored
        value = run()
        artifact.write(self.run_dir, value)
        return value

    def has(self, artifact: Artifact[Any]) -> bool:
        return (self.run_dir / artifact.name).exists()

    def put(self, name: str, text: str) -> None:
        """Write a deterministic file, or check that the stored one holds exactly ``text`` (see :func:`write_once`)."""
        if not write_once(self.run_dir / name, text):
            self._reuse(name)


class PlanView:
    """The stage store on the other processes of ``accelerate launch`` / ``torchrun``: rank 0's decisions, no directory.

    Rank 0 answers "have I got this?" for the stages every process joins when its run opens, and sends the answers
    once, in its :class:`~audit.train.types.TrainPlan`. Here :meth:`get_or_run` runs a stage exactly when rank 0 runs
    it (``scores_base.jsonl``, ``train.json``, ``scores_tuned.jsonl`` not stored), so every collective call inside (the
    Trainer's, scoring's gather) is made by every process or by none; it reads rank 0's stored tuned weights back when
    only their scoring is left (rank 0 had them before it sent the plan, so they are whole); everything else is rank
    0's alone (token views, calibration, whole-work scans) or needs nothing here, and is None without running.
    It writes nothing: rank 0 writes every file.
    """

    def __init__(self, plan: TrainPlan) -> None:
        self.run_dir = plan.run_dir
        self._runs = {LAYOUT.scores_of("base"): plan.score_base, LAYOUT.train: plan.train,
                      LAYOUT.scores_of("tuned"): plan.score_tuned}
        self._reads = {LAYOUT.train} if plan.score_tuned and not plan.train else set()

    def get_or_run(self, artifact: Artifact[T], run: Callable[[], T]) -> T | None:
        if self._runs.get(artifact.name, False):
            return run()
        if artifact.name in self._reads:
            return artifact.read(self.run_dir)
        return None

    def has(self, artifact: Artifact[Any]) -> bool:
        """Rank 0's answer for the stages its plan names; True for any other (rank 0's alone: nothing to run here)."""
        return not self._runs.get(artifact.name, False)

    def keep(self, name: str) -> None:
        pass

    def put(self, name: str, text: str) -> None:
        pass


@dataclass(frozen=True)
class InMemory:
    """A stage result that is no file of its own, e.g. the base model's token view, held until ``token_view.json`` is
    written with the tuned one: computed on every attempt by rank 0, and never on the other processes (what
    :class:`PlanView` does with any stage its plan does not name)."""

    name: str

    def read(self, run_dir: Path) -> None:
        return None

    def write(self, run_dir: Path, value: object) -> None:
        pass

    def describe(self, value: object) -> str:
        return self.name


@dataclass(frozen=True)
class ScoresFile:
    """``scores_<label>.jsonl``: one model's :class:`~audit.core.schema.SequenceScore` rows (a stage checkpoint)."""

    label: str

    @property
    def name(self) -> str:
        return LAYOUT.scores_of(self.label)

    def read(self, run_dir: Path) -> list[SequenceScore] | None:
        path = Path(run_dir) / self.name
        return read_scores(path) if path.is_file() else None

    def write(self, run_dir: Path, value: list[SequenceScore]) -> None:
        write_once(Path(run_dir) / self.name, jsonl_text(value))

    def describe(self, value: list[SequenceScore]) -> str:
        return self.name


@dataclass(frozen=True)
class CalibrationFile:
    """``calibration_<label>.json``: one model's backend error bar (:mod:`audit.score.calibration`), written only when
    calibration ran (a run scored by the reference itself has none, and resuming it computes nothing)."""

    label: str

    @property
    def name(self) -> str:
        return LAYOUT.calibration_of(self.label)

    def read(self, run_dir: Path) -> CalibrationSummary | None:
        path = Path(run_dir) / self.name
        return CalibrationSummary.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write(self, run_dir: Path, value: CalibrationSummary | None) -> None:
        if value is not None:
            write_once(Path(run_dir) / self.name, json_text(value))

    def describe(self, value: CalibrationSummary) -> str:
        return self.name


def read_scores(path: Path, *, model: str | None = None) -> list[SequenceScore]:
    """The rows of a scores file (``model``: only that model's rows); a damaged file is one clear error."""
    rows = read_rows(path, SequenceScore, fix=f"delete {Path(path).name} to recompute those scores, or start a new run")
    return rows if model is None else [r for r in rows if r.model == model]


def read_rows(path: Path, row_type: type[T], *, fix: str) -> list[T]:
    """The rows of a JSONL file of ``row_type`` (a pydantic model); a damaged file is one clear error."""
    from pydantic import ValidationError

    from audit.core.errors import AuditError

    try:
        return [row_type.model_validate_json(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    except ValidationError as exc:
        raise AuditError(f"{path} is damaged ({exc.errors()[0]['msg']})", fix=fix) from None


@dataclass(frozen=True)
class WorksScanFile:
    """``works_scan_<label>.jsonl``: one model's whole-work window rows (:class:`~audit.core.schema.WorkWindow`), a stage
    checkpoint; 0600 like every file written here (the rows of secret works are base-model numbers over secrets)."""

    label: str

    @property
    def name(self) -> str:
        return LAYOUT.works_scan_of(self.label)

    def read(self, run_dir: Path) -> list[WorkWindow] | None:
        path = Path(run_dir) / self.name
        if not path.is_file():
            return None
        return read_rows(path, WorkWindow, fix=f"delete {self.name} to scan again, or start a new run")

    def write(self, run_dir: Path, value: list[WorkWindow]) -> None:
        write_once(Path(run_dir) / self.name, jsonl_text(value))

    def describe(self, value: list[WorkWindow]) -> str:
        return self.name
