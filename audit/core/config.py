"""Recipes: YAML plus ``key=value`` overrides, validated once into a :class:`~audit.core.schema.Recipe`.

This is the only module that reads recipe YAML. Everything below the pipeline receives typed sections.

    recipe = load_recipe("smollm2/lora_cpu", ["training.epochs=1", "seed=3"])

Errors name the key and the fix: an unknown key gets the closest valid one ("Did you mean ...?").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from audit.core.errors import AuditError, did_you_mean
from audit.core.resources import DEFAULT_RECIPE, data_dir
from audit.core.schema import Recipe


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in ``recipes/`` (``<model>/<method>_<device>``)."""
    root = data_dir("recipes")
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if p.parent.name != "accelerate")


def resolve_recipe_path(name_or_path: str | None) -> Path:
    """A path to an existing YAML file, or a shipped recipe name such as ``tiny/lora_cpu``."""
    name_or_path = name_or_path or DEFAULT_RECIPE
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix in {".yaml", ".yml"} and not path.is_absolute():
        # "recipes/tiny/lora_cpu.yaml" given from outside the checkout: fall back to the shipped copy.
        parts = path.with_suffix("").parts
        name_or_path = "/".join(parts[1:] if parts and parts[0] == "recipes" else parts)
    shipped = data_dir("recipes") / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = shipped_recipes()
    raise AuditError(
        f"recipe '{name_or_path}' not found: no such file and no shipped recipe of that name."
        + did_you_mean(str(name_or_path), names),
        fix=f"give a path to a YAML file or one of: {', '.join(names)}",
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``training.epochs=2`` -> (["training", "epochs"], 2). Values are parsed as YAML scalars or lists."""
    if "=" not in item:
        raise AuditError(f"override '{item}' is not of the form key=value", fix="write e.g. training.epochs=2")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise AuditError(f"override '{item}' has an empty key", fix="write e.g. training.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key=value`` override set (nested keys by dots)."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise AuditError(f"override '{item}': '{key}' is a value, not a section", fix="check the key path")
            node = child
        node[keys[-1]] = value
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_yaml(path: Path, *, mapping: bool = True) -> Any:
    """Parse a YAML file; ``mapping=False`` also accepts a top-level list (gates files)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror}", fix="check the path and permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise AuditError(f"{path} is not valid YAML{where}: {problem}", fix="correct the YAML syntax") from None
    if data is None:
        data = {}
    if mapping and not isinstance(data, dict):
        raise AuditError(f"{path} must hold a YAML mapping (key: value), not {type(data).__name__}",
                         fix="start the file with keys such as 'name:' and 'model:'")
    return data


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises :class:`AuditError` naming the offending key."""
    path = resolve_recipe_path(name_or_path)
    data = apply_overrides(read_yaml(path), overrides or [])
    data.setdefault("name", path.stem if path.parent.name == "recipes" else f"{path.parent.name}-{path.stem}")
    return validate_recipe(data, source=str(path))


def validate_recipe(data: dict[str, Any], *, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from None


def _explain(exc: ValidationError, source: str) -> AuditError:
    """Turn pydantic's first error into one line: which key, what is wrong, how to fix it."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(Recipe, loc[:-1])
        hint = did_you_mean(loc[-1], valid)
        return AuditError(f"{source}: unknown key '{key}'.{hint}", fix=f"valid keys here are: {', '.join(valid)}")
    if err["type"] == "missing":
        return AuditError(f"{source}: missing required key '{key}'", fix=f"add '{loc[-1]}:' to the recipe")
    given = err.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) else ""
    msg = err["msg"].removeprefix("Value error, ")
    where = f"'{key}': " if key else ""  # a check across sections (Recipe's own validators) names its keys itself
    return AuditError(f"{source}: {where}{msg}{shown}", fix="correct that value in the recipe or the override")


def _valid_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        # an optional section (``works``, ``release``: X | None) names its keys like a required one
        annotation = next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
