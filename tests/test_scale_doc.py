"""docs/scale.md: its memory table is what benchmarks/scale_memory.py computes, and that computation counts the
parameters transformers builds for the shapes shipped in benchmarks/configs/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale_memory  # noqa: E402


def test_the_docs_table_is_the_scripts_output():
    assert scale_memory.table() in (ROOT / "docs" / "scale.md").read_text()


@pytest.mark.parametrize("config", sorted(scale_memory.SHIPPED))
def test_the_parameter_formula_counts_what_transformers_builds(config):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**scale_memory.shipped_config(config)))
    built = sum(p.numel() for p in model.parameters())
    assert scale_memory.param_count(*scale_memory.SHAPES[scale_memory.SHIPPED[config]]) == built


def test_the_budget_is_the_engines():
    import torch

    from audit.score import engine

    class Head:
        weight = torch.empty((151_936, 1), device="meta")

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def get_output_embeddings(self):
            return Head()

    props = type("P", (), {"total_memory": scale_memory.DEVICE_BYTES})()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "device_of", lambda model: torch.device("cuda"))
        mp.setattr(torch.cuda, "get_device_properties", lambda device: props)
        assert engine.default_token_budget(Fake()) == scale_memory.token_budget(151_936)
