"""Scoring on every rank: two gloo processes on CPU score a share each and give exactly the single-process scores."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN_2

from audit.core.schema import ScoringSection, SequenceScore
from audit.data.canaries import generate_canaries, load_spec, reference_secrets
from audit.score.canaries import score_canaries
from audit.score.engine import torch_threads
from audit.score.sharded import score_sharded, shard_of

SECTION = ScoringSection(exposure_references=31, exact_exposure_budget=10_000, sampled_extraction_samples=3)


def _canaries():
    spec = load_spec("digits", {"length": 3})
    canaries = generate_canaries(spec, seed=5, tiers=[1, 4], members_per_tier=2, references=3)
    return canaries, reference_secrets(spec, canaries, n=31, seed=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, model_dir: str, out: str, null_refs: int | None = None) -> None:
    import torch.distributed as dist

    from audit.data.models import load_model_and_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, tok = load_model_and_tokenizer(model_dir, dtype=torch.float32, device="cpu")
        canaries, refs = _canaries()
        calls = []
        from audit.score import canaries as score_module

        row = score_module.exposure_row

        def counted(*args, **kwargs):
            calls.append(args[2].id)
            return row(*args, **kwargs)

        score_module.exposure_row = counted  # which canaries this rank ranked itself
        section = SECTION.model_copy(update={"exposure_null_references": null_refs})
        rows = score_sharded(model, tok, canaries, refs, label="base", section=section, progress=False, seed=1)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"calls": calls, "rows": None if rows is None else [r.model_dump(mode="json") for r in rows]}, f)
    finally:
        dist.destroy_process_group()


def test_shards_are_round_robin_and_cover_every_canary():
    shards = [shard_of(7, rank=r, world=3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError):
        shard_of(7, rank=3, world=3)


def test_one_process_is_plain_score_canaries(tiny_model):
    model, tok = tiny_model
    canaries, refs = _canaries()
    with torch_threads(1):
        assert score_sharded(model, tok, canaries, refs, label="base", section=SECTION, progress=False, seed=1) == \
            score_canaries(model, tok, canaries, refs, label="base", section=SECTION, progress=False, seed=1)


@pytest.mark.slow  # ~45 s on the shared 2-core machine, most of it two processes importing torch and transformers
@pytest.mark.parametrize("null_refs", [None, 2])  # 2: one of the 3 references gets the teacher-forced pass only
def test_two_gloo_processes_score_exactly_what_one_process_does(tiny_model, tiny_model_dir, tmp_path, null_refs):
    import torch.multiprocessing as mp

    from audit.score.canaries import ranked_indices

    mp.spawn(_rank, args=(2, _free_port(), str(tiny_model_dir), str(tmp_path), null_refs), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    canaries, refs = _canaries()
    section = SECTION.model_copy(update={"exposure_null_references": null_refs})
    ids = [canaries.canaries[i].id for i in ranked_indices(canaries, section)]
    assert len(ids) == (7 if null_refs is None else 6)
    assert rank0["calls"] == ids[0::2] and rank1["calls"] == ids[1::2]  # each rank ranked only its share
    assert rank1["rows"] is None
    model, tok = tiny_model
    with torch_threads(1):
        single = score_canaries(model, tok, canaries, refs, label="base", section=section, progress=False, seed=1)
    assert [SequenceScore.model_validate(r) for r in rank0["rows"]] == single
    assert any(r.exact_status == "exact" for r in single) and any(r.sampled_matches is not None for r in single)


RANK_LOG_HOOK = """
import os
if os.environ.get("LOCAL_RANK") is not None:  # a torchrun process (not the launcher): log each canary it ranks
    import audit.score.canaries as scoring

    ranked = scoring.exposure_row

    def exposure_row(model, tokenizer, canary, *args, **kwargs):
        with open(os.path.join(os.environ["RANK_LOG_DIR"], "rank" + os.environ["RANK"] + ".txt"), "a") as f:
            f.write(canary.id + "\\n")
        return ranked(model, tokenizer, canary, *args, **kwargs)

    scoring.exposure_row = exposure_row
"""


@pytest.mark.slow  # ~2 min on the shared 2-core machine: a 2-process and a 1-process tiny audit, one rescoring
def test_torchrun_audit_scores_equal_one_process_scoring_byte_for_byte(tmp_path):
    """``torchrun --nproc_per_node 2 -m audit.cli run tiny/lora_cpu`` (gloo): both processes score a share of the
    base and of the tuned weights. Base: the same bytes as a plain ``audit run`` with the same seed. Tuned: DDP
    training is not single-process training (each process sees half the batches, 11 steps an epoch, not 21), so the
    weights differ; the 2-process run's own weights, rescored in one process, give its scores_tuned.jsonl byte for
    byte. A ``sitecustomize`` in the processes logs which canaries each ranked: rank 1 ranked its half, twice."""
    from audit.core.store import jsonl_text
    from audit.data.ground_truth import read_canary_set
    from audit.pipeline import stages
    from audit.pipeline.origin import origin_for
    from audit.pipeline.resume import load_resumable

    hook, logs = tmp_path / "hook", tmp_path / "ranks"
    hook.mkdir()
    logs.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_LOG_HOOK)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "RANK_LOG_DIR": str(logs), "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    bin_dir = Path(sys.executable).parent
    args = ["run", "tiny/lora_cpu", "--quiet", "--no-tracking", "--no-fail-on-gates"]
    runs = {}
    for name, command in (("two", [*TORCHRUN_2, "-m", "audit.cli", *args]),
                          ("one", [str(bin_dir / "audit"), *args])):
        work = tmp_path / name
        work.mkdir()
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (runs[name],) = (work / "runs").iterdir()
    two, one = runs["two"], runs["one"]
    assert json.loads((two / "run.json").read_text())["status"] == "complete"
    ids = [c.id for c in read_canary_set(two).canaries]
    ranked = {r: (logs / f"rank{r}.txt").read_text().split() for r in (0, 1)}
    assert ranked == {0: ids[0::2] * 2, 1: ids[1::2] * 2}  # base, then tuned: each process its round-robin share
    base = (two / "scores_base.jsonl").read_bytes()
    assert base and base == (one / "scores_base.jsonl").read_bytes()

    run_dir, recipe, _ = load_resumable(two)
    origin = origin_for(recipe)
    ctx = stages.RunContext.prepare(origin, tracking=False, progress=False)
    truth = ctx.ground_truth(origin)
    with torch_threads(1):
        base_model, tok = stages.load_base(ctx)
        stored = stages.TrainedWeights(ctx, base_model).read(run_dir)
        rescored = stages.score(ctx, stored.model, tok, truth, "tuned")  # one process: plain score_canaries
    tuned = (two / "scores_tuned.jsonl").read_text()
    assert jsonl_text(rescored) == tuned
    assert (two / "scores.jsonl").read_text() == base.decode() + tuned
    # the comparison covers the expensive shared part: learned canaries reach rank 1 and are walked
    learned = [r for r in rescored if r.repetitions == 16]
    assert all(r.rank == 1 and r.exact_status in ("exact", "budget_exceeded") for r in learned)
    assert all(sum(r.token_top1) > len(r.token_top1) / 2 for r in learned)  # and the per-token view came through
