"""docs/scale.md: its memory table is rendered from benchmarks/scale_memory.json, that JSON is what
benchmarks/scale_memory.py computes now, and that computation counts the parameters transformers builds for the shapes
shipped in benchmarks/configs/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale_memory  # noqa: E402
import tables  # noqa: E402


def test_the_json_holds_what_the_script_computes_now_and_says_it_is_not_measured():
    """A formula or shape changed without rerunning ``scale_memory.py --json`` fails here."""
    data = json.loads((ROOT / "benchmarks" / "scale_memory.json").read_text())
    fresh = scale_memory.result([])
    assert data["computed_not_measured"] is True and "not a measurement" in data["note"]
    assert {k: data[k] for k in ("device", "constants", "formulas", "models")} == \
        {k: fresh[k] for k in ("device", "constants", "formulas", "models")}


def test_the_docs_table_is_rendered_from_the_json():
    text = (ROOT / "docs" / "scale.md").read_text()
    assert tables.marker("scale_memory") + "\n" + tables.generate("scale_memory") in text
    assert "| Llama-3-70B | 70.55 B | 6,898 | 9.9 | 262.8 / 131.4 |" in tables.generate("scale_memory")


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
