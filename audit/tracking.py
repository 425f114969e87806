"""MLflow tracking: one parent run per audit, one nested run per stage, TRL logging into the train stage.

What an audit looks like in ``mlflow ui`` (experiment ``tracking.experiment``, default ``canary-audit``)::

    tiny/lora_cpu                 parent run, the one to compare across recipes
    ├── inject                    canaries + injection + pre-flight: counts, the training set as a dataset input
    ├── score_base                base-model scoring
    ├── train                     TRL's own MLflowCallback (report_to="mlflow") logs loss, grad_norm, learning_rate,
    │                             epoch per step and the TrainingArguments as params into this run
    ├── score_tuned               tuned-model scoring
    └── report                    report.json / report.html / report.md written and logged

The parent run carries: params = the flattened resolved recipe (``training.lora.r``); tags = fingerprints of the
base weights, manifest, canary set, tuned weights, the git revision and package versions (``canary_audit.*``);
metrics = every report metric under its stable key (:func:`report_metric_dict`), ``train.loss`` per step,
``time.<stage>_s``; artifacts = report.json/html/md, plots/, manifest.json, the LoRA adapter (full weights only
with ``tracking.log_full_weights``). Every stage run has ``time_s``, its wall time.

Nesting: when the caller already has an active run (a notebook, a larger pipeline), the audit's parent run is
created under it (tag ``mlflow.parentRunId``), even when the caller's run lives in another experiment; with no
explicit URI the audit then logs to the caller's tracking URI. The caller's active run, tracking URI and
``$MLFLOW_TRACKING_URI`` are as they were afterwards.

Why TRL's own callback works here: ``MLflowCallback.setup`` logs into ``mlflow.active_run()`` when one exists and
only starts (and later ends) a run of its own when none does. Each stage run is pushed as the fluent active run
while it lasts, so the callback writes into the ``train`` stage run (with transformers 5.23 / TRL 1.16).
``train.loss`` on the parent comes from our own callback (:func:`audit.train.sft.train_sft` ``on_loss``) so
recipes stay comparable on the parent run alone.

Default backend: an embedded sqlite file, ``sqlite:///<cwd>/mlflow.db``, with artifacts beside it in
``<cwd>/mlartifacts``. ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` selects a server instead; a server is
checked before any training starts, so an unreachable one fails in seconds, not after an hour.
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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audit.errors import AuditError

if TYPE_CHECKING:
    from audit.schema import AuditReport, InjectionManifest, TrackingInfo

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARENT_RUN_TAG = "mlflow.parentRunId"
STAGE_TAG = "canary_audit.stage"
HF_CALLBACK_ENV = ("MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN", "MLFLOW_EXPERIMENT_NAME")
"""Environment knobs of transformers' MLflowCallback that would make it start a run of its own: hidden in a stage."""


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
            raise AuditError(f"folder {parent} for the MLflow sqlite store does not exist", fix="create it or choose another --tracking-uri")
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


@dataclass
class _Stage:
    name: str
    run_id: str
    started: float


class Tracker:
    """A handle over the audit's parent run: logs by run id (never by "whatever run is active"), opens stage runs."""

    def __init__(self, client: Any, run: Any, uri: str) -> None:
        self.client = client
        self.run = run
        self.uri = uri
        self.current: _Stage | None = None
        self.stage_run_ids: dict[str, str] = {}

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def experiment_id(self) -> str:
        return self.run.info.experiment_id

    report_to = "mlflow"
    """The trainer's ``report_to``: TRL's MLflowCallback logs into the active (train stage) run."""

    def info(self) -> TrackingInfo:
        """Where this run is, for the report."""
        from audit.schema import TrackingInfo

        return TrackingInfo(uri=self.uri, experiment_id=self.experiment_id, run_id=self.run_id, ui_command=ui_command(self.uri))

    # ---- the parent run (or a stage run via ``run_id``)
    def log_params(self, params: dict[str, Any], *, run_id: str | None = None) -> None:
        from mlflow.entities import Param

        items = [Param(k, ("" if v is None else str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id or self.run_id, params=items[i : i + 100], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=items[i : i + 1000], synchronous=True)

    def set_tags(self, tags: Mapping[str, str], *, run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id or self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    # ---- stages
    def begin_stage(self, name: str, *, elapsed_s: float = 0.0, **tags: str) -> str:
        """End the current stage run (if any) and open ``name`` nested under the audit run; returns its run id.

        The stage run is also the fluent active run while it lasts, so libraries that log through ``mlflow.*``
        (TRL's MLflowCallback) write into it. ``elapsed_s``: the stage already ran for this long before tracking
        could open (canaries + inject + pre-flight run before the run directory exists); its ``time_s`` counts it.
        """
        import mlflow

        self.end_stage()
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={PARENT_RUN_TAG: self.run_id, STAGE_TAG: name, **tags})
        mlflow.start_run(run_id=run.info.run_id, nested=True)
        self.current = _Stage(name, run.info.run_id, time.perf_counter() - elapsed_s)
        self.stage_run_ids[name] = run.info.run_id
        return run.info.run_id

    def end_stage(self, status: str = "FINISHED") -> None:
        import mlflow

        stage, self.current = self.current, None
        if stage is None:
            return
        try:
            self.log_metrics({"time_s": round(time.perf_counter() - stage.started, 3)}, run_id=stage.run_id)
        finally:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == stage.run_id:
                mlflow.end_run(status)  # pops it and flushes the callback's asynchronous logging
            else:  # a library ended or replaced it: still close ours
                self.client.set_terminated(stage.run_id, status)

    @contextmanager
    def stage(self, name: str, *, elapsed_s: float = 0.0) -> Iterator[None]:
        """The block as the stage run ``name``; it ends FINISHED when the block returns. When the block raises, the
        stage is left open: :func:`tracked_run` ends it FAILED (or KILLED) together with the audit's run."""
        self.begin_stage(name, elapsed_s=elapsed_s)
        yield
        self.end_stage()

    def log_stage_metrics(self, metrics: Mapping[str, float]) -> None:
        if self.current is not None:
            self.log_metrics(metrics, run_id=self.current.run_id)

    # ---- composite calls the pipeline makes
    def log_training_dataset(self, manifest: InjectionManifest, record_chars: list[int], *, name: str) -> None:
        """The fine-tuning set as an MLflow dataset input (context ``training``) on the parent and the current stage.

        Digest: the first 16 hex digits of the manifest's ``dataset_after.sha256`` (the full hash is the tag
        ``canary_audit.dataset_sha256``). Schema-only (see :func:`training_set_rows`): no text reaches MLflow.
        """
        import pandas as pd
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import DatasetInput, InputTag

        frame = pd.DataFrame(training_set_rows(manifest, record_chars))
        source = CodeDatasetSource({"corpus": manifest.corpus_source, "canary_spec": manifest.spec,
                                    "manifest_dataset_sha256": manifest.dataset_after.sha256})
        with warnings.catch_warnings():  # "Hint: Inferred schema contains integer column(s)": counts have no gaps
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(frame, source=source, name=name, digest=manifest.dataset_after.sha256[:16])
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
        for run_id in {self.run_id, *([self.current.run_id] if self.current else [])}:
            self.client.log_inputs(run_id, datasets=[entity])
        self.set_tags({"canary_audit.dataset_sha256": manifest.dataset_after.sha256,
                       "canary_audit.dataset_records": str(manifest.dataset_after.n_records)})

    def log_report(self, report: AuditReport, run_dir: Path, *, log_full_weights: bool = False) -> None:
        """Metrics, tags and artifacts of a finished audit on the parent run (see the module docstring).

        Weights: ``adapter/`` (LoRA, a few MB) always; ``model/`` (full fine-tune) and ``merged/`` only with
        ``log_full_weights`` (the recipe's ``tracking.log_full_weights``), otherwise a tag says why they are absent.
        """
        self.log_metrics(report_metric_dict(report))
        self.set_tags({"canary_audit.tuned_fingerprint": report.training.weights_fingerprint,
                       "canary_audit.git_revision": report.git_revision or "unknown",
                       **({"canary_audit.verdict": "pass" if all(g.passed for g in report.gates) else "fail"} if report.gates else {})})
        for name in ("report.json", "report.html", "report.md", "manifest.json", "preflight.json", "works.json",
                     "token_view.json"):
            if (run_dir / name).is_file():
                self.log_artifact(run_dir / name)
        if (run_dir / "plots").is_dir():
            self.log_artifacts(run_dir / "plots", "plots")
        skipped = []
        for name in ("adapter", "model", "merged"):
            folder = run_dir / name
            if not folder.is_dir():
                continue
            if name == "adapter" or log_full_weights:
                self.log_artifacts(folder, name)
            else:
                skipped.append(name)
        if skipped:
            self.set_tags({"canary_audit.weights_not_logged": f"{', '.join(skipped)} (set tracking.log_full_weights=true)"})


class NullTracker:
    """Tracking off: the same calls as :class:`Tracker`, each doing nothing, so the pipeline never asks ``if tracker``."""

    run_id: str | None = None
    experiment_id: str | None = None
    report_to = "none"
    """What the trainer's ``report_to`` is: TRL's MLflowCallback only runs under a real tracker."""

    def log_params(self, params: dict[str, Any], *, run_id: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, run_id: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str], *, run_id: str | None = None) -> None:
        pass

    @contextmanager
    def stage(self, name: str, *, elapsed_s: float = 0.0) -> Iterator[None]:
        yield

    def log_stage_metrics(self, metrics: Mapping[str, float]) -> None:
        pass

    def log_training_dataset(self, manifest: InjectionManifest, record_chars: list[int], *, name: str) -> None:
        pass

    def log_report(self, report: AuditReport, run_dir: Path, *, log_full_weights: bool = False) -> None:
        pass

    def info(self) -> None:
        return None


@contextmanager
def open_tracker(enabled: bool, uri: str, experiment: str, run_name: str, *,
                 run_id: str | None = None) -> Iterator[Tracker | NullTracker]:
    """:func:`tracked_run` when tracking is on, else a :class:`NullTracker`."""
    if not enabled:
        yield NullTracker()
        return
    with tracked_run(uri, experiment, run_name, run_id=run_id) as tracker:
        yield tracker


@contextmanager
def _fluent_uri(mlflow: Any, uri: str) -> Iterator[None]:
    """Point the fluent API at ``uri`` for the block; give the caller back its URI, experiment and environment after.

    :data:`HF_CALLBACK_ENV` is hidden meanwhile, so TRL's callback logs into our stage run instead of starting one.

    The caller's ``mlflow.set_experiment`` is set aside too: with it, ``mlflow.start_run(run_id=...)`` refuses a run
    of another experiment ("active experiment ID does not match"), which is what a stage run of ours is.
    """
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = tracking_utils._tracking_uri  # None when the caller never set one (not the resolved default)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    experiment = getattr(fluent, "_active_experiment_id", None)
    hidden = {k: os.environ.pop(k) for k in HF_CALLBACK_ENV if k in os.environ}
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = None
    try:
        yield
    finally:
        fluent._active_experiment_id = experiment
        os.environ.update(hidden)
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


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
def tracked_run(uri: str, experiment: str, run_name: str, *, run_id: str | None = None) -> Iterator[Tracker]:
    """Open (and always close) the audit's parent run, nested under the caller's active run if there is one.

    ``run_id`` reopens an earlier run (``audit run --resume``), so one audit stays one MLflow run. The run ends
    FINISHED, or FAILED / KILLED (Ctrl-C) with the open stage run when the block raises.
    """
    _quiet_mlflow_logs()
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    caller = mlflow.active_run()
    caller_uri = mlflow.get_tracking_uri() if caller is not None else None
    client = MlflowClient(tracking_uri=uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        run = client.get_run(run_id)
    else:
        tags: dict[str, str] = {}
        if caller is not None and caller_uri == uri:
            tags[PARENT_RUN_TAG] = caller.info.run_id
        elif caller is not None:  # another store: a parent link would dangle, so say where the caller's run is
            tags["canary_audit.caller_run"] = f"{caller_uri} {caller.info.run_id}"
        run = client.create_run(_experiment_id(client, uri, experiment), run_name=run_name, tags=resolve_tags(tags))
    tracker = Tracker(client, run, uri)
    status = "FINISHED"
    with _fluent_uri(mlflow, uri):
        try:
            yield tracker
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            try:
                tracker.end_stage(status)
            finally:
                client.set_terminated(tracker.run_id, status)
