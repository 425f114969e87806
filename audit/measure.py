"""``audit measure``: audit a model someone else trained, against the canaries ``audit inject`` planted.

    audit inject tiny/lora_cpu --out gt                        # canaries + injected training set (gt/train.jsonl)
    python my_trainer.py gt/train_dataset out/                 # your own training, anywhere
    audit measure gt --model out/                              # a full fine-tune (merged weights)
    audit measure gt --adapter out/adapter                     # a PEFT adapter on the base inject recorded
    audit measure runs/<run> --model tiny-llama --adapter runs/<run>/adapter   # re-measure an audit run's weights

The tuned model comes from an :class:`audit.origin.ExternalModel`: the pipeline is the one ``audit run`` uses, with
the train stage replaced by loading the weights given; the run directory, report, gates and MLflow run are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def measure_run(
    ground_truth_dir: str | Path,
    *,
    model: str | Path | None = None,
    adapter: str | Path | None = None,
    base: str | None = None,
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
    tracking: bool | None = None,
    progress: bool = True,
    out_root: str | Path | None = None,
) -> Any:
    """Score the base and the tuned model on the canaries of ``ground_truth_dir`` and write a normal run directory.

    ``model``: the tuned model (a merged model directory or a model source); with ``adapter`` (a PEFT adapter
    directory) the model the adapter is put on, default the base. ``base``: the pretrained model the canaries are
    measured against (default: the one ``audit inject`` recorded). ``overrides``: ``key=value`` recipe overrides
    (scoring, gates, tracking, output; not what shaped the ground truth). ``out_root``: where the run directory goes
    (default the recipe's ``output.root``). Returns an :class:`audit.pipeline.AuditResult`; bad input raises
    :class:`audit.errors.AuditError` before anything is written.
    """
    raise NotImplementedError("measure_run: in progress (task B)")
