"""Every shipped recipe: its header (the command that runs it, an override, expected time and memory), its
`expected` section, and a dry validation; the accelerate configs the multi-GPU recipe names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from audit.core.config import load_recipe, shipped_recipes
from audit.core.resources import data_dir
from audit.data.validate import validate_only

RECIPES = data_dir("recipes")
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))
HUB_ID = re.compile(r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$")


def header(name: str) -> list[str]:
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    return [line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]]


def test_the_shipped_set():
    names = set(shipped_recipes())
    assert {"tiny/lora_cpu", "tiny/full_cpu", "tiny/clean_lora_cpu", "smollm2/lora_cpu", "smollm2/full_cpu",
            "smollm2/clean_lora_cpu"} <= names
    gpu = {n for n in names if n.endswith("_gpu")}
    assert {load_recipe(n).training.method for n in gpu} == {"lora", "full"} and len(gpu) >= 4
    assert any(n.endswith("_multigpu") for n in names)
    assert not any(n.startswith("accelerate/") for n in names)  # accelerate configs are not recipes


@pytest.mark.parametrize("name", shipped_recipes())
def test_header_names_command_override_time_and_memory(name):
    head = header(name)
    run = next((line for line in head if line.startswith("# Run:")), "")
    assert re.search(rf"(audit run|-m audit\.cli run) {re.escape(name)}\b", run) or \
        (name == "smollm2/lora_cpu" and "audit run" in run)
    assert any(line.startswith("# Override:") and name in line and "=" in line for line in head)
    expected = next(line for line in head if line.startswith("# Expected:"))
    assert re.search(r"\b(s|min|minutes)\b", expected) and "GB" in expected
    recipe = load_recipe(name)
    assert set(recipe.expected) == {"wall_time", "memory"}


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_recipe_draws_its_canaries_and_its_gates_can_be_met(name):
    notes = validate_only(load_recipe(name), check_sources=False)  # GPU recipes name Hub models this machine lacks
    assert notes and notes[0].startswith("canaries:")


@pytest.mark.parametrize("name", [n for n in shipped_recipes() if n.endswith(("_gpu", "_multigpu"))])
def test_gpu_recipes_name_a_hub_model_and_say_whether_their_numbers_were_measured(name):
    """Each expected number is either marked an estimate or is a measurement that says so (a figure and "measured")."""
    recipe = load_recipe(name)
    assert HUB_ID.match(recipe.model.source) and not Path(recipe.model.source).exists()
    for key in ("wall_time", "memory"):
        said = recipe.expected[key]
        assert "not yet measured" in said or (re.search(r"\d", said) and "measured" in said), f"{name} expected.{key}: {said!r}"
    assert (recipe.canaries.references or 0) >= 100  # enough controls that TPR at 1% FPR is reported
    if recipe.training.method == "full":  # fp32 master weights: never pure bf16 AdamW (audit.train.sft)
        assert recipe.training.precision in {"fp32", "bf16-mixed"}


def test_multigpu_recipe_runs_through_a_shipped_accelerate_config():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in [n for n in shipped_recipes() if n.endswith("_multigpu")]:
        configs = re.findall(r"--config_file recipes/accelerate/(\w+\.yaml)", "\n".join(header(name)))
        assert configs and all((RECIPES / "accelerate" / c).is_file() for c in configs)
    assert {p.name for p in ACCELERATE} == {"fsdp.yaml", "zero3.yaml"}
    for path in ACCELERATE:
        config = load_config_from_file(str(path))
        assert config.num_machines == 1 and config.mixed_precision == "no"  # the recipe decides precision
        assert path.read_text().startswith("# accelerate config")
        if config.distributed_type == "FSDP":
            assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # rank 0 writes whole safetensors
            assert config.fsdp_config["fsdp_version"] == 2  # fp32 shards as the master copy; FSDP1 kept buffers in bf16
        else:
            assert config.distributed_type == "DEEPSPEED"
            # the audit gathers the fp32 master weights itself; the 16-bit gather would save the bf16 working copy
            assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"] is False


def test_recipes_on_hub_models_pin_a_commit():
    """A branch moves under a recipe: its expected times, memory and notes describe one snapshot, pinned by commit
    (report.json records the snapshot resolved, ``model.provenance.snapshot``)."""
    hub = [n for n in shipped_recipes() if HUB_ID.match(load_recipe(n).model.source)]
    assert len(hub) >= 6
    for name in hub:
        assert re.fullmatch(r"[0-9a-f]{40}", load_recipe(name).model.revision or ""), name


def test_clean_further_tune_recipes_plant_nothing():
    for name in ("tiny/clean_lora_cpu", "smollm2/clean_lora_cpu"):
        recipe = load_recipe(name)
        assert recipe.canaries.inject is False and recipe.parent is None and recipe.seed != load_recipe("smollm2/lora_cpu").seed


def test_default_recipe_samples_outputs():
    assert load_recipe(None).outputs.samples > 0
