"""MLflow tracking: the harness owns one run per audit (nested under the caller's run if one is active).

Default backend: an embedded sqlite file, ``sqlite:///<cwd>/mlflow.db``, with artifacts beside it in
``<cwd>/mlartifacts``. ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` selects a server instead; a server is
checked before any training starts, so an unreachable one fails in seconds, not after an hour.
Secrets never reach MLflow: params, metrics and tags carry ids and hashes only.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from audit.errors import AuditError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def resolve_tracking_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
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


class Tracker:
    """A thin handle over one MLflow run, with the calls the pipeline needs and nothing else."""

    def __init__(self, mlflow_module: Any, run: Any, uri: str) -> None:
        self._mlflow = mlflow_module
        self.run = run
        self.uri = uri

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def experiment_id(self) -> str:
        return self.run.info.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        clean = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        items = list(clean.items())
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifacts(str(path), artifact_path)


@contextmanager
def tracked_run(uri: str, experiment: str, run_name: str, *, run_id: str | None = None) -> Iterator[Tracker]:
    """Open (and always close) the audit's MLflow run; nest under an active run instead of clashing with it.

    ``run_id`` reopens an earlier run (``audit run --resume``), so one audit stays one MLflow run.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as run:
            yield Tracker(mlflow, run, uri)
        return
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested) as run:
        yield Tracker(mlflow, run, uri)
