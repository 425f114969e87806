"""Every process of a distributed run audits the canaries rank 0 drew: the plan names them, and a process that drew
others (another audit key: each node fell back to its own key file) makes every process refuse, in one line."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import TORCHRUN_2

from audit.core.errors import AuditError
from audit.train.types import TrainPlan

KEY_A, KEY_B = "5a" * 32, "a5" * 32


def _plan(key_id: str | None = "k0", digest: str = "d" * 64) -> TrainPlan:
    return TrainPlan(run_dir=Path("/runs/r"), train=True, key_id=key_id, canary_set_sha256=digest)


def test_processes_that_drew_what_rank_0_drew_pass():
    _plan().check_drawn([("k0", "d" * 64), ("k0", "d" * 64), ("k0", "d" * 64)])
    _plan(None, "e" * 64).check_drawn([(None, "e" * 64), (None, "e" * 64)])  # an unkeyed set: the hash alone


def test_a_process_under_another_key_is_refused_in_one_line_naming_both_keys():
    with pytest.raises(AuditError) as caught:
        _plan().check_drawn([("k0", "d" * 64), ("k0", "d" * 64), ("k9", "f" * 64)])
    text = caught.value.problem
    assert "\n" not in text and "process 2" in text and "k9" in text and "k0" in text and "ffffffffffff" in text
    assert "CANARY_AUDIT_KEY" in caught.value.fix


def test_the_same_key_with_another_canary_set_points_at_the_recipe_not_the_key():
    with pytest.raises(AuditError) as caught:
        _plan().check_drawn([("k0", "d" * 64), ("k0", "c" * 64)])
    assert "cccccccccccc" in caught.value.problem and "recipe" in caught.value.fix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, keys: list[str], out: str) -> None:
    """One process: its own audit key, its own draw, then the plan exchange every process of an audit makes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), CANARY_AUDIT_KEY=keys[rank])
    from audit.core.keys import resolve_key
    from audit.data.canaries import generate_canaries, load_spec
    from audit.pipeline import stages

    truth = SimpleNamespace(canaries=generate_canaries(load_spec("digits", {"length": 3}), seed=5, tiers=[1],
                                                       members_per_tier=2, references=2, key=resolve_key()))
    key_id, digest = stages.drawn(truth)
    make = (lambda: TrainPlan(run_dir=Path(out), train=True, key_id=key_id, canary_set_sha256=digest)) if rank == 0 else None
    try:
        plan = stages.share_plan(make, truth)
        result = {"plan": [plan.key_id, plan.canary_set_sha256], "own": [key_id, digest]}
    except AuditError as exc:
        result = {"refused": exc.problem, "own": [key_id, digest]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.parametrize("keys", [[KEY_A, KEY_A], [KEY_A, KEY_B]], ids=["same-key", "other-key"])
def test_two_gloo_processes_agree_on_the_plan_or_both_refuse(tmp_path, keys):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, _free_port(), keys, str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    if keys[0] == keys[1]:
        assert zero["plan"] == one["plan"] == zero["own"] == one["own"]
        return
    assert zero["own"][0] != one["own"][0] and zero["own"][1] != one["own"][1]  # another key draws other secrets
    assert zero["refused"] == one["refused"]  # every process stops, with the same line
    assert f"audit key {one['own'][0]}" in zero["refused"] and f"rank 0's audit key {zero['own'][0]}" in zero["refused"]


RANK_KEY_LAUNCHER = """
import os
import sys

os.environ["CANARY_AUDIT_KEY"] = os.environ["RANK_KEYS"].split(",")[int(os.environ["RANK"])]  # each node its own key
from audit.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # ~1 min on the shared 2-core machine: two processes import torch and draw the tiny audit's canaries
def test_torchrun_with_a_different_key_per_process_refuses_before_training(tmp_path):
    import subprocess

    launcher = tmp_path / "rank_key.py"
    launcher.write_text(RANK_KEY_LAUNCHER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RANK_KEYS": f"{KEY_A},{KEY_B}",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([*TORCHRUN_2, str(launcher), "run",
                           "tiny/lora_cpu", "--quiet", "--no-tracking"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if "drew other canaries than rank 0" in line]
    assert len(refusals) == 2, proc.stderr[-3000:]  # both processes, one line each
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert not (run_dir / "canaries.jsonl").exists() and not (run_dir / "adapter").exists()
