"""Scoring on every rank: two gloo processes on CPU score a share each and give exactly the single-process scores."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from audit.canaries import generate_canaries, load_spec, reference_secrets
from audit.schema import ScoringSection, SequenceScore
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


def _rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from audit.models import load_model_and_tokenizer

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
        rows = score_sharded(model, tok, canaries, refs, label="base", section=SECTION, progress=False, seed=1)
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
def test_two_gloo_processes_score_exactly_what_one_process_does(tiny_model, tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, _free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    canaries, refs = _canaries()
    ids = [c.id for c in canaries.canaries]
    assert rank0["calls"] == ids[0::2] and rank1["calls"] == ids[1::2]  # each rank ranked only its share
    assert rank1["rows"] is None
    model, tok = tiny_model
    with torch_threads(1):
        single = score_canaries(model, tok, canaries, refs, label="base", section=SECTION, progress=False, seed=1)
    assert [SequenceScore.model_validate(r) for r in rank0["rows"]] == single
    assert any(r.exact_status == "exact" for r in single) and any(r.sampled_matches is not None for r in single)
