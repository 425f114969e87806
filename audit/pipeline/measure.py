"""``audit measure``: audit a model someone else trained, against the canaries ``audit inject`` planted.

    audit inject tiny/lora_cpu --out gt                        # canaries + injected set (gt/train.jsonl, gt/train_dataset/)
    python my_trainer.py gt/train_dataset out/                 # your own training, anywhere
    audit measure gt --model out/                              # a full fine-tune (or merged weights)
    audit measure gt --model model.q4_0.gguf                   # a release in llama.cpp's format (dequantized to fp32)
    audit measure gt --adapter out/adapter                     # a PEFT adapter on the base inject recorded
    audit measure runs/<run> --adapter runs/<run>/adapter      # measure an audit run's weights again

The ground-truth directory is what ``audit inject`` writes (``recipe.yaml``, ``inject.json``, ``canaries.jsonl`` +
``canaries.meta.json``, ``manifest.json``) or an earlier run directory. The tuned model comes from an
:class:`audit.pipeline.origin.ExternalModel`: the pipeline is the one ``audit run`` runs (:func:`audit.pipeline.run_origin`),
with the train stage replaced by loading the weights given, so the run directory, report, gates and MLflow run are
the same as an ``audit run``'s and ``audit gate / report / compare`` read it unchanged.

The checks are in :mod:`audit.pipeline.external`. Checked before anything is written (one line each, exit 2): the ground-truth
files are there and its canaries match its manifest; the audit key in use is the one it was made with; the tuned
model has the base's architecture and tensor shapes, an adapter fits the layers it adapts (both from the safetensors
headers); the tuned model's tokenizer is the base's (vocabulary and merges compared by hash, not by object); the tuned
weights are not the base's ("nothing was trained"); its files can be read. When the run starts, the injection is
drawn again from the recorded recipe and must reproduce ``manifest.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from audit.pipeline.external import GroundTruthDir
    from audit.pipeline.origin import ExternalModel


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
    :class:`audit.core.errors.AuditError` before anything is written.
    """
    from audit.pipeline import run_origin
    from audit.pipeline.external import read_ground_truth_dir

    origin = measured_model(read_ground_truth_dir(ground_truth_dir), model=model, adapter=adapter, base=base,
                            overrides=overrides, out_root=out_root, progress=progress)
    return run_origin(origin, tracking_uri=tracking_uri, tracking=tracking, progress=progress)


def measured_model(gt: GroundTruthDir, *, model: str | Path | None = None, adapter: str | Path | None = None,
                   base: str | None = None, overrides: Sequence[str] = (), out_root: str | Path | None = None,
                   progress: bool = True) -> ExternalModel:
    """The :class:`~audit.pipeline.origin.ExternalModel` for the weights given on the ground truth ``gt``, under the recipe a
    measurement runs (:func:`audit.pipeline.external.measure_recipe`), every check done and nothing written: what ``audit
    measure`` runs, and what the Trainer callback measures the weights it saved with
    (:class:`~audit.pipeline.origin.LiveTraining`)."""
    from audit.data.validate import check_gates
    from audit.pipeline.external import measure_recipe
    from audit.pipeline.origin import external_model

    recipe = measure_recipe(gt, base=base, adapter=adapter, overrides=overrides, out_root=out_root)
    check_gates(recipe)  # a gate no run can pass would fail after all the scoring: refused now
    return external_model(gt, recipe, model=model, adapter=adapter, base_given=base is not None, progress=progress)
