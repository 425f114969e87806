"""Recipe loading: every shipped recipe validates; overrides, unknown keys and broken YAML give one-line errors."""

from __future__ import annotations

import pytest

from audit.core.config import apply_overrides, load_recipe, parse_override, shipped_recipes
from audit.core.errors import AuditError


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name
    assert recipe.training.method in {"lora", "full"}


def test_every_shipped_recipe_opens_with_the_command_that_runs_it():
    from audit.core.resources import data_dir

    for path in data_dir("recipes").rglob("*.yaml"):
        if path.parent.name == "accelerate":
            continue
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any("audit run" in line for line in header[:4]), f"{path} must open with the command that runs it"


def test_default_recipe_is_smollm2_lora():
    recipe = load_recipe(None)
    assert recipe.model.source == "smollm2-135m"
    assert recipe.training.method == "lora"


def test_overrides_are_typed_and_nested():
    recipe = load_recipe("tiny/lora_cpu", ["training.epochs=2", "seed=7", "canaries.tiers=[1,2]", "training.lora.r=4"])
    assert recipe.training.epochs == 2.0
    assert recipe.seed == 7
    assert recipe.canaries.tiers == [1, 2]
    assert recipe.training.lora.r == 4


def test_parse_override_keeps_strings_and_parses_scalars():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("model.source=tiny-llama") == (["model", "source"], "tiny-llama")
    assert parse_override("x=") == (["x"], None)
    with pytest.raises(AuditError, match="key=value"):
        parse_override("novalue")


def test_apply_overrides_does_not_mutate_input():
    data = {"training": {"epochs": 3}}
    out = apply_overrides(data, ["training.epochs=1"])
    assert data["training"]["epochs"] == 3 and out["training"]["epochs"] == 1


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(AuditError) as info:
        load_recipe("tiny/lora_cpu", ["training.epocs=2"])
    msg = str(info.value)
    assert "training.epocs" in msg and "Did you mean 'epochs'?" in msg


def test_wrong_type_names_the_key():
    with pytest.raises(AuditError, match="training.batch_size"):
        load_recipe("tiny/lora_cpu", ["training.batch_size=many"])


def test_exposure_references_are_bounded_and_the_refusal_states_the_cost():
    from audit.core.config import validate_recipe
    from audit.core.schema import MAX_EXPOSURE_REFERENCES

    assert validate_recipe({"name": "x", "scoring": {"exposure_references": MAX_EXPOSURE_REFERENCES}})
    with pytest.raises(AuditError) as info:  # the canary counts are the spec's: the cost per canary
        validate_recipe({"name": "x", "scoring": {"exposure_references": MAX_EXPOSURE_REFERENCES + 1}}, source="r.yaml")
    assert str(info.value).startswith("r.yaml: scoring.exposure_references=100,001 is over the limit of 100,000: exposure "
                                      "would score 100,001 candidates x 2 models = 200,002 forward passes for each ranked "
                                      "canary"), info.value
    counted = {"tiers": [1, 4], "members_per_tier": 3, "references": 50}  # 6 members, 10 of the 50 references ranked
    with pytest.raises(AuditError, match=r"200,000 candidates x 16 ranked canaries x 2 models = 6,400,000 forward"):
        validate_recipe({"name": "x", "canaries": counted,
                         "scoring": {"exposure_references": 200_000, "exposure_null_references": 10}})


def test_missing_recipe_suggests_shipped_names():
    with pytest.raises(AuditError) as info:
        load_recipe("tiny/lora_cup")
    assert "Did you mean 'tiny/lora_cpu'?" in str(info.value)


def test_yaml_syntax_error_gives_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraining: [unclosed\n")
    with pytest.raises(AuditError, match=r"not valid YAML at line \d+"):
        load_recipe(str(bad))


def test_recipe_fingerprint_changes_with_content():
    a = load_recipe("tiny/lora_cpu")
    b = load_recipe("tiny/lora_cpu", ["seed=1"])
    assert a.fingerprint() == load_recipe("tiny/lora_cpu").fingerprint()
    assert a.fingerprint() != b.fingerprint()
