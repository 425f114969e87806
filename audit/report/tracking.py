"""MLflow tracking: one parent run per audit, one nested run per stage; a dead server never costs the audit.

What an audit looks like in ``mlflow ui`` (experiment ``tracking.experiment``, default ``canary-audit``)::

    tiny/lora_cpu                 parent run, the one to compare across recipes
    ├── inject                    canaries + injection + pre-flight: counts, the training set as a dataset input
    ├── score_base                base-model scoring
    ├── train                     every number the Trainer logs (loss, grad_norm, learning_rate, epoch) per step and
    │                             the TrainingArguments as params, forwarded by our own TrainerCallback
    ├── score_tuned               tuned-model scoring
    └── report                    report.json / report.html / report.md written and logged

The parent run carries: params = the flattened resolved recipe (``training.lora.r``); tags = fingerprints of the
base weights, manifest, canary set, tuned weights, the git revision and package versions (``canary_audit.*``);
metrics = every report metric under its stable key (:func:`report_metric_dict`), ``train.loss`` per step,
``time.<stage>_s``; artifacts = report.json/html/md, plots/, manifest.json, the LoRA adapter (full weights only
with ``tracking.log_full_weights``). Every stage run has ``time_s``, its wall time.

Nesting: when the caller already has an active run (a notebook, a larger pipeline), the audit's parent run is
created under it (tag ``mlflow.parentRunId``), even when the caller's run lives in another experiment; with no
explicit URI the audit then logs to the caller's tracking URI. Everything is logged by run id through one
``MlflowClient``: the caller's active run, tracking URI and environment are never touched.

Why not TRL's own MLflowCallback (``report_to="mlflow"``): it logs through the fluent API inside the training
loop, so a tracking server that dies mid-run froze training for 16.5 minutes of retries and then raised out of
``trainer.train()`` (issue 12). :func:`audit.train.sft.train_sft` forwards the same numbers (``on_log``,
``on_params``) to the :class:`Tracker`, whose calls cannot fail.

A server that dies: HTTP retries are bounded (:data:`HTTP_BOUNDS`: seconds, not minutes); the first call that
fails prints one warning line and switches the tracker offline; every later call is kept, as data, in the run
directory's ``tracking_pending.jsonl`` (``LAYOUT.pending``); the audit goes on and exits as it would have.
``run.json`` and ``report.json`` (``metric_notes["tracking"]``) say tracking was incomplete; ``audit sync
RUN_DIR`` (or ``audit run --resume``) replays the file (:func:`replay_pending`). On a resumed run the stage runs
are reused by name and a curve point already logged at a step is not logged again.

Default backend: an embedded sqlite file, ``sqlite:///<cwd>/mlflow.db``, with artifacts beside it in
``<cwd>/mlartifacts``; its first use (table creation, alembic migrations, the experiment) runs under an exclusive
``flock`` on ``mlflow.db.lock`` (:func:`store_lock`), so two first runs in one directory both succeed.
``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` selects a server instead; a server is checked before any training
starts, so an unreachable one fails in seconds, not after an hour.
Secrets never reach MLflow: params, metrics and tags carry ids and hashes only, and the training set is logged
as a schema-only dataset (record index, length, canary copies), never its text.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from audit.core.errors import AuditError
from audit.core.layout import LAYOUT, check_version, versioned

if TYPE_CHECKING:
    from audit.core.schema import AuditReport, InjectionManifest, TrackingInfo

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARENT_RUN_TAG = "mlflow.parentRunId"
STAGE_TAG = "canary_audit.stage"


def _caller_run() -> Any | None:
    """The caller's active fluent run, without importing mlflow when nobody has (then there can be none)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow.active_run() if mlflow is not None else None


def resolve_tracking_uri(uri: str | None) -> str:
    """Explicit URI, else ``$MLFLOW_TRACKING_URI``, else the caller's active run's store, else ``./mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and _caller_run() is not None:
        uri = sys.modules["mlflow"].get_tracking_uri()
    if not uri:
        return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    if "://" not in uri:  # a bare path means a sqlite file there
        return f"sqlite:///{Path(uri).expanduser().resolve()}"
    return uri


def check_tracking_reachable(uri: str, *, timeout_s: float = 5.0) -> None:
    """Fail fast, before training, if a tracking server does not answer or a sqlite folder is missing."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AuditError(f"MLflow tracking server {uri} is unreachable ({reason})",
                             fix="start it (mlflow server --workers 1 ...), fix --tracking-uri, or pass --no-tracking") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).parent
        if not parent.is_dir():
            raise AuditError(f"folder {parent} for the MLflow sqlite store does not exist",
                             fix="create it or choose another --tracking-uri")
    elif uri.startswith("file:") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise AuditError("MLflow 3 refuses the plain file store unless MLFLOW_ALLOW_FILE_STORE=true",
                         fix="use the default sqlite store, or export MLFLOW_ALLOW_FILE_STORE=true")


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --workers 1"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lora": {"r": 8}}}`` -> ``{"training.lora.r": 8}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def report_metric_dict(report: AuditReport) -> dict[str, float]:
    """Every number of a report under its stable MLflow key: :meth:`AuditReport.flat_metrics`, values only.

    The same keys the gates check and ``audit compare`` shows (one flattener for all three).
    """
    return {key: float(entry.value) for key, entry in report.flat_metrics().items()}


def training_set_rows(manifest: InjectionManifest, record_chars: list[int]) -> dict[str, list[int]]:
    """The schema-only view of the fine-tuning set MLflow gets: per record its index, length and canary copies.

    No text and no per-record hash: a hash of a record that carries a 6-digit secret can be brute-forced.
    """
    copies = [0] * len(record_chars)
    for p in manifest.placements:
        if 0 <= p.record_index < len(copies):
            copies[p.record_index] += 1
    return {"record_index": list(range(len(record_chars))), "chars": list(record_chars), "canary_copies": copies}


# --------------------------------------------------------------------------------------------------- resilience

LOGGED_FILES = (LAYOUT.report, LAYOUT.html, LAYOUT.markdown, LAYOUT.manifest, LAYOUT.preflight, LAYOUT.works,
                LAYOUT.token_view)
"""The run-directory files :meth:`Tracker.log_report` logs as artifacts (at the top of the run's artifacts)."""
WEIGHT_FOLDERS = ("adapter", "model", "merged")
LOGGED_FOLDERS = ("plots", *WEIGHT_FOLDERS)
"""The run-directory folders :meth:`Tracker.log_report` can log, each under its own name. These two tuples are all
that a replay of ``tracking_pending.jsonl`` may upload: the secrets (``canaries.jsonl``, ``outputs.jsonl``, ``train.jsonl``),
the scores and the key stay local (docs/threat-model.md)."""

HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's HTTP client defaults (7 retries, backoff factor 2, 120 s timeout) wait minutes on a dead server: 16.5
minutes measured in issue 12. These bound one call to 3 attempts of at most 10 s each with 0 + ~2 s of backoff
(urllib3 sleeps ``factor * 2**(n-1)`` before retry n >= 2): a refused connection gives up in ~2-3 s, a server
that hangs in ~33 s. The first failure switches the tracker offline, so a whole run pays that once. Values the
user exported win (they are defaults, set only for the tracked block)."""


def _tracking_errors() -> tuple[type[BaseException], ...]:
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, OSError)


def _refused(exc: BaseException) -> bool:
    """The server answered and refused this one call (e.g. a param logged again with another value): not an outage."""
    code = getattr(exc, "error_code", None)
    return code in {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"}


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


@contextmanager
def _bounded_http() -> Iterator[None]:
    set_now = {k: v for k, v in HTTP_BOUNDS.items() if k not in os.environ}
    os.environ.update(set_now)
    try:
        yield
    finally:
        for key in set_now:
            os.environ.pop(key, None)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialize the first use of a sqlite store across processes: two ``audit run`` in a directory without
    ``mlflow.db`` both ran MLflow's alembic migration and one died (issue 12). An exclusive ``flock`` on
    ``<db>.lock`` (dropped by the kernel when its holder dies) around store creation and the experiment lookup."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


@dataclass
class _Stage:
    name: str
    run_id: str | None
    started: float


class Tracker:
    """A handle over the audit's parent run: logs by run id (never by "whatever run is active"), opens stage runs.

    Tracking never costs the audit: every call goes through :meth:`_send`; the first one that fails (server gone,
    store locked) prints one warning line and switches the tracker offline, and from then on each call is kept in
    ``tracking_pending.jsonl`` (``LAYOUT.pending``) instead of sent. Runs are named in that file by role
    (``parent`` or a stage name), so stage runs opened while offline are created when it is replayed.
    """

    def __init__(self, client: Any, uri: str, *, pending: Path | None = None, reopened: bool = False,
                 progress: bool = True) -> None:
        self.client = client
        self.uri = uri
        self.pending_path = pending
        self.reopened = reopened
        self.progress = progress
        self.current: _Stage | None = None
        self.stage_run_ids: dict[str, str | None] = {}
        self.offline_reason: str | None = None
        self.kept = 0
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._steps: dict[tuple[str, str], set[int]] = {}

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def incomplete(self) -> bool:
        """Something was not logged: it is in ``tracking_pending.jsonl``, waiting for ``audit sync``."""
        return self.offline_reason is not None or self.kept > 0 or bool(self.pending_path and self.pending_path.is_file())

    def info(self) -> TrackingInfo | None:
        """Where this run is, for the report (None when the parent run could not even be created)."""
        from audit.core.schema import TrackingInfo

        if self._run_id is None or self._experiment_id is None:
            return None
        return TrackingInfo(uri=self.uri, experiment_id=self._experiment_id, run_id=self._run_id, ui_command=ui_command(self.uri))

    # ---- the one way out
    def _resolve(self, ref: str) -> str | None:
        return self._run_id if ref == "parent" else self.stage_run_ids.get(ref)

    def _send(self, op: dict[str, Any], call: Callable[[str | None], Any], *, needs_run: bool = True) -> Any:
        """``call(run_id)`` now, or ``op`` kept for replay when offline (or when it fails: then offline from here on)."""
        run_id = self._resolve(op["run"]) if "run" in op else None
        if self.offline_reason is None and (run_id is not None or not needs_run):
            try:
                return call(run_id)
            except _tracking_errors() as exc:
                if _refused(exc):  # the server is fine and said no to this call; replaying it would fail again
                    print(f"[audit] warning: MLflow refused {op['op']} ({_short(exc)}); the audit continues",
                          file=sys.stderr, flush=True)
                    return None
                self._go_offline(exc)
        self._keep(op)
        return None

    def _go_offline(self, exc: BaseException) -> None:
        self.offline_reason = _short(exc)
        where = f"kept in {self.pending_path}" if self.pending_path else "not kept (no run directory)"
        replay = f"; replay with `audit sync {self.pending_path.parent}`" if self.pending_path else ""
        print(f"[audit] warning: MLflow at {self.uri} failed ({self.offline_reason}); the audit continues, "
              f"what is not logged is {where}{replay}", file=sys.stderr, flush=True)

    def _keep(self, op: dict[str, Any]) -> None:
        self.kept += 1
        if self.pending_path is None:
            return
        import json

        with open(self.pending_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(versioned(LAYOUT.pending, op), sort_keys=True, ensure_ascii=False) + "\n")
            f.flush()

    # ---- the parent run
    def open_parent(self, experiment: str, run_name: str, tags: dict[str, str], *, run_id: str | None = None) -> None:
        """Create the audit's run, or reopen ``run_id`` (a resume) and mark it RUNNING again."""
        if run_id is not None:
            self._run_id = run_id

            def reopen(rid: str | None) -> None:
                self.client.update_run(rid, status="RUNNING")
                self._experiment_id = self.client.get_run(rid).info.experiment_id

            self._send({"op": "status", "run": "parent", "status": "RUNNING"}, reopen)
            return

        def create(_: str | None) -> None:
            run = self.client.create_run(_experiment_id(self.client, self.uri, experiment), run_name=run_name, tags=tags)
            self._run_id, self._experiment_id = run.info.run_id, run.info.experiment_id

        self._send({"op": "create_parent", "experiment": experiment, "run_name": run_name, "tags": tags}, create,
                   needs_run=False)

    def log_params(self, params: dict[str, Any], *, run_id: str | None = None, run: str = "parent") -> None:
        from mlflow.entities import Param

        rows = [[k, ("" if v is None else str(v))[:6000]] for k, v in params.items()]
        ref = self._ref(run_id, run)
        for i in range(0, len(rows), 100):
            chunk = rows[i : i + 100]
            self._send({"op": "log_batch", "run": ref, "params": chunk},
                       lambda rid, c=chunk: self.client.log_batch(rid, params=[Param(k, v) for k, v in c], synchronous=True))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None,
                    run: str = "parent") -> None:
        """``step`` given: a curve point; one already logged at that step (an attempt before a resume) is skipped."""
        from mlflow.entities import Metric

        ref = self._ref(run_id, run)
        now = int(time.time() * 1000)
        rows = [[k, float(v), now, step] for k, v in metrics.items()]
        if step is not None:
            rows = [r for r in rows if self._first_at_step(ref, r[0], step)]
        for i in range(0, len(rows), 1000):
            chunk = rows[i : i + 1000]
            self._send({"op": "log_batch", "run": ref, "metrics": chunk}, lambda rid, c=chunk: self.client.log_batch(
                rid, metrics=[Metric(k, v, t, s or 0) for k, v, t, s in c], synchronous=True))

    def _first_at_step(self, ref: str, key: str, step: int) -> bool:
        """Whether ``key`` has no point at ``step`` yet in this run (read from the store once per key on a resume)."""
        seen = self._steps.get((ref, key))
        if seen is None:
            seen = set()
            rid = self._resolve(ref)
            if self.reopened and rid is not None and self.offline_reason is None:
                try:
                    seen = {m.step for m in self.client.get_metric_history(rid, key)}
                except _tracking_errors() as exc:
                    self._go_offline(exc)  # replay_pending skips what the store has
            self._steps[(ref, key)] = seen
        if step in seen:
            return False
        seen.add(step)
        return True

    def _ref(self, run_id: str | None, run: str) -> str:
        if run_id is None:
            return run
        if run_id == self._run_id:
            return "parent"
        return next((name for name, rid in self.stage_run_ids.items() if rid == run_id), run)

    def set_tags(self, tags: Mapping[str, str], *, run_id: str | None = None, run: str = "parent") -> None:
        from mlflow.entities import RunTag

        if tags:
            rows = [[k, str(v)] for k, v in tags.items()]
            self._send({"op": "log_batch", "run": self._ref(run_id, run), "tags": rows}, lambda rid: self.client.log_batch(
                rid, tags=[RunTag(k, v) for k, v in rows], synchronous=True))

    def _artifact_op(self, op: str, path: Path, artifact_path: str | None) -> None:
        path = Path(path)
        root = self.pending_path.parent.resolve() if self.pending_path else None
        shown = str(path.resolve().relative_to(root)) if root and path.resolve().is_relative_to(root) else str(path.resolve())
        method = self.client.log_artifact if op == "log_artifact" else self.client.log_artifacts
        self._send({"op": op, "run": "parent", "path": shown, "artifact_path": artifact_path},
                   lambda rid: method(rid, str(path), artifact_path))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._artifact_op("log_artifact", path, artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self._artifact_op("log_artifacts", path, artifact_path)

    def terminate(self, status: str) -> None:
        end = int(time.time() * 1000)
        self._send({"op": "terminate", "run": "parent", "status": status, "end_time": end},
                   lambda rid: self.client.set_terminated(rid, status, end_time=end))

    # ---- stages
    def begin_stage(self, name: str, *, elapsed_s: float = 0.0, **tags: str) -> str | None:
        """End the current stage run (if any) and open ``name`` nested under the audit run; returns its run id.

        On a reopened run the stage run of that name is reused (a killed attempt left it KILLED or RUNNING), so a
        resume never duplicates stage runs. ``elapsed_s``: the stage already ran for this long before tracking
        could open (canaries + inject + pre-flight run before the run directory exists); its ``time_s`` counts it.
        None when offline (the stage run is created on replay).
        """
        self.end_stage()
        started = time.perf_counter() - elapsed_s
        all_tags = {STAGE_TAG: name, **tags}

        def open_stage(parent: str | None) -> str:
            found = find_stage_run(self.client, self._experiment_id, parent, name) if self.reopened else None
            if found is not None:
                self.client.update_run(found, status="RUNNING")
                return found
            return self.client.create_run(self._experiment_id, run_name=name,
                                          tags={PARENT_RUN_TAG: parent, **all_tags}).info.run_id

        run_id = self._send({"op": "start_stage", "run": "parent", "stage": name, "tags": all_tags}, open_stage)
        self.stage_run_ids[name] = run_id
        self.current = _Stage(name, run_id, started)
        return run_id

    def end_stage(self, status: str = "FINISHED") -> None:
        stage, self.current = self.current, None
        if stage is None:
            return
        self.log_metrics({"time_s": round(time.perf_counter() - stage.started, 3)}, run=stage.name)
        end = int(time.time() * 1000)
        self._send({"op": "terminate", "run": stage.name, "status": status, "end_time": end},
                   lambda rid: self.client.set_terminated(rid, status, end_time=end))

    @contextmanager
    def stage(self, name: str, *, elapsed_s: float = 0.0) -> Iterator[None]:
        """The block as the stage run ``name``; it ends FINISHED when the block returns. When the block raises, the
        stage is left open: :func:`tracked_run` ends it FAILED (or KILLED) together with the audit's run."""
        self.begin_stage(name, elapsed_s=elapsed_s)
        yield
        self.end_stage()

    def log_stage_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.current is not None:
            self.log_metrics(metrics, step, run=self.current.name)

    def log_stage_params(self, params: Mapping[str, Any]) -> None:
        if self.current is not None:
            self.log_params(dict(params), run=self.current.name)

    # ---- composite calls the pipeline makes
    def log_training_dataset(self, manifest: InjectionManifest, record_chars: list[int], *, name: str) -> None:
        """The fine-tuning set as an MLflow dataset input (context ``training``) on the parent and the current stage.

        Digest: the first 16 hex digits of the manifest's ``dataset_after.sha256`` (the full hash is the tag
        ``canary_audit.dataset_sha256``). Schema-only (see :func:`training_set_rows`): no text reaches MLflow.
        """
        import pandas as pd
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.pandas_dataset import from_pandas

        frame = pd.DataFrame(training_set_rows(manifest, record_chars))
        source = CodeDatasetSource({"corpus": manifest.corpus_source, "canary_spec": manifest.spec,
                                    "manifest_dataset_sha256": manifest.dataset_after.sha256})
        with warnings.catch_warnings():  # "Hint: Inferred schema contains integer column(s)": counts have no gaps
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(frame, source=source, name=name, digest=manifest.dataset_after.sha256[:16])
        d = dataset._to_mlflow_entity()
        fields = {"name": d.name, "digest": d.digest, "source_type": d.source_type, "source": d.source,
                  "schema": d.schema, "profile": d.profile}
        for ref in ["parent", *([self.current.name] if self.current else [])]:
            self._send({"op": "log_inputs", "run": ref, "dataset": fields},
                       lambda rid: self.client.log_inputs(rid, datasets=[_dataset_input(fields)]))
        self.set_tags({"canary_audit.dataset_sha256": manifest.dataset_after.sha256,
                       "canary_audit.dataset_records": str(manifest.dataset_after.n_records)})

    def log_report(self, report: AuditReport, run_dir: Path, *, log_full_weights: bool = False) -> None:
        """Metrics, tags and artifacts of a finished audit on the parent run (see the module docstring).

        Weights: ``adapter/`` (LoRA, a few MB) always; ``model/`` (full fine-tune) and ``merged/`` only with
        ``log_full_weights`` (the recipe's ``tracking.log_full_weights``), otherwise a tag says why they are absent.
        """
        # with a curve (scoring.every_steps, the callback) the final audit is each curve's last point: its metrics go at
        # that step, so MLflow's history of a curve key has no stray point at step 0
        ends = {k: pts[-1] for k, pts in report.curves.items() if pts}
        final_step = max((step for step, _ in ends.values()), default=None)
        self.log_metrics(report_metric_dict(report), final_step)
        for step in sorted({s for s, _ in ends.values()} - {final_step}):  # a curve that ended earlier, at its own step
            self.log_metrics({k: v for k, (s, v) in ends.items() if s == step}, step)
        self.set_tags({"canary_audit.tuned_fingerprint": report.training.weights_fingerprint,
                       "canary_audit.git_revision": report.git_revision or "unknown",
                       **({"canary_audit.verdict": "pass" if all(g.passed for g in report.gates) else "fail"}
                          if report.gates else {})})
        for name in LOGGED_FILES:
            if (run_dir / name).is_file():
                self.log_artifact(run_dir / name)
        if (run_dir / "plots").is_dir():
            self.log_artifacts(run_dir / "plots", "plots")
        skipped = []
        for name in WEIGHT_FOLDERS:
            folder = run_dir / name
            if not folder.is_dir():
                continue
            if name == "adapter" or log_full_weights:
                self.log_artifacts(folder, name)
            else:
                skipped.append(name)
        if skipped:
            self.set_tags({"canary_audit.weights_not_logged": f"{', '.join(skipped)} (set tracking.log_full_weights=true)"})


def _dataset_input(fields: dict[str, Any]) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return DatasetInput(Dataset(**fields), tags=[InputTag("mlflow.data.context", "training")])


def find_stage_run(client: Any, experiment_id: str | None, parent_run_id: str | None, name: str) -> str | None:
    """The newest stage run ``name`` under ``parent_run_id``, or None."""
    if experiment_id is None or parent_run_id is None:
        return None
    found = client.search_runs([experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


class RunTracker(Protocol):
    """What the pipeline logs through: :class:`Tracker` (MLflow) or :class:`NullTracker` (tracking off), the same calls."""

    @property
    def run_id(self) -> str | None: ...

    @property
    def incomplete(self) -> bool: ...

    def log_params(self, params: dict[str, Any], *, run_id: str | None = None, run: str = "parent") -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None,
                    run: str = "parent") -> None: ...

    def set_tags(self, tags: Mapping[str, str], *, run_id: str | None = None, run: str = "parent") -> None: ...

    def stage(self, name: str, *, elapsed_s: float = 0.0) -> AbstractContextManager[None]: ...

    def log_stage_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_stage_params(self, params: Mapping[str, Any]) -> None: ...

    def log_training_dataset(self, manifest: InjectionManifest, record_chars: list[int], *, name: str) -> None: ...

    def log_report(self, report: AuditReport, run_dir: Path, *, log_full_weights: bool = False) -> None: ...

    def info(self) -> TrackingInfo | None: ...


class NullTracker:
    """Tracking off: the same calls as :class:`Tracker`, each doing nothing, so the pipeline never asks ``if tracker``."""

    run_id: str | None = None
    experiment_id: str | None = None
    incomplete = False

    def log_params(self, params: dict[str, Any], *, run_id: str | None = None, run: str = "parent") -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None,
                    run: str = "parent") -> None:
        pass

    def set_tags(self, tags: Mapping[str, str], *, run_id: str | None = None, run: str = "parent") -> None:
        pass

    @contextmanager
    def stage(self, name: str, *, elapsed_s: float = 0.0) -> Iterator[None]:
        yield

    def log_stage_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_stage_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_training_dataset(self, manifest: InjectionManifest, record_chars: list[int], *, name: str) -> None:
        pass

    def log_report(self, report: AuditReport, run_dir: Path, *, log_full_weights: bool = False) -> None:
        pass

    def info(self) -> None:
        return None


@contextmanager
def open_tracker(enabled: bool, uri: str, experiment: str, run_name: str, *, run_id: str | None = None,
                 pending: Path | None = None, progress: bool = True) -> Iterator[Tracker | NullTracker]:
    """:func:`tracked_run` when tracking is on, else a :class:`NullTracker`."""
    if not enabled:
        yield NullTracker()
        return
    with tracked_run(uri, experiment, run_name, run_id=run_id, pending=pending, progress=progress) as tracker:
        yield tracker


def _experiment_id(client: Any, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _quiet_mlflow_logs() -> None:
    """The sqlite store's "Creating initial MLflow database tables..." INFO lines are not for our users."""
    import logging

    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def tracked_run(uri: str, experiment: str, run_name: str, *, run_id: str | None = None, pending: Path | None = None,
                progress: bool = True) -> Iterator[Tracker]:
    """Open (and always close) the audit's parent run, nested under the caller's active run if there is one.

    ``run_id`` reopens an earlier run (``audit run --resume``), so one audit stays one MLflow run. The run ends
    FINISHED, or FAILED / KILLED (Ctrl-C, SIGTERM) with the open stage run when the block raises. ``pending``: the
    run directory's ``tracking_pending.jsonl``, where calls that could not be sent are kept (see :class:`Tracker`).
    The caller's active run, tracking URI and environment are left as they were.
    """
    _quiet_mlflow_logs()
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    caller = mlflow.active_run()
    caller_uri = mlflow.get_tracking_uri() if caller is not None else None
    with _bounded_http():
        tags: dict[str, str] = {}
        if run_id is None:
            if caller is not None and caller_uri == uri:
                tags[PARENT_RUN_TAG] = caller.info.run_id
            elif caller is not None:  # another store: a parent link would dangle, so say where the caller's run is
                tags["canary_audit.caller_run"] = f"{caller_uri} {caller.info.run_id}"
            tags = resolve_tags(tags)
        with store_lock(uri):  # the first process to touch a new sqlite store creates (migrates) it alone
            client = MlflowClient(tracking_uri=uri)  # a sqlite store is created and migrated here
            tracker = Tracker(client, uri, pending=pending, reopened=run_id is not None, progress=progress)
            tracker.open_parent(experiment, run_name, tags, run_id=run_id)
        status = "FINISHED"
        try:
            yield tracker
        except KeyboardInterrupt:  # Ctrl-C, and SIGTERM (audit.pipeline.resume.RunInterrupted)
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            tracker.end_stage(status)
            tracker.terminate(status)


# --------------------------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class Replayed:
    """What :func:`replay_pending` sent: the call count and the parent run (created now if it never was)."""

    calls: int
    run_id: str | None


_RUN, _NAME_OR_NONE = {"run": str}, (str, type(None))
_KEPT_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "create_parent": {"experiment": str, "run_name": str, "tags": dict}, "status": {**_RUN, "status": str},
    "start_stage": {**_RUN, "stage": str, "tags": dict}, "log_batch": {**_RUN, "metrics": list, "params": list, "tags": list},
    "log_artifact": {**_RUN, "path": str, "artifact_path": _NAME_OR_NONE},
    "log_artifacts": {**_RUN, "path": str, "artifact_path": _NAME_OR_NONE},
    "log_inputs": {**_RUN, "dataset": dict}, "terminate": {**_RUN, "status": str, "end_time": int}}
"""Every call :class:`Tracker` keeps, with the fields :func:`replay_pending` reads from it and their JSON types (a
``create_parent`` that names its ``run_id`` needs no other field; a ``log_batch`` may lack any of its lists)."""

_BATCH_ROWS = {"metrics": 4, "params": 2, "tags": 2}
"""A kept ``log_batch``: lists of [key, value, timestamp, step] and [key, value] rows."""
_DATASET_FIELDS = {"name", "digest", "source_type", "source", "schema", "profile"}
"""A kept ``log_inputs``: the fields of the ``mlflow.entities.Dataset`` it rebuilds."""


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None


def _artifact_problem(op: dict[str, Any], root: Path) -> str | None:
    """Why a kept artifact call may not be replayed, or None. An appended ``log_artifact`` of ``canaries.jsonl`` (or
    of ``../../etc/hostname``) made ``audit sync`` upload it (issue 23), so a replay uploads only what
    :meth:`Tracker.log_report` logs (:data:`LOGGED_FILES`, :data:`LOGGED_FOLDERS`), each the run directory's own
    file or folder: never a link, nor a folder holding a link that leads out of it."""
    kind, name, dest = op["op"], op["path"], op["artifact_path"]
    logged = name in LOGGED_FILES and dest is None if kind == "log_artifact" else name in LOGGED_FOLDERS and dest == name
    if not logged or op["run"] != "parent":
        where = (f" as {dest!r}" if dest is not None else "") + (f" to run {op['run']!r}" if op["run"] != "parent" else "")
        return (f"asks to upload {name!r}{where}, which no audit logs (it logs {', '.join(LOGGED_FILES)} and the folders "
                f"{', '.join(LOGGED_FOLDERS)}, each under its own name, to its parent run)")
    local = root / name
    if not os.path.lexists(local):
        return None  # gone since (a removed merged/): the replay skips it
    if _resolved(local) != root / name:
        return f"asks to upload {name}, a link to {_resolved(local) or 'itself'} (the audit's own {name} is no link)"
    if not (local.is_file() if kind == "log_artifact" else local.is_dir()):
        return f"asks to upload {name}, which is not a {'file' if kind == 'log_artifact' else 'folder'}"
    if kind == "log_artifacts":
        for folder, dirs, files in os.walk(local):
            for entry in (Path(folder, e) for e in (*dirs, *files)):
                target = _resolved(entry)
                if entry.is_symlink() and (target is None or not target.is_relative_to(root / name)):
                    return f"asks to upload {name}/, where {entry.relative_to(root)} is a link to {target or 'itself'}"
    return None


def _call_problem(op: Any, root: Path) -> str | None:
    """Why a line of ``tracking_pending.jsonl`` is not a call :class:`Tracker` keeps, or None."""
    if not isinstance(op, dict):
        return f"is a JSON {type(op).__name__}, not a kept call (an object with an op)"
    kind = op.get("op")
    if not isinstance(kind, str) or kind not in _KEPT_FIELDS:
        return ("has no op" if kind is None else f"has an unknown op {kind!r}") + f" (known: {', '.join(_KEPT_FIELDS)})"
    fields = {} if kind == "create_parent" and op.get("run_id") else _KEPT_FIELDS[kind]
    optional = set(_BATCH_ROWS) if kind == "log_batch" else set()
    missing = [field for field in fields if field not in op and field not in optional]
    if missing:
        return f"is a {kind} without {', '.join(missing)}"
    wrong = [field for field, kinds in fields.items() if field in op and not isinstance(op[field], kinds)]
    if wrong:
        return f"is a {kind} whose {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} of the wrong JSON type"
    if kind == "log_batch" and any(not isinstance(row, list) or len(row) != width
                                   for field, width in _BATCH_ROWS.items() for row in op.get(field, [])):
        return "is a log_batch whose rows are not [key, value, timestamp, step] metrics and [key, value] params and tags"
    if kind == "log_inputs" and set(op["dataset"]) != _DATASET_FIELDS:
        return f"is a log_inputs whose dataset has not the fields {', '.join(sorted(_DATASET_FIELDS))}"
    return _artifact_problem(op, root) if kind in ("log_artifact", "log_artifacts") else None


def _read_pending(path: Path, run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """The kept calls of ``path`` (each with its line), all checked before the first one is sent: a line that is
    damaged, or is no call an audit makes, is an :class:`AuditError` naming its number, and the file stays as it is."""
    import json

    root = Path(run_dir).resolve()
    raw = path.read_bytes().split(b"\n")
    kept: list[tuple[str, dict[str, Any]]] = []
    refused: list[tuple[int, str]] = []
    for number, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
            op = json.loads(text)
        except UnicodeDecodeError as exc:
            refused.append((number, f"has a byte that is not UTF-8 (0x{line[exc.start]:02x} at column {exc.start + 1})"))
            continue
        except json.JSONDecodeError as exc:
            cut = number == len(raw)  # no newline after it: its write was cut short (an audit killed mid-write)
            refused.append((number, f"is {'cut short' if cut else 'not JSON'} ({exc.msg}, column {exc.colno})"))
            continue
        if isinstance(op, dict):
            check_version(path, op)  # a newer canary-audit's line: refused whole, before anything is sent
        why = _call_problem(op, root)
        if why is not None:
            refused.append((number, why))
        else:
            kept.append((text, op))
    if refused:
        (number, why), numbers = refused[0], ", ".join(str(n) for n, _ in refused)
        also = f"; {len(refused) - 1} more line(s) are refused too" if len(refused) > 1 else ""
        raise AuditError(f"{path} line {number} {why}{also}; nothing was sent, the file is left as it is",
                         fix=f"the audit writes no such line (a write cut short, or an edit): delete line(s) {numbers}, or "
                             f"the whole file if you do not trust it, and run `audit sync {run_dir}` again")
    return kept


def replay_pending(run_dir: Path, uri: str, *, run_id: str | None) -> Replayed:
    """Send the calls kept in ``run_dir/tracking_pending.jsonl`` to ``uri``, in order; the file is removed after.

    Stage runs are found (or created) by name under the parent; a curve point already in the store (same key and
    step: an attempt before a resume) is not sent twice. The whole file is checked first (:func:`_read_pending`): a
    damaged line, or one asking for an upload the audit never makes, stops the replay before anything is sent. On a
    failure the calls not yet sent stay in the file and an :class:`AuditError` says so. The caller holds the run
    directory's lock.
    """
    import json

    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    path = Path(run_dir) / LAYOUT.pending
    if not path.is_file():
        return Replayed(0, run_id)
    kept = _read_pending(path, run_dir)
    lines, ops = [text for text, _ in kept], [op for _, op in kept]
    _quiet_mlflow_logs()
    with _bounded_http():
        check_tracking_reachable(uri)
        with store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
        ids: dict[str, str | None] = {"parent": run_id}
        experiment: dict[str, str] = {}
        seen: dict[tuple[str, str], set[int]] = {}

        def experiment_id() -> str:
            if "id" not in experiment:
                experiment["id"] = client.get_run(ids["parent"]).info.experiment_id
            return experiment["id"]

        def resolve(ref: str) -> str:
            if ids.get(ref) is None:
                if ids["parent"] is None:
                    raise AuditError(f"{path} logs to a run that was never created", fix="start a new run; this file is damaged")
                found = find_stage_run(client, experiment_id(), ids["parent"], ref)
                ids[ref] = found or client.create_run(experiment_id(), run_name=ref, tags={
                    PARENT_RUN_TAG: ids["parent"], STAGE_TAG: ref}).info.run_id
            return ids[ref]  # type: ignore[return-value]

        def fresh(ref: str, rid: str, key: str, step: int) -> bool:
            if (ref, key) not in seen:
                seen[(ref, key)] = {m.step for m in client.get_metric_history(rid, key)}
            if step in seen[(ref, key)]:
                return False
            seen[(ref, key)].add(step)
            return True

        for done, op in enumerate(ops):
            try:
                kind = op["op"]
                if kind == "create_parent":
                    if ids["parent"] is None and op.get("run_id"):  # created by a replay that failed later
                        ids["parent"] = op["run_id"]
                    elif ids["parent"] is None:
                        run = client.create_run(_experiment_id(client, uri, op["experiment"]), run_name=op["run_name"],
                                                tags=op["tags"])
                        ids["parent"], experiment["id"] = run.info.run_id, run.info.experiment_id
                    continue
                rid = resolve(op["run"])
                if kind == "status":
                    client.update_run(rid, status=op["status"])
                elif kind == "start_stage":
                    resolve(op["stage"])
                    client.log_batch(ids[op["stage"]], tags=[RunTag(k, v) for k, v in op["tags"].items()], synchronous=True)
                elif kind == "log_batch":
                    metrics = [Metric(k, v, t, s or 0) for k, v, t, s in op.get("metrics", [])
                               if s is None or fresh(op["run"], rid, k, s)]
                    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in op.get("params", [])],
                                     tags=[RunTag(k, v) for k, v in op.get("tags", [])], synchronous=True)
                elif kind in ("log_artifact", "log_artifacts"):
                    local = Path(run_dir) / op["path"]
                    if local.exists():
                        getattr(client, kind)(rid, str(local), op["artifact_path"])
                elif kind == "log_inputs":
                    client.log_inputs(rid, datasets=[_dataset_input(op["dataset"])])
                elif kind == "terminate":
                    client.set_terminated(rid, op["status"], end_time=op["end_time"])
            except _tracking_errors() as exc:
                if _refused(exc):
                    continue
                from audit.core.store import atomic_write_text

                rest = lines[done:]
                if run_id is None and ids["parent"] is not None:  # the parent exists now: the next replay must know it
                    rest = [json.dumps(versioned(LAYOUT.pending, {"op": "create_parent", "run_id": ids["parent"]})), *rest]
                atomic_write_text(path, "".join(line + "\n" for line in rest))
                raise AuditError(f"MLflow at {uri} failed while replaying call {done + 1} of {len(ops)} "
                                 f"({_short(exc)}); {len(ops) - done} calls stay in {path}",
                                 fix=f"check the server and run `audit sync {run_dir}` again") from None
    path.unlink()
    return Replayed(len(ops), ids["parent"])
